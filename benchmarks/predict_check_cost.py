"""What predict's per-image warning checks cost against the whole predict of a small image.

``hrad serve`` predicts every upload with ``model.predict``, which checks each image against the
training images before predicting it: the scale check (:func:`hrad.prediction.tell_scale`:
the strategy's ``input_scale`` of the image and of the fitted size, compared; after its one
warning the line is still formatted for each request it concerns) and the colour check
(:func:`hrad.prediction.tell_colour`: whether the image is gray against the training images).
Both are timed here as predict calls them (the model's ``_tell_scale`` / ``_tell_colour``,
inside ``collecting_warnings`` as a served request is), back to back with the whole predict of
the same image, in one process. The model predicts far faster than a real one (``tiny-cnn``,
hrad's test backbone; PatchCore; small synthetic images), so the checks' share is an upper bound
of theirs in a real model's predict. Two images per setup: one of the training size (the checks find nothing) and
one 1.5x larger (the scale check finds it and formats its line each time).

    PYTHONPATH=. python benchmarks/predict_check_cost.py
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from benchmarks.common import write_results
from hrad.config import load_config
from hrad.data.images import model_input
from hrad.data.synthetic import normal_image
from hrad.errors import collecting_warnings
from hrad.model import AnomalyModel

#: small-image setups of each strategy that scales images (native-resolution ones skip the arithmetic)
SETUPS: dict[str, dict[str, Any]] = {
    "downsample": {"name": "downsample", "image_size": 128},
    "tiled": {"name": "tiled", "tile": 64, "image_size": 128},
    "tiled-ensemble": {"name": "tiled-ensemble", "tile": 64, "image_size": 128},
    "mrf": {"name": "mrf", "pixel_budget": 16_384, "scales": [0.5, 1.0]},
    "hiad": {"name": "hiad", "patch_size": 64, "low_res_size": 96, "assignment": "a2o", "fusion_rates": [0]},
}


def _images(seed: int, count: int, size: int) -> list[np.ndarray]:
    """Colour gravel textures, ``size`` rows by 1.5 ``size`` columns, 8-bit as a camera's."""
    rng = np.random.default_rng(seed)
    return [
        np.rint(cv2.resize(normal_image(rng, int(size * 1.5), color=True), (int(size * 1.5), size)) * 255).astype(np.uint8)
        for _ in range(count)
    ]


def _seconds_per_call(call: Callable[[], object], calls: int, batches: int) -> float:
    """Median over ``batches`` of the mean seconds of ``calls`` back-to-back calls."""
    means = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        means.append((time.perf_counter() - start) / calls)
    return statistics.median(means)


def measure(setup: str, strategy: dict[str, Any], size: int, repeats: int, check_calls: int) -> list[dict[str, Any]]:
    overrides = {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "patchcore"}, "strategy": strategy, "device": "cpu"}
    model = AnomalyModel(load_config(None, overrides)).fit(_images(0, 6, size))
    rows = []
    for kind, test in (("training size", _images(1, 1, size)[0]), ("1.5x larger", _images(2, 1, size * 3 // 2)[0])):
        array, name = model_input(test, model.bit_depth, "upload.png")
        with warnings.catch_warnings(), collecting_warnings():
            warnings.simplefilter("ignore")  # the one warning of the larger image: told by the first predict
            model.predict(array, name=name)  # warm-up, and the model's one warning given
            predict = _seconds_per_call(lambda: model.predict(array, name=name), 1, repeats)  # noqa: B023
            scale = _seconds_per_call(lambda: model._tell_scale(array, name), check_calls, repeats)  # noqa: B023
            colour = _seconds_per_call(lambda: model._tell_colour(array, name), check_calls, repeats)  # noqa: B023
        rows.append({
            "setup": setup,
            "image": f"{array.shape[1]}x{array.shape[0]} ({kind})",
            "predict_ms": round(predict * 1e3, 2),
            "scale_check_us": round(scale * 1e6, 2),
            "colour_check_us": round(colour * 1e6, 2),
            "checks_share_percent": round(100 * (scale + colour) / predict, 4),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="rows of the training images (columns: 1.5x)")
    parser.add_argument("--repeats", type=int, default=15, help="timed predicts per image (median)")
    parser.add_argument("--check-calls", type=int, default=2000, help="check calls per timed batch (median of --repeats batches)")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--name", default="predict_check_cost")
    args = parser.parse_args(argv)
    logging.getLogger("hrad").setLevel(logging.WARNING)  # the fits' progress lines
    load_before = os.getloadavg()[0]
    rows = [row for setup in args.setups for row in measure(setup, SETUPS[setup], args.size, args.repeats, args.check_calls)]
    notes = (
        "Per-image warning checks of AnomalyModel.predict (scale: _tell_scale; colour: _tell_colour), which hrad serve "
        "runs on every request, against the whole predict of the same image in the same process: tiny-cnn backbone, "
        f"PatchCore, fitted on 6 synthetic colour gravel images of {int(args.size * 1.5)}x{args.size}, 8-bit. predict_ms: "
        f"median of {args.repeats} predicts after a warm-up; checks: median over {args.repeats} batches of the mean of "
        f"{args.check_calls} calls, inside collecting_warnings as a served request. checks_share_percent = (scale + "
        "colour) / predict. tiny-cnn (hrad's test backbone) on small images predicts far faster than a real model, so "
        "the share is an upper bound of the checks' share in a real model's predict. One run, at nice 19 on a shared "
        f"{os.cpu_count()}-CPU machine (1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)."
    )
    write_results(args.name, rows, notes, ["setup", "image", "predict_ms", "scale_check_us", "colour_check_us", "checks_share_percent"])


if __name__ == "__main__":
    main()
