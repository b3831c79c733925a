"""HiAD's border calibration per branch: the low branch's frame is not the fused map's.

hrad learns one set of border ratios (:mod:`hrad.postprocess.border`) on the fused map HiAD
returns, the max of the calibrated high and low branches. The low branch (the whole image at
512 px) sees padding over twice as many full-resolution pixels, and its frame is stronger than
the fused map's; after the max the fused ratios leave most of it, and good images' peaks sit
on the low branch's border (benchmarks/hiad_image_score.py). This diagnostic fits HiAD (A2O and
SCA 4, return_branch_maps) per texture, learns ratios from each branch's maps on the model's own
held-out images (the same split the fit used), and scores every test image (HiAD's pooled rule
on the sigma-4 map) four ways: ``fused_ratios`` (hrad's pipeline: the fused map with the
model's ratios), ``branch_ratios`` (each branch divided by its own ratios, then the max),
``high_own`` and ``low_own`` (one branch with its own ratios). Also printed: the ratio at the
image border and how many pixels deep each set corrects. Prints one line per model:

    PYTHONPATH=. python benchmarks/hiad_branch_border.py grass gravel
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import texture_and_capsules
from benchmarks.hiad_image_score import DETECTOR, finish, pooled_peak
from hrad.config import load_config
from hrad.data.images import ImageList, read_image
from hrad.metrics import image_metrics
from hrad.model import AnomalyModel
from hrad.postprocess.border import BorderProfile, calibrate_border


def pooled(anomaly_map: np.ndarray, ratios: list[float] | None) -> float:
    """HiAD's score of ``anomaly_map`` divided by ``ratios`` and blurred (sigma 4)."""
    return pooled_peak(finish(anomaly_map, ratios, 4.0))[0]


def main() -> None:
    args = argparse.Namespace(textures=sys.argv[1:], size=1024, demo_train=10, demo_test=10, capsules_train=0, capsules_test=0)
    with tempfile.TemporaryDirectory() as work:
        for name, train, test in texture_and_capsules(args, Path(work)):
            for kind in ("a2o", "sca"):
                strategy = {"name": "hiad", "patch_size": 512, "assignment": kind, "num_detectors": 4, "return_branch_maps": True}
                config = load_config(None, {"backbone": {"name": "efficientnet-lite0"}, "detector": DETECTOR, "strategy": strategy})
                model = AnomalyModel(config).fit(ImageList(train))
                _, held = model._split(ImageList(train))  # the fit's own held-out images
                assert held is not None
                profiles = {"high": BorderProfile(), "low": BorderProfile()}
                for i in range(len(held)):
                    result = model.strategy.predict(held[i])
                    profiles["high"].update(result.extras["high_map"])
                    profiles["low"].update(result.extras["low_map"])
                ratios = {branch: profile.ratios() for branch, profile in profiles.items()}
                fused_ratios = model.thresholds.border_ratios if model.thresholds else None
                scores: dict[str, list[float]] = {"fused_ratios": [], "branch_ratios": [], "high_own": [], "low_own": []}
                labels = []
                for sample in test:
                    result = model.strategy.predict(read_image(sample.path))
                    labels.append(sample.label)
                    high, low = result.extras["high_map"], result.extras["low_map"]
                    scores["fused_ratios"].append(pooled(np.maximum(high, low), fused_ratios))
                    high, low = high.copy(), low.copy()
                    if ratios["high"]:
                        calibrate_border(high, ratios["high"])
                    if ratios["low"]:
                        calibrate_border(low, ratios["low"])
                    scores["branch_ratios"].append(pooled(np.maximum(high, low), None))
                    scores["high_own"].append(pooled(high, None))
                    scores["low_own"].append(pooled(low, None))
                auroc = {k: round(image_metrics(np.asarray(v), np.asarray(labels))["image_auroc"], 3) for k, v in scores.items()}
                firsts = {b: (round(v[0], 3), len(v)) if v else None for b, v in ratios.items()}
                fused = (round(fused_ratios[0], 3), len(fused_ratios)) if fused_ratios else None
                print(name, kind, auroc, "ratio0", firsts, "fused", fused, flush=True)


if __name__ == "__main__":
    main()
