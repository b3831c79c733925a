"""Image-border calibration on and off, on the same fitted models and the same maps.

Every map a model makes has a frame along the image border where features saw padding
(:mod:`hrad.postprocess.border`). For each dataset and setup one model is fitted (which learns
the border ratios from its held-out normal images) and every test image is predicted once by
the strategy; the raw map is then finished twice by :func:`~hrad.postprocess.smoothing.smooth_and_score`,
without the ratios (``off``, hrad before the calibration) and with them (``on``, the default),
and both are scored with the same metrics (pixel metrics exact at full resolution).

Datasets: hrad's synthetic demo textures (``make_demo_dataset``: gravel is what ``hrad demo``
uses, brick and grass are the other two; defect-free training images, scratches, spots, cracks
and stains in the test set) at ``--size``, and VisA capsules (objects in the middle of a dark
frame: the calibration should find little there). Columns: ``border_over_inner`` is the mean
normal-pixel value within 8 px of the image border over the mean at least 64 px inside (1 =
no frame); ``normal_max_on_border`` the share of good test images whose map maximum lies within
8 px of the border. ``<out>.png``: for each dataset and setup, the learned ratio against the
distance from the border, and the first good test image's map without and with the calibration
(one colour scale per row, so the frame shows as it is).

    PYTHONPATH=. python benchmarks/border_calibration.py --textures gravel brick grass --size 1024 \
        --capsules-train 0
    PYTHONPATH=. python benchmarks/border_calibration.py --textures --capsules-train 30 --capsules-test 30 \
        --out border_calibration_capsules
    PYTHONPATH=. python benchmarks/border_calibration.py --textures gravel --size 1024 --capsules-train 30 \
        --capsules-test 30 --setups ensemble-512 hiad-512 --out border_calibration_pools
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS,
    add_texture_and_capsules_arguments,
    texture_and_capsules,
    texture_and_capsules_notes,
    write_results,
)
from hrad.config import load_config
from hrad.data.datasets import Sample
from hrad.data.images import ImageList, read_image
from hrad.metrics import PixelMetrics, image_metrics
from hrad.model import AnomalyModel
from hrad.postprocess.smoothing import smooth_and_score

#: the demo's detector settings (hrad.cli.demo.DEMO_DETECTOR): a smaller bank, a few minutes on 2 cores
DETECTOR = {"name": "patchcore", "max_fit_patches": 60_000, "max_bank_size": 6_000}
SETUPS = {
    "tiled-512": {"name": "tiled", "tile": 512},
    "down-512": {"name": "downsample", "image_size": 512},
    "ensemble-512": {"name": "tiled-ensemble", "tile": 512},
    "hiad-512": {"name": "hiad", "patch_size": 512},
}


def border_distance(height: int, width: int) -> np.ndarray:
    rows = np.minimum(np.arange(height), height - 1 - np.arange(height))[:, None]
    cols = np.minimum(np.arange(width), width - 1 - np.arange(width))[None, :]
    return np.minimum(rows, cols)


#: per dataset and setup: the learned ratios and the first good test image's map off and on (for the figure)
Example = tuple[str, list[float] | None, np.ndarray, np.ndarray]


def run(
    dataset_name: str, setup: str, train: list[Path], test: list[Sample], backbone: str, examples: list[Example]
) -> list[dict[str, Any]]:
    config = load_config(None, {"backbone": {"name": backbone}, "detector": DETECTOR, "strategy": SETUPS[setup]})
    print(f"[{dataset_name} {setup}] fitting on {len(train)} images ...", file=sys.stderr, flush=True)
    model = AnomalyModel(config).fit(ImageList(train))
    ratios = model.thresholds.border_ratios if model.thresholds else None
    sides = {"off": None, "on": ratios}
    pixel = {side: PixelMetrics() for side in sides}
    scores: dict[str, list[float]] = {side: [] for side in sides}
    border = {side: [0.0, 0, 0.0, 0] for side in sides}  # near sum, near count, inner sum, inner count
    max_on_border = {side: 0 for side in sides}
    labels: list[int] = []
    example: dict[str, np.ndarray] = {}
    for sample in test:
        image = read_image(sample.path)
        result = model.strategy.predict(image)
        mask = sample.load_mask(image.shape[:2])
        distance = border_distance(*image.shape[:2])
        near, inner = (distance < 8) & ~mask, (distance >= 64) & ~mask
        labels.append(sample.label)
        for side, side_ratios in sides.items():
            smoothed, score = smooth_and_score(
                result.anomaly_map.copy(), result.score, config.postprocess, side_ratios, map_score=model.strategy.map_score
            )
            pixel[side].add(smoothed, mask)
            if sample.label == 0 and len(example) < len(sides):
                example[side] = smoothed
            scores[side].append(score)
            border[side][0] += float(smoothed[near].sum())
            border[side][1] += int(near.sum())
            border[side][2] += float(smoothed[inner].sum())
            border[side][3] += int(inner.sum())
            if sample.label == 0:
                peak = np.unravel_index(int(smoothed.argmax()), smoothed.shape)
                max_on_border[side] += int(distance[peak] < 8)
    if example:
        examples.append((f"{dataset_name}, {setup}", ratios, example["off"], example["on"]))
    rows = []
    good = labels.count(0)
    for side in sides:
        metrics = {**image_metrics(np.asarray(scores[side]), np.asarray(labels)), **pixel[side].result()}
        near_sum, near_count, inner_sum, inner_count = border[side]
        rows.append({
            "dataset": dataset_name,
            "setup": setup,
            "border_calibration": side,
            **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05")},
            "border_over_inner": (near_sum / near_count) / (inner_sum / inner_count),
            "normal_max_on_border": f"{max_on_border[side]}/{good}",
            "ratio_at_border": ratios[0] if ratios else 1.0,
            "corrected_px": len(ratios) if ratios else 0,
            "n_train": len(train),
            "n_test": len(test),
        })
        print(f"[{dataset_name} {setup} {side}] " + ", ".join(f"{k}={rows[-1][k]:.3f}" for k in ("image_auroc", "pixel_ap", "aupro_30", "border_over_inner")), file=sys.stderr, flush=True)
    return rows


def plot(examples: list[Example], path: Path) -> None:
    """One row per dataset and setup: ratio by distance, then the good image's map off and on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(examples), 3, figsize=(10, 3.2 * len(examples)), squeeze=False)
    for row, (title, ratios, off, on) in zip(axes, examples, strict=True):
        row[0].plot(range(len(ratios or [])), ratios or [], color="tab:red")
        row[0].axhline(1.0, color="grey", linewidth=0.8)
        row[0].set(title=f"{title}: learned ratio", xlabel="distance from the image border (px)", ylabel="ratio")
        low, high = float(min(off.min(), on.min())), float(max(off.max(), on.max()))
        for ax, anomaly_map, side in ((row[1], off, "off"), (row[2], on, "on")):
            ax.imshow(anomaly_map, cmap="inferno", vmin=low, vmax=high)
            ax.set_title(f"good test image, calibration {side}", fontsize=9)
            ax.axis("off")
        row[0].title.set_fontsize(9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_texture_and_capsules_arguments(parser)
    parser.add_argument("--setups", nargs="+", default=["tiled-512", "down-512"], choices=list(SETUPS))
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--out", default="border_calibration")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    examples: list[Example] = []
    notes = (
        f"PatchCore on {args.backbone} (the demo's bank: max_fit_patches 60000, max_bank_size 6000), 20% of the training "
        "images held out for thresholds and the border ratios; one run. Each test image is predicted once; its raw map "
        "is finished without (off) and with (on) the model's border ratios, so the two rows of a setup differ only by the "
        f"calibration. {texture_and_capsules_notes(args)} ratio_at_border: the learned ratio at the "
        "outermost pixel ring; corrected_px: how deep the calibration reaches. border_over_inner and normal_max_on_border: "
        "see the script's docstring."
    )
    columns = ["dataset", "setup", "border_calibration", "image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05", "border_over_inner", "normal_max_on_border", "ratio_at_border", "corrected_px"]
    with tempfile.TemporaryDirectory(prefix="hrad_border_") as work:
        for name, train, test in texture_and_capsules(args, Path(work)):
            for setup in args.setups:
                rows.extend(run(name, setup, train, test, args.backbone, examples))
                write_results(args.out, rows, notes, columns=columns)
                plot(examples, RESULTS / f"{args.out}.png")

if __name__ == "__main__":
    main()
