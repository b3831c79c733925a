"""How far binned pixel metrics are from the unbinned computation (``hrad evaluate --score-bits``).

One model predicts the test subset once; every map goes into :class:`PixelMetrics` at several
precisions (``score_bits`` 16 .. 32; 32 keeps every float32 value apart, i.e. unbinned) and,
as an independent check of the 32-bit figures, into scikit-learn's AUROC / AP over the
concatenated pixels. Reported: each pixel metric's absolute difference to the 32-bit value,
the largest over all metrics per precision, the number of bins and the accumulation time.

    PYTHONPATH=. python benchmarks/metric_precision.py --n-train 20 --n-test 20
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.common import capsules, subset, write_results
from hrad.config import load_config
from hrad.data.images import ImageList, read_image
from hrad.metrics import PixelMetrics
from hrad.model import AnomalyModel

BITS = (16, 20, 24, 28, 32)
METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro_30", "aupro_05", "aupro_30_q1", "aupro_05_q1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--name", default="metric_precision")
    args = parser.parse_args()

    train, test = subset(capsules(), args.n_train, args.n_test)
    config = load_config(None, {"backbone": {"name": "efficientnet-lite0"}, "detector": {"name": "patchcore"},
                                "strategy": {"name": "downsample", "image_size": args.image_size}})
    model = AnomalyModel(config).fit(ImageList(train))
    accumulators = {bits: PixelMetrics(score_bits=bits) for bits in BITS}
    seconds = dict.fromkeys(BITS, 0.0)
    all_scores, all_truth = [], []
    for index, sample in enumerate(test):
        image = read_image(sample.path)
        anomaly_map = model.predict(image).anomaly_map
        mask = sample.load_mask(image.shape[:2])
        for bits, accumulator in accumulators.items():
            start = time.perf_counter()
            accumulator.add(anomaly_map, mask)
            seconds[bits] += time.perf_counter() - start
        all_scores.append(anomaly_map.ravel())
        all_truth.append(mask.ravel())
        print(f"{index + 1}/{len(test)}", file=sys.stderr, flush=True)
    results = {}
    for bits, accumulator in accumulators.items():
        start = time.perf_counter()
        results[bits] = accumulator.result()
        seconds[bits] += time.perf_counter() - start

    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, truth = np.concatenate(all_scores), np.concatenate(all_truth)
    reference = {"pixel_auroc": float(roc_auc_score(truth, scores)), "pixel_ap": float(average_precision_score(truth, scores))}
    exact = results[32]
    rows = []
    for bits in BITS:
        row: dict[str, object] = {"score_bits": bits, "bins": accumulators[bits].n_bins, "seconds": seconds[bits]}
        differences = []
        for name in METRICS:
            difference = abs(results[bits][name] - exact[name])
            row[f"d_{name}"] = f"{difference:.1e}"
            differences.append(difference)
        row["max_abs_difference"] = f"{max(differences):.1e}"
        rows.append(row)
    rows.append({"score_bits": "sklearn (unbinned)", **{f"d_{k}": f"{abs(v - exact[k]):.1e}" for k, v in reference.items()}})
    values = ", ".join(f"{name} {exact[name]:.4f}" for name in METRICS)
    notes = (
        f"Differences of each pixel metric to the 32-bit (unbinned: every float32 value its own bin) computation, "
        f"PatchCore / efficientnet-lite0 / downsample {args.image_size}, {len(train)} training images, {len(test)} test images "
        f"({int(truth.sum())} anomalous of {truth.size} pixels, maps at the full 1500x1000 resolution). "
        f"The last row compares scikit-learn's AUROC / AP over all {truth.size} concatenated pixels with the 32-bit values. "
        f"Exact values: {values}. `seconds`: accumulating and computing the metrics at that precision."
    )
    columns = ["score_bits", "bins", "seconds", *(f"d_{name}" for name in METRICS), "max_abs_difference"]
    print(write_results(args.name, rows, notes, columns=columns))


if __name__ == "__main__":
    main()
