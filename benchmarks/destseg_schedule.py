"""DeSTSeg: how long the segmentation net must train, and its map against the student's.

Same data, backbone and student for every row (capsules, downsample 512, EfficientNet-Lite0
layer2 + layer3, 10 student epochs); only the segmentation schedule and the map change:

    PYTHONPATH=. python benchmarks/destseg_schedule.py --n-train 10 --n-test 12
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from benchmarks.common import MAIN_COLUMNS, capsules, run_setup, subset, write_results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=12)
    parser.add_argument("--segmentation-epochs", type=int, nargs="+", default=[5, 40])
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--out", default="destseg_schedule")
    args = parser.parse_args(argv)
    train, test = subset(capsules(), args.n_train, args.n_test)
    base: dict[str, Any] = {"name": "destseg", "layers": ["layer2", "layer3"], "student_epochs": args.student_epochs}
    setups = [
        (f"segmentation map, {epochs} segmentation epochs", {**base, "segmentation_epochs": epochs})
        for epochs in args.segmentation_epochs
    ]
    setups.append(("student map (no segmentation net)", {**base, "segmentation_epochs": 0, "anomaly_map": "student"}))
    rows = []
    for label, detector in setups:
        overrides = {
            "backbone": {"name": "efficientnet-lite0"},
            "detector": detector,
            "strategy": {"name": "downsample", "image_size": 512},
            "threshold": {"validation_fraction": 0.0},
        }
        rows.append(run_setup(label, overrides, train, test))
    notes = (
        f"DeSTSeg on capsules: {len(train)} training and {len(test)} test images, downsample 512,"
        f" EfficientNet-Lite0 layer2 + layer3, {args.student_epochs} student epochs; rows differ only"
        " in the segmentation schedule / map. Pixel metrics exact at 1500x1000."
    )
    write_results(args.out, rows, notes, columns=MAIN_COLUMNS)


if __name__ == "__main__":
    main()
