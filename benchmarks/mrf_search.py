"""MRF-AD: nearest-neighbour search cost next to the backbone, per index kind, on the same banks.

MRF is fitted once (``AnomalyModel``, exact banks, no coreset); the test images' pyramids are
embedded once (``backbone_s_per_image``); then every index configuration is built over the same
banks and searches the same query vectors. Per configuration: search seconds per image (all
layer x scale banks), build seconds, index bytes (faiss's serialised index, plus the float32
bank copy hrad keeps), recall@1 against the exact search, the mean relative error of the
nearest distances, and what reaches the user: the relative error of the fused full-resolution
map (mean |map - exact| / mean exact) and of the image score (its maximum).

    PYTHONPATH=. python benchmarks/mrf_search.py --n-train 8 --n-test 2 --pixel-budget 1000000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import faiss
import numpy as np
import torch

from benchmarks.common import CAPSULES, subset, write_results
from hrad.config import load_config
from hrad.data.datasets import load_dataset
from hrad.data.images import read_image
from hrad.detectors.knn import NearestNeighbours
from hrad.model import AnomalyModel
from hrad.profiling import PeakMemory
from hrad.strategies.mrf import MRFStrategy, fuse_maps

CONFIGS: dict[str, dict[str, Any]] = {
    "exact (flat)": {"index": "exact"},
    "ivf nprobe 32 (MRF default before)": {"index": "ivf", "nprobe": 32},
    "ivf nprobe 8": {"index": "ivf", "nprobe": 8},
    "ivf nprobe 4": {"index": "ivf", "nprobe": 4},
    "hnsw M32 ef128": {"index": "hnsw", "hnsw_m": 32, "ef_search": 128},
    "hnsw M16 ef64": {"index": "hnsw", "hnsw_m": 16, "ef_search": 64},
}


def index_bytes(neighbours: NearestNeighbours) -> int:
    assert neighbours._index is not None
    return len(faiss.serialize_index(neighbours._index)) + neighbours.bank.numel() * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2-vits14")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=2)
    parser.add_argument("--pixel-budget", type=int, default=1_000_000)
    parser.add_argument("--nlist", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default="mrf_search")
    args = parser.parse_args()
    train_paths, test_samples = subset(load_dataset(CAPSULES), args.n_train, args.n_test)
    overrides = {
        "backbone": {"name": args.backbone},
        "strategy": {"name": "mrf", "pixel_budget": args.pixel_budget, "index": "exact", "max_bank_gib": None},
        "threshold": {"validation_fraction": 0.0},
    }
    with PeakMemory() as fit_memory:
        model = AnomalyModel(load_config(None, overrides)).fit([read_image(p) for p in train_paths])
    strategy = model.strategy
    assert isinstance(strategy, MRFStrategy)
    banks = strategy.banks
    print(f"fit {fit_memory.seconds:.0f}s; banks: {[len(b) for b in banks.values()]}", flush=True)
    # queries of every test image, embedded once
    images = [read_image(s.path) for s in test_samples]
    queries: list[dict[tuple[str, float], torch.Tensor]] = []
    grids: list[dict[tuple[str, float], tuple[int, ...]]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for image in images:
            per_key: dict[tuple[str, float], torch.Tensor] = {}
            shapes: dict[tuple[str, float], tuple[int, ...]] = {}
            for scale, _, maps in strategy._pyramid(image):
                for layer in strategy.layers:
                    per_key[(layer, scale)] = strategy._vectors(maps[layer])
                    shapes[(layer, scale)] = tuple(maps[layer].shape[-2:])
            queries.append(per_key)
            grids.append(shapes)
    backbone_s = (time.perf_counter() - start) / len(images)
    rows: list[dict[str, Any]] = []
    exact: list[dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]]] | None = None
    exact_maps: list[np.ndarray] = []
    for name in args.configs:
        options = {"nlist": args.nlist, **CONFIGS[name]}
        start = time.perf_counter()
        indexes = {key: NearestNeighbours(**options).fit(bank) for key, bank in banks.items()}
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        results = [{key: indexes[key].search(q, 1) for key, q in per_key.items()} for per_key in queries]
        search_s = (time.perf_counter() - start) / len(images)
        if exact is None:
            exact = results
        recall: list[float] = []
        relative: list[float] = []
        map_errors: list[float] = []
        score_errors: list[float] = []
        for image, found, reference, shapes in zip(images, results, exact, grids, strict=True):
            for key in found:
                recall.append(float((found[key][1][:, 0] == reference[key][1][:, 0]).float().mean()))
                reference_distance = reference[key][0][:, 0].clamp_min(1e-6)
                relative.append(float(((found[key][0][:, 0] - reference_distance) / reference_distance).mean()))
            fused = fuse_maps([found[key][0][:, 0].reshape(shapes[key]) for key in found], image.shape[:2], "mean").numpy()
            if len(exact_maps) < len(images):
                exact_maps.append(fused)
            truth = exact_maps[len(map_errors)]
            map_errors.append(float(np.abs(fused - truth).mean() / truth.mean()))
            score_errors.append(float(abs(fused.max() - truth.max()) / truth.max()))
        row = {
            "index": name,
            "kinds": ",".join(sorted({str(i.index_kind) for i in indexes.values()})),
            "backbone_s_per_image": round(backbone_s, 2),
            "search_s_per_image": round(search_s, 2),
            "search_over_backbone": round(search_s / backbone_s, 3),
            "build_s": round(build_s, 1),
            "index_mb": round(sum(index_bytes(i) for i in indexes.values()) / 2**20),
            "recall_at_1": round(float(np.mean(recall)), 4),
            "distance_rel_error": f"{np.mean(relative):.2g}",
            "map_rel_error": f"{np.mean(map_errors):.2g}",
            "score_rel_error": f"{np.mean(score_errors):.2g}",
        }
        print(row, flush=True)
        rows.append(row)
        del indexes
    notes = (
        f"MRF-AD with `{args.backbone}`, layers {', '.join(strategy.layers)}, scales {strategy.config.scales}, pixel budget "
        f"{args.pixel_budget}, banks of {args.n_train} training images without coreset ({sum(len(b) for b in banks.values())} "
        f"vectors in {len(banks)} banks, largest {max(len(b) for b in banks.values())}), {len(images)} test images; "
        f"{torch.get_num_threads()} threads for torch and faiss. IVF: nlist {args.nlist} (fewer for small banks: 39 "
        "training vectors per list). index_mb: faiss's serialised indexes plus the float32 bank copy hrad keeps. "
        "Errors are against the exact search on the same queries; map_rel_error = mean |fused map - exact fused map| / "
        "mean exact map; score_rel_error: the same for the map's maximum (the image score before smoothing)."
    )
    columns = list(rows[0]) if rows else ["index"]
    write_results(args.out, rows, notes, columns=columns)


if __name__ == "__main__":
    main()
