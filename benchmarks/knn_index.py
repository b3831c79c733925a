"""Nearest-neighbour index choice for PatchCore's bank: exact vs IVF (nprobe) vs HNSW.

A real PatchCore bank (EfficientNet-Lite0, full-resolution 512 tiles of VisA capsules, 20k
rows) is searched with the patch embeddings of anomalous test images. For each index: build
time, search time per image (best of ``--repeats``), recall@1 against the exact index and the
relative error of the nearest distance (the patch score; approximate indices can only
overestimate it). Same process, same queries, so the ratios hold on a noisy machine.

    python benchmarks/knn_index.py --n-train 4 --n-test 4
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch

from benchmarks.common import capsules, tiled_strategy, write_results
from hrad.config import load_config
from hrad.data.images import ImageList, read_image
from hrad.detectors.knn import NearestNeighbours
from hrad.model import AnomalyModel


def embeddings_of(model: AnomalyModel, image: np.ndarray) -> np.ndarray:
    """All patch embeddings of one image's tiles, ``P x D``."""
    with torch.inference_mode():
        batches = list(tiled_strategy(model).embed_image(image))
    return np.concatenate([b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]).float().numpy() for b in batches])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=4, help="training images for the bank")
    parser.add_argument("--n-test", type=int, default=4, help="anomalous test images as queries")
    parser.add_argument("--bank", type=int, default=20_000, help="bank rows (coreset size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="knn_index")
    args = parser.parse_args(argv)

    dataset = capsules()
    train = sorted(dataset.train)[: args.n_train]
    overrides = {
        "backbone": {"name": "efficientnet-lite0"},
        # coreset ratio chosen so the bank gets args.bank rows from the sampled patches
        "detector": {"name": "patchcore", "coreset_ratio": 1.0, "max_bank_size": args.bank},
        "strategy": {"name": "tiled", "tile": 512},
        "threshold": {"validation_fraction": 0.0},
    }
    model = AnomalyModel(load_config(None, overrides)).fit(ImageList(train))
    bank = model.strategy.detector.memory_bank.numpy()  # type: ignore[attr-defined]
    anomalous = [s for s in dataset.test if s.label == 1][: args.n_test]
    per_image = [embeddings_of(model, read_image(s.path)) for s in anomalous]
    queries = np.ascontiguousarray(np.concatenate(per_image))

    exact = NearestNeighbours(index="exact").fit(bank)
    reference_distances, reference_indices = (t.numpy()[:, 0] for t in exact.search(queries, 1))
    choices: list[tuple[str, dict[str, Any]]] = [("exact", {"index": "exact"})]
    choices += [(f"ivf nlist 512 nprobe {p}", {"index": "ivf", "nlist": 512, "nprobe": p}) for p in (4, 8, 16, 32)]
    choices += [(f"hnsw M 32 ef {ef}", {"index": "hnsw", "hnsw_m": 32, "ef_search": ef}) for ef in (32, 128)]
    rows: list[dict[str, Any]] = []
    for label, options in choices:
        start = time.perf_counter()
        index = NearestNeighbours(**options).fit(bank)
        build = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            distances, indices = index.search(queries, 1)
            times.append(time.perf_counter() - start)
        relative = distances.numpy()[:, 0] / np.maximum(reference_distances, 1e-12) - 1
        rows.append(
            {
                "index": label,
                "build_s": round(build, 2),
                "search_s_per_image": round(min(times) / len(anomalous), 3),
                "recall_at_1": round(float(np.mean(indices.numpy()[:, 0] == reference_indices)), 4),
                # strings: the Markdown table would round these small numbers to 0.000
                "mean_rel_distance_error": f"{relative.mean():.1e}",
                "p99_rel_distance_error": f"{np.quantile(relative, 0.99):.1e}",
                "max_rel_distance_error": f"{relative.max():.1e}",
            }
        )
        print(rows[-1], flush=True)
    exact_time = rows[0]["search_s_per_image"]
    for row in rows:
        row["speedup_vs_exact"] = round(exact_time / max(row["search_s_per_image"], 1e-9), 1)
    notes = (
        f"Bank: {bank.shape[0]} x {bank.shape[1]} (PatchCore, efficientnet-lite0, tiles of 512 from {len(train)} "
        f"training images); queries: {queries.shape[0]} patch embeddings of {len(anomalous)} anomalous test images "
        f"({queries.shape[0] // len(anomalous)} per 1500x1000 image). faiss {faiss.__version__}, "
        f"{torch.get_num_threads()} thread(s). Errors relative to the exact nearest distance (the patch score)."
    )
    columns = ["index", "build_s", "search_s_per_image", "speedup_vs_exact", "recall_at_1",
               "mean_rel_distance_error", "p99_rel_distance_error", "max_rel_distance_error"]
    write_results(args.name, rows, notes, columns=columns)


if __name__ == "__main__":
    main()
