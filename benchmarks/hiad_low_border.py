"""HiAD's low branch divided by its own border ratios (``strategy.low_border_calibration``) or not;
with ``--toggle balance_branches``, the branches balanced on their good images' peaks or not; with
``--toggle low_border_corners``, the low branch's ratios by (row, column) distance (corners divided
by both sides' profiles) or by the distance to the nearest side.

Per dataset and pool (A2O, SCA with 4 detectors) one HiAD model is fitted (PatchCore on
efficientnet-lite0, the demo's bank; 512-pixel patches, low branch at 512), calibrated with
the low branch's border calibration on (the default; ``--toggle``: that HiAD option on), and every
test image predicted; then the same fitted detectors are calibrated again on the same held-out
images with it off
(``AnomalyModel.calibrate``: strategy calibration, thresholds and the returned map's border
ratios all learned again) and the test images predicted again. Image AUROC of the model's score,
pixel AUROC and AUPRO@30 (hrad's exact streaming metrics) of its map, per setting; also the low
branch's ratio at the image border (an edge middle's) and how many low-map cells it corrects,
its ratio at the corner cell, and the returned map's own border ratio (the one learned after the
branches' max) in each setting. ``--pools`` picks the pools; ``--set KEY=VALUE`` sets other HiAD
fields (YAML values) in both settings. ``--seed`` (default 0, every results file before it) seeds the
data and the fit: the demo textures' generation, capsules' training and test subsets
(``benchmarks.common.subset``: seed 0 the first training images by name, others a seeded draw), and
the model's, detector's and HiAD's seeds (held-out split, torch, PatchCore's patch sample and
projection, the pool assignment's KMeans and the pseudo-anomalies).

    PYTHONPATH=. python benchmarks/hiad_low_border.py --textures gravel brick grass --capsules-train 30 --capsules-test 30
    PYTHONPATH=. python benchmarks/hiad_low_border.py --toggle balance_branches --out hiad_branch_balance
    PYTHONPATH=. python benchmarks/hiad_low_border.py --toggle low_border_corners --pools sca-4 --out hiad_low_border_corners
    PYTHONPATH=. python benchmarks/hiad_low_border.py --toggle balance_branches --seed 1 --out hiad_branch_balance_corners_seed1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
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
from hrad.postprocess.border import ratio_table
from hrad.strategies.hiad import HiAD

DETECTOR = {"name": "patchcore", "max_fit_patches": 60000, "max_bank_size": 6000}
POOLS = {"a2o": {"assignment": "a2o"}, "sca-4": {"assignment": "sca", "num_detectors": 4}}
COLUMNS = ["dataset", "pool", "setting", "image_auroc", "pixel_auroc", "aupro_30", "low_ratio0", "low_corner0", "low_cells", "map_ratio0"]


def evaluate(model: AnomalyModel, test: list[Sample]) -> dict[str, float]:
    """Image AUROC of the model's scores, pixel AUROC and AUPRO@30 of its maps."""
    pixels = PixelMetrics()
    scores, labels = [], []
    for sample in test:
        image = read_image(sample.path)
        prediction = model.predict(image)
        scores.append(prediction.score)
        labels.append(sample.label)
        mask = sample.load_mask(image.shape[:2])
        pixels.add(prediction.anomaly_map, mask if mask.any() else None)
    result = pixels.result()
    return {
        "image_auroc": round(image_metrics(np.asarray(scores), np.asarray(labels))["image_auroc"], 3),
        "pixel_auroc": round(result["pixel_auroc"], 4),
        "aupro_30": round(result["aupro_30"], 4),
    }


def ratios_row(model: AnomalyModel) -> dict[str, Any]:
    strategy = model.strategy
    assert isinstance(strategy, HiAD)
    low, fused = strategy.low_border_ratios, model.border_ratios
    table = ratio_table(low) if low is not None and len(low) else None  # a 1-D list: its min-distance table
    return {
        "low_ratio0": round(float(table[0, -1]), 3) if table is not None else "none",
        "low_corner0": round(float(table[0, 0]), 3) if table is not None else "none",
        "low_cells": table.shape[0] - 1 if table is not None else 0,
        "map_ratio0": round(fused[0], 3) if fused else "none",
    }


def notes(args: argparse.Namespace, extra: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results header: the setup, the datasets with rows so far, and whether every fit asked for ran."""
    names = {row["dataset"] for row in rows}
    ran = argparse.Namespace(**{
        **vars(args),
        "textures": [texture for texture in args.textures if f"demo {texture}" in names],
        "capsules_train": args.capsules_train if "VisA capsules" in names else 0,
    })  # fmt: skip
    fits = len({(row["dataset"], row["pool"]) for row in rows})
    wanted = (len(args.textures) + bool(args.capsules_train)) * len(args.pools)
    progress = "" if fits == wanted else f"Incomplete: {fits} of the command's {wanted} (dataset, pool) fits ran. "
    return (
        f"{progress}HiAD (PatchCore on efficientnet-lite0, the demo's bank: max_fit_patches 60000, max_bank_size 6000; 512-pixel "
        f"patches, low branch at 512 px{', ' + str(extra) if extra else ''}), 20% of the training images held out for "
        f"calibration and thresholds; one run, seed {args.seed} (data, the model's, detector's and HiAD's seeds). `setting`: {args.toggle} on (low_border_calibration: the low branch's map divided by its own border "
        "ratios before the branches' max; balance_branches: the branch whose held-out good images peak higher has its "
        "min-max range widened until both branches' mean peaks agree; low_border_corners: the low branch's ratios a "
        "table by (row, column) distance from the border, the two edge profiles' excesses added, instead of by the "
        "distance to the nearest side), then off: the same fitted detectors calibrated "
        "again on the same held-out images without it. "
        "`low_ratio0` / `low_corner0` / `low_cells`: the low branch's ratio at the image border (an edge middle's), at "
        "its corner cell, and the depth in low-map cells it corrects; "
        "`map_ratio0`: the returned map's own border ratio at the border (learned after the max). "
        f"{texture_and_capsules_notes(ran, args.seed)} See the script's docstring."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_texture_and_capsules_arguments(parser)
    parser.add_argument("--toggle", default="low_border_calibration", choices=["low_border_calibration", "balance_branches", "low_border_corners"])
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other hiad strategy fields (yaml values)")
    parser.add_argument("--seed", type=int, default=0, help="data subsets, demo textures and the fits' seeds")
    parser.add_argument("--out", default="hiad_low_border")
    args = parser.parse_args()
    import yaml

    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for name, train, test in texture_and_capsules(args, Path(work), seed=args.seed):
            for pool in args.pools:
                strategy = {"name": "hiad", "patch_size": 512, "seed": args.seed, **POOLS[pool], **extra, args.toggle: True}
                detector = {**DETECTOR, "seed": args.seed}
                config = load_config(None, {"backbone": {"name": "efficientnet-lite0"}, "detector": detector, "strategy": strategy, "seed": args.seed})
                print(f"[{name} {pool}] fitting on {len(train)} images ...", file=sys.stderr, flush=True)
                model = AnomalyModel(config).fit(ImageList(train))
                _, held = model._split(ImageList(train))  # the fit's own held-out images
                assert held is not None and isinstance(model.strategy, HiAD)
                for setting in (True, False):
                    hiad = model.strategy
                    if hiad.config.model_dump()[args.toggle] != setting:  # same detectors, calibrated again
                        hiad.config = hiad.config.model_copy(update={args.toggle: setting})
                        model.calibrate(held)
                    row = {"dataset": name, "pool": pool, "setting": f"{args.toggle} {'on' if setting else 'off'}"}
                    row.update(evaluate(model, test))
                    row.update(ratios_row(model))
                    rows.append(row)
                    print(row, flush=True)
                write_results(args.out, rows, notes(args, extra, rows), COLUMNS)  # a stopped run keeps its rows


if __name__ == "__main__":
    main()
