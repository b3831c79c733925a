"""onnxruntime's intra-op thread spinning off (hrad's default) vs on (onnxruntime's), per-image
predict time of exported models on VisA capsules, measured in one process.

For each ``--strategies`` setup of ``benchmarks/hiad_export.py`` (EfficientNet-Lite0, PatchCore
scoring) the model is fitted on ``--n-train`` training images and exported to ONNX once; two
predictors open the export, one with spinning off, one with it on
(:func:`hrad.export_runtime.open_predictor`'s ``spinning``). Each test image is predicted by both,
``--repeats`` times, the order alternating image by image and repeat by repeat, so whatever else
runs on the machine weighs on both settings alike. Reported: the median seconds per image of each,
their ratio off / on (under 1: off is faster), the median of the per-image paired ratios, and the
largest difference between the two settings' maps (relative to the map's range; the same graphs
run either way, so it should be 0). Warm-up: one predict each on the first image, not timed.

Before any predict the other predictor's threads have slept since its last image, except right
after a spinning predict: its threads may still be spinning when the spinning-off one starts,
which only counts against "off".

    PYTHONPATH=. python benchmarks/export_spinning.py --n-train 5 --n-test 6 --repeats 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from benchmarks.common import ROOT, capsules, subset, write_results
from benchmarks.hiad_export import SETUPS
from hrad.config import load_config
from hrad.data.images import ImageList, read_image
from hrad.export import export_onnx
from hrad.export_runtime import open_predictor
from hrad.model import AnomalyModel

COLUMNS = [
    "strategy", "timed_predicts", "median_s_off", "median_s_on", "off_on_ratio", "paired_ratio_median",
    "max_map_difference", "load_1min",
]  # fmt: skip


def timed(predictor: Any, image: np.ndarray) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    prediction = predictor.predict(image)
    return time.perf_counter() - start, prediction.anomaly_map


def alternate(predictors: dict[bool, Any], images: list[np.ndarray], repeats: int) -> dict[str, Any]:
    """Every image through both predictors (``True``: spinning on), order alternating."""
    for predictor in predictors.values():
        predictor.predict(images[0])
    seconds: dict[bool, list[float]] = {False: [], True: []}
    ratios, difference = [], 0.0
    for repeat in range(repeats):
        for index, image in enumerate(images):
            order = (False, True) if (repeat + index) % 2 == 0 else (True, False)
            maps = {}
            for spinning in order:
                elapsed, maps[spinning] = timed(predictors[spinning], image)
                seconds[spinning].append(elapsed)
            ratios.append(seconds[False][-1] / seconds[True][-1])
            scale = float(maps[False].max() - maps[False].min()) or 1.0
            difference = max(difference, float(np.abs(maps[False] - maps[True]).max()) / scale)
    off, on = median(seconds[False]), median(seconds[True])
    return {
        "timed_predicts": 2 * len(ratios),
        "median_s_off": round(off, 3),
        "median_s_on": round(on, 3),
        "off_on_ratio": round(off / on, 3),
        "paired_ratio_median": round(median(ratios), 3),
        "max_map_difference": f"{difference:.1e}",
        "seconds_off": [round(s, 3) for s in seconds[False]],
        "seconds_on": [round(s, 3) for s in seconds[True]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=5)
    parser.add_argument("--n-test", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=4, help="passes over the test images, each image predicted once per setting")
    parser.add_argument("--strategies", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--out", default="export_spinning", help="results name")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    train, test = subset(capsules(), args.n_train, args.n_test)
    images = [read_image(sample.path) for sample in test]
    rows: list[dict[str, Any]] = []
    loads: list[float] = []
    for strategy in args.strategies:
        config = load_config(None, {"backbone": {"name": "efficientnet-lite0"}, **SETUPS[strategy], "device": "cpu"})
        model = AnomalyModel(config).fit(ImageList(list(train)))
        with tempfile.TemporaryDirectory(prefix="hrad_export_spinning_") as work:
            export_onnx(model, Path(work) / "m.onnx")
            predictors = {spinning: open_predictor(Path(work) / "m.onnx", spinning=spinning) for spinning in (False, True)}
            load_before = os.getloadavg()[0]
            row = {"strategy": strategy, **alternate(predictors, images, args.repeats)}
            loads += [load_before, os.getloadavg()[0]]
            row["load_1min"] = f"{loads[-2]:.1f}-{loads[-1]:.1f}"
        rows.append(row)
        print({key: row[key] for key in COLUMNS}, flush=True)
    notes = (
        f"Per-image `predict` of ONNX exports (EfficientNet-Lite0, PatchCore scoring; setups of benchmarks/hiad_export.py) "
        f"with onnxruntime's intra-op spinning off (hrad's default) and on, at commit {commit}: fitted on {len(train)} "
        f"capsules training images, {len(test)} test images (seeded, label-stratified) x {args.repeats} repeats x 2 settings, "
        "the order alternating image by image and repeat by repeat in one process (warm-up predict not timed). "
        "off_on_ratio = median_s_off / median_s_on (under 1: off faster); paired_ratio_median = median over images of "
        "off / on of the same image and repeat; max_map_difference: largest difference of the two settings' maps relative "
        "to the map's range; load_1min: the machine's 1-minute load average before / after each row. "
        f"Run at nice {os.nice(0)} on a shared CPU whose other jobs kept the load average at {min(loads):.1f}-{max(loads):.1f}, "
        "one run: what spinning costs under load, not on an idle machine."
    )
    write_results(args.out, rows, notes, columns=COLUMNS)


if __name__ == "__main__":
    main()
