"""PatchCore predict time per 1500x1000 image as a ratio to the backbone's own forward time.

The floor of full-resolution predict is the backbone's forward pass over the same tiles; the
rest (patch aggregation, nearest-neighbour search, merging, smoothing, thresholds) is overhead.
Both are timed back to back in the same process on the same images (issue 2's goal: predict
under 1.3x the backbone). One model per IVF ``nprobe`` (the bank is the same: the coreset is
seeded) so the search's cost and its effect on quality are measured together; see
benchmarks/results/knn_index.md for recall and distance errors.

    python benchmarks/predict_overhead.py --n-train 20 --n-test 30 --nprobe 32 16 8
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from benchmarks.common import MAIN_COLUMNS, capsules, run_setup, subset, write_results
from benchmarks.foundation import predict_overhead
from hrad.data.images import read_image
from hrad.model import AnomalyModel


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--timing-images", type=int, default=10)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[32, 16, 8])
    parser.add_argument("--name", default="predict_overhead")
    args = parser.parse_args(argv)

    train, test = subset(capsules(), args.n_train, args.n_test)
    timing = [read_image(sample.path) for sample in test[: args.timing_images]]

    def describe(model: AnomalyModel) -> dict[str, Any]:
        neighbours = model.strategy.detector.neighbours  # type: ignore[attr-defined]
        return {"index": neighbours.index_kind, "bank_rows": neighbours.size, **predict_overhead(model, timing)}

    rows = []
    for nprobe in args.nprobe:
        overrides = {
            "backbone": {"name": "efficientnet-lite0"},
            "detector": {"name": "patchcore", "nprobe": nprobe},
            "strategy": {"name": "tiled", "tile": 512},
        }
        rows.append(run_setup(f"patchcore/efficientnet-lite0/tiled512/nprobe{nprobe}", overrides, train, test, describe))
    notes = (
        f"{len(train)} training images, {len(test)} test images (seeded, label-stratified subset). PatchCore on "
        "EfficientNet-Lite0, full-resolution 512 tiles (6 per image). predict_over_backbone = full predict time / "
        f"backbone forward on the same tiles, same process, {len(timing)} test images; the 1.3x goal is on this ratio."
    )
    columns = ["setup", "index", "bank_rows", "backbone_seconds_per_image", "predict_seconds_per_image",
               "predict_over_backbone", *MAIN_COLUMNS[1:7]]
    write_results(args.name, rows, notes, columns=columns)


if __name__ == "__main__":
    main()
