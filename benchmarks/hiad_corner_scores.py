"""HiAD's image AUROC with corner-aware border ratios at the low branch, at the returned map, or both.

Per texture one HiAD model is fitted (PatchCore on efficientnet-lite0, the demo's bank; SCA with
4 detectors, 512-pixel patches, low branch at 512; otherwise hrad's defaults), then for each
``low`` setting (``strategy.low_border_corners`` off / on: the low branch's ratios by the distance
to the nearest side, or the 2-D table of :meth:`hrad.postprocess.border.BorderProfile.corner_ratios`)
the same detectors are calibrated again on the fit's held-out images (``AnomalyModel.calibrate``).
Each test image is predicted once per ``low`` setting; its returned (fused) map is then finished
as the model does (:func:`hrad.postprocess.smoothing.smooth_and_score`: border division, sigma-4
blur, HiAD's pooled score) with the returned map's ratios learned on the held-out good images'
fused maps by either rule (``map`` nearest: what hrad's model learns, ``thresholds.border_ratios``;
``map`` corners: the 2-D table from the same maps). Columns: ``image_auroc``; ``good_over_defect``
the good test images that outrank at least one defective one; ``corner_peaks`` how many of those
have their pooled peak within ``--near`` pixels of two sides (a corner).

    PYTHONPATH=. python benchmarks/hiad_corner_scores.py --textures gravel brick grass
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.common import (
    add_texture_and_capsules_arguments,
    texture_and_capsules,
    texture_and_capsules_notes,
    write_results,
)
from benchmarks.hiad_border_corners import fit_sca4
from hrad.data.images import read_image
from hrad.metrics import image_metrics
from hrad.postprocess.border import BorderProfile
from hrad.postprocess.smoothing import smooth_and_score
from hrad.strategies.hiad import HiAD

DETECTOR = {"name": "patchcore", "max_fit_patches": 60000, "max_bank_size": 6000}
COLUMNS = ["dataset", "low", "map", "image_auroc", "good_over_defect", "corner_peaks", "map_corner0", "map_edge0"]


def pooled_peak(finished: np.ndarray, pool: int) -> tuple[int, int]:
    """Centre of the ``pool x pool`` window with the largest mean (HiAD's score window)."""
    averaged = cv2.blur(finished.astype(np.float32), (pool, pool), borderType=cv2.BORDER_REPLICATE)
    start = pool // 2
    valid = averaged[start : start + finished.shape[0] - pool + 1, start : start + finished.shape[1] - pool + 1]
    y, x = np.unravel_index(int(valid.argmax()), valid.shape)
    return int(y) + start, int(x) + start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_texture_and_capsules_arguments(parser)
    parser.add_argument("--near", type=int, default=48, help="a peak this close to two sides is a corner peak (pixels)")
    parser.add_argument("--out", default="hiad_corner_scores")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for name, train, test in texture_and_capsules(args, Path(work)):
            model, held = fit_sca4(name, train)
            hiad = model.strategy
            assert isinstance(hiad, HiAD)
            labels = np.asarray([sample.label for sample in test])
            for low in (False, True):
                hiad.config = hiad.config.model_copy(update={"low_border_corners": low})
                model.calibrate(held)
                profile = BorderProfile()
                for index in range(len(held)):
                    profile.update(hiad.predict(held[index]).anomaly_map)
                rules = {"nearest": model.border_ratios, "corners": profile.corner_ratios()}
                scores: dict[str, list[float]] = {rule: [] for rule in rules}
                peaks: dict[str, list[tuple[int, int]]] = {rule: [] for rule in rules}
                for sample in test:
                    result = hiad.predict(read_image(sample.path))
                    for rule, ratios in rules.items():
                        finished, score = smooth_and_score(result.anomaly_map.copy(), result.score, model.config.postprocess, ratios, None, hiad.map_score)  # type: ignore[arg-type]
                        scores[rule].append(score)
                        peaks[rule].append(pooled_peak(finished, hiad.config.score_pool))
                height, width = read_image(test[0].path).shape[:2]
                for rule, values in scores.items():
                    pooled = np.asarray(values)
                    defects = pooled[labels == 1]
                    offenders = [i for i in np.flatnonzero(labels == 0) if (pooled[i] > defects).any()]
                    corner = 0
                    for i in offenders:
                        y, x = peaks[rule][i]
                        corner += int(min(y, height - 1 - y) < args.near and min(x, width - 1 - x) < args.near)
                    ratios = rules[rule]
                    table = None if ratios is None else np.asarray(ratios)
                    row = {
                        "dataset": name, "low": "corners" if low else "nearest", "map": rule,
                        "image_auroc": round(image_metrics(pooled, labels)["image_auroc"], 3),
                        "good_over_defect": f"{len(offenders)}/{int((labels == 0).sum())}", "corner_peaks": corner,
                        "map_corner0": "none" if table is None else round(float(table.flat[0]), 3),
                        "map_edge0": "none" if table is None else round(float(table[0] if table.ndim == 1 else table[0, -1]), 3),
                    }  # fmt: skip
                    rows.append(row)
                    print(row, flush=True)
    notes = (
        "HiAD (PatchCore on efficientnet-lite0, the demo's bank: max_fit_patches 60000, max_bank_size 6000; SCA with 4 "
        "detectors, 512-pixel patches, low branch at 512 px, hrad's other defaults), 20% of the training images held out "
        "for calibration and thresholds; one run, seed 0. `low`: the low branch's border ratios by the nearest side or "
        "the 2-D corner table (same fitted detectors, calibrated again); `map`: the returned map's border ratios, learned "
        "on the same held-out images, by either rule. `map_corner0` / `map_edge0`: the returned map's ratio at the corner "
        "pixel and at an edge middle's border pixel. "
        f"{texture_and_capsules_notes(args)} See the script's docstring."
    )
    write_results(args.out, rows, notes, COLUMNS)


if __name__ == "__main__":
    main()
