"""Why HiAD's image score trails plain tiling: the HiAD model taken apart on its own fitted detectors.

For each dataset a tiled-512 model (one PatchCore over every tile) and HiAD models (``--assignments``,
default SCA with ``--detectors`` and A2O, one detector for every patch) are fitted on the same
images. HiAD runs with ``return_branch_maps``, so each test image is predicted once and its
calibrated high-branch map, low-branch map and their maximum (the fused map HiAD returns) are
finished by hrad's post-processing without (``border off``) and with (``on``, the default) the
model's border ratios. Each finished map is scored three ways: ``scaled`` (for the fused / tiled
map: the strategy's own score scaled by what the border calibration took off the map's peak,
``smooth_and_score`` without ``map_score``: what hrad returned for HiAD before it rescored the
finished map, and what it returns for tiled), ``pooled`` (HiAD's reference rule on the finished
map: max of the 16 x 16 average-pooled sigma-4 map; hrad's HiAD score since it rescores) and
``max`` (the finished map's maximum).

Columns: ``image_auroc_<rule>``; for the pooled rule, ``good_over_defect`` the good test images
that outrank at least one defective one, and where their pooled peak (the centre of the
16 x 16 window) lies: ``on_border`` within 24 px of the image border, ``on_seam`` within 24 px of
a patch seam, ``by_detector`` which pool detector's patch (``low`` when the low branch is the
larger of the two at the peak; tiled: ``-``). The second table: each HiAD detector's calibration
range (min, max of its held-out maps with pseudo-anomalies), its training patches, and the mean
over good and over defective test images of the largest calibrated value in its patches.
``<out>.png``: per HiAD model, the good test image that outranks the most defective ones and
the defective image it outranks with the lowest score, finished maps on one colour scale,
patch seams dashed, the pooled peak circled.

    PYTHONPATH=. python benchmarks/hiad_image_score.py --textures grass --capsules-train 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
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
from hrad.metrics import image_metrics
from hrad.model import AnomalyModel
from hrad.postprocess.border import calibrate_border
from hrad.postprocess.smoothing import gaussian_smooth, smooth_and_score
from hrad.tile_geometry import TileGeometry

#: the demo's detector settings (hrad.cli.demo.DEMO_DETECTOR), as the calibration benchmarks
DETECTOR = {"name": "patchcore", "max_fit_patches": 60_000, "max_bank_size": 6_000}
#: pooling window of HiAD's image score, and how near a peak must lie to a border or seam to count
POOL = 16
NEAR = 24
SIDES = ("off", "on")


def pooled_peak(finished: np.ndarray, pool: int = POOL) -> tuple[float, tuple[int, int]]:
    """HiAD's image score (max of the ``pool x pool`` average-pooled map, windows inside the map)
    and the centre pixel of the window that has it."""
    averaged = cv2.blur(finished.astype(np.float32), (pool, pool), borderType=cv2.BORDER_REPLICATE)
    start = pool // 2
    valid = averaged[start : start + finished.shape[0] - pool + 1, start : start + finished.shape[1] - pool + 1]
    y, x = np.unravel_index(int(valid.argmax()), valid.shape)
    return float(valid[y, x]), (int(y) + start, int(x) + start)


@dataclass
class Variant:
    """One map variant of one model: per test image its scores, peak, and where the peak lies."""

    scores: dict[str, list[float]] = field(default_factory=lambda: {"scaled": [], "pooled": [], "max": []})
    peaks: list[tuple[int, int]] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)  # finished maps, kept for the figure (fused, on)


def finish(raw: np.ndarray, ratios: list[float] | None, sigma: float) -> np.ndarray:
    out = np.array(raw, dtype=np.float32, copy=True)
    if ratios:
        calibrate_border(out, ratios)
    return gaussian_smooth(out, sigma, in_place=True)


def fit(name: str, strategy: dict[str, Any], train: list[Path], backbone: str) -> AnomalyModel:
    config = load_config(None, {"backbone": {"name": backbone}, "detector": DETECTOR, "strategy": strategy})
    print(f"[{name}] fitting on {len(train)} images ...", file=sys.stderr, flush=True)
    return AnomalyModel(config).fit(ImageList(train))


def analyse(
    dataset: str, setup: str, model: AnomalyModel, test: list[Sample], patch: int, figures: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the main table (per variant and border side) and of the detector table (HiAD)."""
    hiad = model.config.strategy.name == "hiad"
    ratios = model.thresholds.border_ratios if model.thresholds else None
    postprocess = model.config.postprocess
    names = ["fused", "high", "low"] if hiad else ["map"]
    variants = {(name, side): Variant() for name in names for side in SIDES}
    labels: list[int] = []
    detector_max: dict[str, dict[int, list[float]]] = {}
    for sample in test:
        image = read_image(sample.path)
        result = model.strategy.predict(image)
        labels.append(sample.label)
        geometry = TileGeometry.square(image.shape[0], image.shape[1], patch)
        owner_grid = np.zeros(image.shape[:2], dtype=np.int64)  # position index of each pixel
        for position in geometry.positions():
            owner_grid[position.y : position.y + patch, position.x : position.x + patch] = position.index
        raw = {"map": result.anomaly_map}
        detectors = np.zeros(len(geometry), dtype=np.int64)
        if hiad:
            detectors = result.extras["patch_detectors"].reshape(-1)
            raw = {"fused": result.anomaly_map, "high": result.extras["high_map"], "low": result.extras["low_map"]}
            for m in np.unique(detectors):
                inside = np.isin(owner_grid, np.flatnonzero(detectors == m))
                detector_max.setdefault(f"high.{int(m)}", {0: [], 1: []})[sample.label].append(float(raw["high"][inside].max()))
            detector_max.setdefault("low", {0: [], 1: []})[sample.label].append(float(raw["low"].max()))
        for name in names:
            for side in SIDES:
                side_ratios = ratios if side == "on" else None
                variant = variants[(name, side)]
                finished = finish(raw[name], side_ratios, postprocess.sigma)
                score, peak = pooled_peak(finished)
                variant.scores["pooled"].append(score)
                variant.scores["max"].append(float(finished.max()))
                if name in ("fused", "map"):  # the strategy's score scaled by the border calibration
                    _, scaled = smooth_and_score(raw[name].copy(), result.score, postprocess, side_ratios)
                    variant.scores["scaled"].append(scaled)
                    if side == "on":
                        variant.maps.append(finished)
                variant.peaks.append(peak)
                owner = "-"
                if hiad:
                    at = peak
                    owner = "low" if name == "low" or (name == "fused" and raw["low"][at] > raw["high"][at]) else str(int(detectors[owner_grid[at]]))
                variant.owners.append(owner)
    label_array = np.asarray(labels)
    height, width = image.shape[:2]
    seams_y, seams_x = TileGeometry.square(height, width, patch).seams()
    rows = []
    for (name, side), variant in variants.items():
        row: dict[str, Any] = {"dataset": dataset, "setup": setup, "map": name, "border": side}
        for rule, values in variant.scores.items():
            row[f"image_auroc_{rule}"] = image_metrics(np.asarray(values), label_array)["image_auroc"] if values else float("nan")
        pooled = np.asarray(variant.scores["pooled"])
        defect_scores = pooled[label_array == 1]
        offenders = [i for i in np.flatnonzero(label_array == 0) if (pooled[i] > defect_scores).any()]
        on_border = on_seam = 0
        owners: dict[str, int] = {}
        for i in offenders:
            y, x = variant.peaks[i]
            on_border += int(min(y, x, height - 1 - y, width - 1 - x) < NEAR)
            on_seam += int(any(abs(y - s) < NEAR for s in seams_y) or any(abs(x - s) < NEAR for s in seams_x))
            owners[variant.owners[i]] = owners.get(variant.owners[i], 0) + 1
        row["good_over_defect"] = f"{len(offenders)}/{int((label_array == 0).sum())}"
        row["on_border"] = on_border
        row["on_seam"] = on_seam
        row["by_detector"] = " ".join(f"{k}:{v}" for k, v in sorted(owners.items())) or "-"
        row["n_test"] = len(test)
        rows.append(row)
        if variant.maps and (name, side) in (("fused", "on"), ("map", "on")) and offenders:
            worst = max(offenders, key=lambda i: int((pooled[i] > defect_scores).sum()))
            beaten = [i for i in np.flatnonzero(label_array == 1) if pooled[i] < pooled[worst]]
            lowest = min(beaten, key=lambda i: pooled[i])
            figures.append({
                "title": f"{dataset}, {setup}",
                "good": variant.maps[worst], "good_peak": variant.peaks[worst], "good_score": pooled[worst],
                "good_name": test[worst].path.name, "beaten": len(beaten),
                "defect": variant.maps[lowest], "defect_peak": variant.peaks[lowest], "defect_score": pooled[lowest],
                "defect_name": test[lowest].path.name, "mask": test[lowest].load_mask((height, width)),
                "seams": (seams_y, seams_x),
            })
    detector_rows = []
    if hiad:
        calibration = model.strategy.calibration  # type: ignore[attr-defined]
        assignment = model.strategy._assignment  # type: ignore[attr-defined]
        for key, values in sorted(detector_max.items()):
            low, high = calibration.range(key)
            positions = int((assignment.position_labels == int(key.split(".")[1])).sum()) if key != "low" and assignment.position_labels is not None else 1
            detector_rows.append({
                "dataset": dataset, "setup": setup, "detector": key, "cal_min": low, "cal_max": high,
                "positions": positions,
                "good_max_mean": float(np.mean(values[0])), "defect_max_mean": float(np.mean(values[1])),
            })
    return rows, detector_rows


def plot(figures: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(figures), 2, figsize=(8, 4 * len(figures)), squeeze=False)
    for row, item in zip(axes, figures, strict=True):
        low = float(min(item["good"].min(), item["defect"].min()))
        high = float(max(item["good"].max(), item["defect"].max()))
        for ax, kind in zip(row, ("good", "defect"), strict=True):
            ax.imshow(item[kind], cmap="inferno", vmin=low, vmax=high)
            for s in item["seams"][0]:
                ax.axhline(s, color="white", linestyle="--", linewidth=0.6)
            for s in item["seams"][1]:
                ax.axvline(s, color="white", linestyle="--", linewidth=0.6)
            y, x = item[f"{kind}_peak"]
            ax.add_patch(plt.Circle((x, y), 28, fill=False, color="cyan", linewidth=1.5))
            if kind == "defect":
                ax.contour(item["mask"], levels=[0.5], colors="lime", linewidths=0.6)
                text = f"lowest defect it outranks: {item['defect_name']}\nscore {item['defect_score']:.3f}"
            else:
                text = f"{item['title']}: good {item['good_name']}\nscore {item['good_score']:.3f}, outranks {item['beaten']} defects"
            ax.set_title(text, fontsize=8)
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=70)
    plt.close(figure)
    from PIL import Image

    with Image.open(path) as picture:  # 256 colours: a third of the file, the heat maps look the same
        quantized = picture.convert("RGB").quantize(256)
    quantized.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_texture_and_capsules_arguments(parser)
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--detectors", type=int, default=4, help="SCA pool size (HiAD's default 4)")
    parser.add_argument("--assignments", nargs="+", default=["sca", "a2o"])
    parser.add_argument("--no-tiled", action="store_true", help="skip the tiled-512 reference")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra hiad strategy fields (yaml values)")
    parser.add_argument("--out", default="hiad_image_score")
    args = parser.parse_args()
    import yaml

    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    notes = (
        f"PatchCore on {args.backbone} (the demo's bank: max_fit_patches 60000, max_bank_size 6000); tiled-512 and HiAD "
        f"({args.patch}-pixel patches, low branch on, SCA with {args.detectors} detectors or A2O{', ' + str(extra) if extra else ''}), "
        "20% of the training images held out for the calibration and thresholds; one run, seed 0. Each test image "
        "is predicted once; its maps are finished without and with the border ratios. "
        f"{texture_and_capsules_notes(args)} See the script's docstring for the columns."
    )
    columns = [
        "dataset", "setup", "map", "border", "image_auroc_scaled", "image_auroc_pooled", "image_auroc_max",
        "good_over_defect", "on_border", "on_seam", "by_detector",
    ]
    detector_columns = ["dataset", "setup", "detector", "cal_min", "cal_max", "positions", "good_max_mean", "defect_max_mean"]
    rows: list[dict[str, Any]] = []
    detector_rows: list[dict[str, Any]] = []
    figures: list[dict[str, Any]] = []
    setups: dict[str, dict[str, Any]] = {} if args.no_tiled else {"tiled-512": {"name": "tiled", "tile": args.patch}}
    for kind in args.assignments:
        strategy = {"name": "hiad", "patch_size": args.patch, "assignment": kind, "num_detectors": args.detectors, "return_branch_maps": True, **extra}
        setups[f"hiad-{kind}" + (f"-{args.detectors}" if kind in ("sca", "na", "ra") else "")] = strategy
    with tempfile.TemporaryDirectory(prefix="hrad_hiad_image_score_") as work:
        for name, train, test in texture_and_capsules(args, Path(work)):
            for setup, strategy in setups.items():
                model = fit(f"{name} {setup}", strategy, train, args.backbone)
                new_rows, new_detectors = analyse(name, setup, model, test, args.patch, figures)
                rows.extend(new_rows)
                detector_rows.extend(new_detectors)
                for row in new_rows:
                    print(f"[{name} {setup} {row['map']} {row['border']}] " + ", ".join(f"{k}={row[k]}" for k in columns[4:]), file=sys.stderr, flush=True)
                write_results(args.out, rows, notes, columns=columns)
                path = RESULTS / f"{args.out}.md"
                from hrad.reports.markdown import table

                path.write_text(path.read_text() + "\n## HiAD detectors\n\n" + table(detector_rows, detector_columns))
                plot(figures, RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    main()
