"""Do HiAD's border corrections under-correct image corners? The good maps' border excess as a
2-D function of (distance to the nearest horizontal side, distance to the nearest vertical side).

hrad's border ratios (:mod:`hrad.postprocess.border`) were indexed by the distance to the
NEAREST side only, so a corner cell (near two sides) gets the correction of an edge-middle cell
at the same distance. Per dataset one HiAD model is fitted (PatchCore on efficientnet-lite0, the
demo's bank; SCA with 4 detectors, 512-pixel patches, low branch at 512; ``return_branch_maps``).
Three maps per image: ``low`` (the low branch's raw token-resolution map, one bin per cell),
``high`` (the calibrated high branch) and ``fused`` (the map HiAD returns, before the model's
border calibration), both at image resolution in bins of ``--bin`` pixels. On the fit's held-out
good images a :class:`BorderProfile` per map learns three corrections: ``nearest`` (1-D, by the
distance to the nearest side: hrad's rule before; for ``low`` the same ratios HiAD learns),
``product`` (the row-distance edge profile times the column-distance one) and ``sum``
(:meth:`BorderProfile.corner_ratios`: their excesses added, ``row + col - 1``). The good TEST images
(unseen by those profiles) are then binned by ``(dr, dc)``: ``dr`` a cell's distance to the
nearer of top / bottom, ``dc`` to the nearer of left / right; each bin's mean over the 1-D
profile's reference (the mean of the ring between half and all of the profiled depth), before
(``side`` ``before``) and after each correction.

Columns (``d`` < the corrected depth, in bins): ``edge_d`` the mean of the two bins at distance
``d`` from one side and at least the profiled depth from the others (edge middles);
``corner_d`` the diagonal bin ``(d, d)``; ``corner_block`` / ``edge_block`` the mean over the bins
with both / one distance under the corrected depth. On ``before`` rows, ``rms_<rule>``: how far
each rule's prediction of the corner block (from the test images' own edge profiles ``row(i)``,
``col(j)``) is from the observed bins: ``nearest`` (the mean of ``row`` and ``col`` at ``min(i,
j)``), ``product`` (``row(i) * col(j)``), ``sum`` (``row(i) + col(j) - 1``), ``max``.

    PYTHONPATH=. python benchmarks/hiad_border_corners.py --textures gravel brick grass --capsules-train 30 --capsules-test 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    add_texture_and_capsules_arguments,
    texture_and_capsules,
    texture_and_capsules_notes,
    write_results,
)
from hrad.config import load_config
from hrad.data.images import ImageList, read_image
from hrad.model import AnomalyModel
from hrad.postprocess.border import BorderProfile, calibrate_border, profile_depth
from hrad.strategies.base import ImageSource
from hrad.strategies.hiad import HiAD
from hrad.strategies.pixels import PixelImage

DETECTOR = {"name": "patchcore", "max_fit_patches": 60000, "max_bank_size": 6000}
RULES = ("nearest", "product", "sum")
COLUMNS = [
    "dataset", "map", "side", "ratios", "edge_0", "corner_0", "edge_1", "corner_1", "edge_2", "corner_2", "edge_block",
    "corner_block", "rms_nearest", "rms_product", "rms_sum", "rms_max",
]  # fmt: skip


class Profile2D:
    """Sums and counts of maps per ``(dr, dc)`` bin, distances in bins clipped to ``bins``, and
    the 1-D profile's reference ring."""

    def __init__(self, bin_size: int, bins: int) -> None:
        self.bin, self.bins = bin_size, bins
        self.sums = np.zeros((bins + 1, bins + 1))
        self.counts = np.zeros((bins + 1, bins + 1))
        self.ring_sum = 0.0
        self.ring_count = 0

    def update(self, array: np.ndarray) -> None:
        height, width = array.shape
        depth = profile_depth(height, width)
        rows = np.minimum(np.arange(height), np.arange(height)[::-1])
        cols = np.minimum(np.arange(width), np.arange(width)[::-1])
        r = np.minimum(rows // self.bin, self.bins)
        c = np.minimum(cols // self.bin, self.bins)
        index = (r[:, None] * (self.bins + 1) + c[None, :]).ravel()
        size = (self.bins + 1) ** 2
        self.sums += np.bincount(index, weights=array.ravel().astype(np.float64), minlength=size).reshape(self.sums.shape)
        self.counts += np.bincount(index, minlength=size).reshape(self.counts.shape)
        nearest = np.minimum(rows[:, None], cols[None, :])
        ring = (nearest >= depth // 2) & (nearest < depth)
        self.ring_sum += float(array[ring].sum(dtype=np.float64))
        self.ring_count += int(ring.sum())

    def relative(self) -> np.ndarray:
        """Bin means over the reference ring's mean."""
        return self.sums / self.counts / (self.ring_sum / self.ring_count)


def corrections(profile: BorderProfile) -> dict[str, Any]:
    """The three rules' ratios learned by one profile (None where it learns none)."""
    nearest, total = profile.ratios(), profile.corner_ratios()
    product = None
    if total is not None:
        table = np.asarray(total)
        k = table.shape[0] - 1
        product = (table[:, k][:, None] * table[k, :][None, :]).tolist()
    return {"nearest": nearest, "product": product, "sum": total}


def summary(rel: np.ndarray, before: np.ndarray, corrected: int, fits: bool) -> dict[str, Any]:
    """Edge-middle and corner means of ``rel`` (bins); with ``fits``, the rules' fit to ``before``'s corners."""
    deep = rel.shape[0] - 1
    row: dict[str, Any] = {}
    for d in range(3):
        row[f"edge_{d}"] = round(float((rel[d, deep] + rel[deep, d]) / 2), 3) if d < corrected else "-"
        row[f"corner_{d}"] = round(float(rel[d, d]), 3) if d < corrected else "-"
    k = max(corrected, 1)
    row["edge_block"] = round(float(np.concatenate([rel[:k, deep], rel[deep, :k]]).mean()), 3)
    row["corner_block"] = round(float(rel[:k, :k].mean()), 3)
    edge_r, edge_c = before[:k, deep], before[deep, :k]
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    predictions = {
        "nearest": (edge_r[np.minimum(i, j)] + edge_c[np.minimum(i, j)]) / 2,
        "product": edge_r[:, None] * edge_c[None, :],
        "sum": edge_r[:, None] + edge_c[None, :] - 1,
        "max": np.maximum(edge_r[:, None], edge_c[None, :]),
    }
    for name, predicted in predictions.items():
        row[f"rms_{name}"] = round(float(np.sqrt(((before[:k, :k] - predicted) ** 2).mean())), 3) if fits else "-"
    return row


def maps_of(hiad: HiAD, image: np.ndarray) -> dict[str, np.ndarray]:
    """The raw low map, the calibrated high map and the fused map of one image."""
    with torch.no_grad():
        low = hiad._low_detector().predict(hiad._embed_low(PixelImage(image, hiad.device))).maps.detach().float().cpu()[0].numpy()
    result = hiad.predict(image)
    return {"low": low, "high": result.extras["high_map"], "fused": result.anomaly_map}


def matrix(title: str, rel: np.ndarray, k: int) -> str:
    deep = rel.shape[0] - 1
    header = "| dr \\ dc | " + " | ".join(str(j) for j in range(k)) + f" | >={deep} |\n|" + "---|" * (k + 2) + "\n"
    body = "".join(
        f"| {i if i < deep else '>=' + str(deep)} | " + " | ".join(f"{rel[i, j]:.2f}" for j in [*range(k), deep]) + " |\n"
        for i in [*range(k), deep]
    )
    return f"### {title}\n\n{header}{body}"


def analyse(name: str, model: AnomalyModel, held: list[np.ndarray], good: list[np.ndarray], bin_size: int) -> tuple[list[dict[str, Any]], list[str]]:
    hiad = model.strategy
    assert isinstance(hiad, HiAD)
    profiles = {kind: BorderProfile() for kind in ("low", "high", "fused")}
    for image in held:
        for kind, array in maps_of(hiad, image).items():
            profiles[kind].update(array)
    rules = {kind: corrections(profile) for kind, profile in profiles.items()}
    measured: dict[str, dict[str, Profile2D]] = {}
    for image in good:
        for kind, array in maps_of(hiad, image).items():
            size = 1 if kind == "low" else bin_size
            sides = measured.setdefault(kind, {side: Profile2D(size, profile_depth(*array.shape) // size) for side in ("before", *RULES)})
            sides["before"].update(array)
            for rule in RULES:
                sides[rule].update(calibrate_border(np.array(array, dtype=np.float32), rules[kind][rule]))
    rows, tables = [], []
    for kind, sides in measured.items():
        size = sides["before"].bin
        nearest = rules[kind]["nearest"]
        corrected = -(-len(nearest) // size) if nearest else 0
        before = sides["before"].relative()
        for side, profile in sides.items():
            ratios = rules[kind].get(side)
            if side != "before" and ratios is None:
                continue
            described = "-" if side == "before" else (f"{len(ratios)} x {ratios[0]:.2f}.." if side == "nearest" else f"corner {ratios[0][0]:.2f}, edges {ratios[0][-1]:.2f} / {ratios[-1][0]:.2f}")
            rel = profile.relative()
            row = {"dataset": name, "map": kind, "side": side, "ratios": described, **summary(rel, before, corrected, side == "before")}
            rows.append(row)
            print(row, flush=True)
            if corrected and side in ("before", "nearest", "product", "sum"):
                unit = "cells" if kind == "low" else f"{size}-px bins"
                tables.append(matrix(f"{name}, {kind} ({unit}), {side}", rel, min(rel.shape[0] - 1, corrected + 2)))
    return rows, tables


def fit_sca4(name: str, train: list[Path], **options: Any) -> tuple[AnomalyModel, ImageSource]:
    """HiAD with an SCA pool of 4 PatchCores (the demo's bank) fitted on ``train``, and the
    fit's own held-out images."""
    strategy = {"name": "hiad", "patch_size": 512, "assignment": "sca", "num_detectors": 4, **options}
    config = load_config(None, {"backbone": {"name": "efficientnet-lite0"}, "detector": DETECTOR, "strategy": strategy})
    print(f"[{name}] fitting on {len(train)} images ...", file=sys.stderr, flush=True)
    model = AnomalyModel(config).fit(ImageList(train))
    _, held = model._split(ImageList(train))
    assert held is not None and isinstance(model.strategy, HiAD)
    return model, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_texture_and_capsules_arguments(parser)
    parser.add_argument("--bin", type=int, default=8, help="bin side in image pixels for the high and fused maps")
    parser.add_argument("--out", default="hiad_border_corners")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    tables: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        for name, train, test in texture_and_capsules(args, Path(work)):
            # the low branch divided by its 1-D ratios, as when hiad_border_corners.md was measured
            model, held_source = fit_sca4(name, train, return_branch_maps=True, low_border_corners=False)
            held = [held_source[i] for i in range(len(held_source))]
            good = [read_image(sample.path) for sample in test if sample.label == 0]
            new_rows, new_tables = analyse(f"{name} ({len(held)} held, {len(good)} test)", model, held, good, args.bin)
            rows.extend(new_rows)
            tables.extend(new_tables)
    notes = (
        "HiAD (PatchCore on efficientnet-lite0, the demo's bank: max_fit_patches 60000, max_bank_size 6000; SCA with 4 "
        "detectors, 512-pixel patches, low branch at 512 px), 20% of the training images held out (they learn the "
        f"three corrections); one run, seed 0. High and fused maps in {args.bin}-pixel bins, the low map per token cell. "
        "Values: the good test images' bin mean over the 1-D profile's reference ring mean (anomalous test images are "
        f"not used). {texture_and_capsules_notes(args)} See the script's docstring for the columns."
    )
    path = write_results(args.out, rows, notes, COLUMNS)
    path.write_text(path.read_text() + "\n## 2-D profiles (good test images; rows: dr, columns: dc, in bins)\n\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
