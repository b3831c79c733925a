"""A line that drifted after the fit: the model's thresholds as fitted vs after ``hrad calibrate``.

The drift is simulated, the same for every image: an exposure change (``v -> gain * v +
offset`` on the 8-bit values, clipped; default gain 0.8, a lamp 20% dimmer) applied to the
test images and to new good calibration images, never to the training images. The model (tiled
PatchCore by default) is fitted once on the first ``--n-train`` capsules training images; the
calibration images are the next ``--n-calibrate`` training images, drifted (so disjoint from
both the fit and the test). Three rows: the undrifted test set with the fitted thresholds, the
drifted test set with them, and the drifted test set after ``AnomalyModel.calibrate`` on the
drifted calibration images (what ``hrad calibrate`` runs). Image AUROC does not depend on the
threshold; the decisions do: the share of good test parts flagged (false alarms), of defective
ones flagged (recall), and of good parts' pixels above the pixel threshold.

    PYTHONPATH=. python benchmarks/calibrate_drift.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.common import capsules, subset, write_results
from hrad.config import load_config
from hrad.data.datasets import Sample
from hrad.data.images import ImageList, read_pixels
from hrad.model import AnomalyModel


def drifted(pixels: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """8-bit ``pixels`` after the exposure change, still 8-bit."""
    return np.clip(np.rint(pixels.astype(np.float32) * gain + offset), 0, 255).astype(np.uint8)


def decisions(model: AnomalyModel, test: Sequence[Sample], images: Sequence[np.ndarray]) -> dict[str, Any]:
    """The model's verdicts on ``images`` (``test``'s, maybe drifted) at its own thresholds."""
    started = time.perf_counter()
    labels, scores, flagged, good_pixels_flagged = [], [], [], []
    for sample, image in zip(test, images, strict=True):
        prediction = model.predict(image, name=str(sample.path))
        labels.append(sample.label)
        scores.append(prediction.score)
        flagged.append(bool(prediction.is_anomalous))
        if sample.label == 0:
            mask = prediction.mask
            assert mask is not None
            good_pixels_flagged.append(float(mask.mean()))
    labels_array, flagged_array = np.array(labels), np.array(flagged)
    thresholds = model.thresholds
    assert thresholds is not None
    return {
        "image_threshold": thresholds.image,
        "pixel_threshold": thresholds.pixel,
        "image_auroc": float(roc_auc_score(labels_array, scores)),
        "good_flagged": float(flagged_array[labels_array == 0].mean()),
        "defective_flagged": float(flagged_array[labels_array == 1].mean()),
        "good_pixels_flagged": float(np.mean(good_pixels_flagged)),
        "seconds_per_image": (time.perf_counter() - started) / len(test),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=30)
    parser.add_argument("--n-calibrate", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--gain", type=float, default=0.8)
    parser.add_argument("--offset", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=1024, help="long side before tiling")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--out", default="calibrate_drift")
    args = parser.parse_args()

    dataset = capsules()
    train, test = subset(dataset, args.n_train, args.n_test)
    calibration = sorted(dataset.train)[args.n_train : args.n_train + args.n_calibrate]
    config = load_config(None, {"strategy": {"name": "tiled", "image_size": args.image_size, "tile": args.tile}})
    print(f"fitting on {len(train)} images ...", file=sys.stderr, flush=True)
    model = AnomalyModel(config).fit(ImageList(train))
    originals = [read_pixels(sample.path) for sample in test]
    shifted = [drifted(image, args.gain, args.offset) for image in originals]
    rows = [{"setup": "no drift, fitted thresholds", **decisions(model, test, originals)}]
    rows.append({"setup": "drift, fitted thresholds", **decisions(model, test, shifted)})
    started = time.perf_counter()
    model.calibrate([drifted(read_pixels(path), args.gain, args.offset) for path in calibration])
    calibrate_seconds = time.perf_counter() - started
    rows.append({"setup": f"drift, calibrated on {len(calibration)} drifted good images", **decisions(model, test, shifted),
                 "calibrate_seconds": calibrate_seconds})
    for row in rows:
        print(row, file=sys.stderr, flush=True)
    good = sum(sample.label == 0 for sample in test)
    notes = (
        f"Tiled PatchCore (efficientnet-lite0, image_size {args.image_size}, tile {args.tile}, hrad's defaults otherwise) "
        f"fitted once on the first {len(train)} capsules training images (thresholds from its held-out 20%). "
        f"Test: {len(test)} seeded test images ({good} good, {len(test) - good} defective). Simulated drift: every "
        f"8-bit value v -> {args.gain:g} v + {args.offset:g} (clipped), on the test and calibration images only. "
        f"Calibration: the next {len(calibration)} training images, drifted (disjoint from fit and test), through "
        "AnomalyModel.calibrate (hrad calibrate). good_flagged / defective_flagged: the share of good / defective "
        "test images scored above the image threshold; good_pixels_flagged: the mean share of a good image's "
        "pixels above the pixel threshold. One run."
    )
    columns = ["setup", "image_threshold", "pixel_threshold", "image_auroc", "good_flagged", "defective_flagged",
               "good_pixels_flagged", "seconds_per_image", "calibrate_seconds"]
    print(write_results(args.out, rows, notes, columns))


if __name__ == "__main__":
    main()
