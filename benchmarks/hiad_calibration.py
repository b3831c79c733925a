"""HiAD's pool calibration with the paper's per-detector min-max and with the shared anomaly peak.

HiAD maps each pool detector's scores to [0, 1] by the min and max of its maps on held-out
good images and copies of them with pasted pseudo-anomalies. With few held-out images a
detector's patches may get no pseudo-anomaly: its max is then its largest *normal* score, and
min-max lifts its normal maps to where the other detectors put anomalies
(:meth:`~hrad.postprocess.calibration.MinMaxCalibration.complete_pool`). For each dataset two
HiAD models are fitted with the same seed (so the same detectors: checked) that differ only in
``strategy.shared_anomaly_peak``: ``paper`` (each detector's own max) and ``shared`` (a detector
no pseudo-anomaly reached takes the largest max of those one reached; hrad's default).

Columns: ``lifted``, the detectors whose max the shared rule raised (no pseudo-anomaly reached them);
``max_spread``, the largest over the smallest high-branch calibration max (1 = one scale);
the metrics of the final map (after hrad's post-processing), exact at full resolution;
``normal_max_high_over_low``, over the good test images, the mean of the map's maximum over
its median. ``<out>.png``: per dataset the calibration maxima per detector under both rules and
the first good test image's final map under each (one colour scale per row).

    PYTHONPATH=. python benchmarks/hiad_calibration.py --textures gravel brick grass --size 1024 \
        --capsules-train 30 --capsules-test 30
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

#: the demo's detector settings (hrad.cli.demo.DEMO_DETECTOR): a smaller bank, a few minutes on 2 cores
DETECTOR = {"name": "patchcore", "max_fit_patches": 60_000, "max_bank_size": 6_000}
RULES = {"paper": False, "shared": True}

#: per dataset: detector names, each rule's calibration maxima, and the first good map per rule
Example = tuple[str, list[str], dict[str, list[float]], dict[str, np.ndarray]]


def high_maxima(model: AnomalyModel) -> dict[str, float]:
    calibration = model.strategy.calibration  # type: ignore[attr-defined]
    return {name: calibration.range(name)[1] for name in calibration.names() if name.startswith("high.")}


def pool_state(model: AnomalyModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.strategy.state_dict().items() if k.startswith(("high.", "low.", "assignment."))}


def run(
    dataset_name: str, train: list[Path], test: list[Sample], args: argparse.Namespace, examples: list[Example]
) -> list[dict[str, Any]]:
    models: dict[str, AnomalyModel] = {}
    for rule, shared in RULES.items():
        strategy = {"name": "hiad", "patch_size": args.patch, "num_detectors": args.detectors, "shared_anomaly_peak": shared}
        config = load_config(None, {"backbone": {"name": args.backbone}, "detector": DETECTOR, "strategy": strategy})
        print(f"[{dataset_name} {rule}] fitting on {len(train)} images ...", file=sys.stderr, flush=True)
        models[rule] = AnomalyModel(config).fit(ImageList(train))
    first, second = (pool_state(m) for m in models.values())
    same = first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    maxima = {rule: high_maxima(model) for rule, model in models.items()}
    paper, shared = maxima["paper"], maxima["shared"]
    lifted = [name for name in paper if shared[name] > paper[name]]
    rows = []
    example: dict[str, np.ndarray] = {}
    for rule, model in models.items():
        pixel = PixelMetrics()
        scores, labels, peak_ratio = [], [], []
        for sample in test:
            image = read_image(sample.path)
            result = model.predict(image)
            mask = sample.load_mask(image.shape[:2])
            pixel.add(result.anomaly_map, mask)
            scores.append(result.score)
            labels.append(sample.label)
            if sample.label == 0:
                peak_ratio.append(float(result.anomaly_map.max() / max(np.median(result.anomaly_map), 1e-12)))
                example.setdefault(rule, result.anomaly_map)
        metrics = {**image_metrics(np.asarray(scores), np.asarray(labels)), **pixel.result()}
        values = list(maxima[rule].values())
        rows.append({
            "dataset": dataset_name,
            "rule": rule,
            **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05")},
            "lifted": f"{len(lifted)}/{len(paper)}",
            "max_spread": max(values) / min(values),
            "normal_max_high_over_low": float(np.mean(peak_ratio)),
            "same_detectors": "yes" if same else "NO",
            "n_train": len(train),
            "n_test": len(test),
        })
        print(f"[{dataset_name} {rule}] " + ", ".join(f"{k}={rows[-1][k]:.3f}" for k in ("image_auroc", "pixel_ap", "aupro_30", "max_spread")), file=sys.stderr, flush=True)
    examples.append((dataset_name, list(paper), {rule: list(m.values()) for rule, m in maxima.items()}, example))
    return rows


def plot(examples: list[Example], path: Path) -> None:
    """One row per dataset: calibration maxima per detector under both rules, then a good map under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(examples), 3, figsize=(10, 3.2 * len(examples)), squeeze=False)
    for row, (title, names, maxima, maps) in zip(axes, examples, strict=True):
        positions = np.arange(len(names))
        for offset, rule in ((-0.2, "paper"), (0.2, "shared")):
            row[0].bar(positions + offset, maxima[rule], width=0.4, label=rule)
        row[0].set_xticks(positions, names, fontsize=8)
        row[0].set_title(f"{title}: calibration max per detector", fontsize=9)
        row[0].legend(fontsize=8)
        if len(maps) == len(RULES):
            low = float(min(m.min() for m in maps.values()))
            high = float(max(m.max() for m in maps.values()))
            for ax, rule in zip(row[1:], RULES, strict=True):
                ax.imshow(maps[rule], cmap="inferno", vmin=low, vmax=high)
                ax.set_title(f"good test image, {rule} rule", fontsize=9)
                ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_texture_and_capsules_arguments(parser)
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--detectors", type=int, default=4, help="SCA pool size (HiAD's default 4)")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--out", default="hiad_calibration")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    examples: list[Example] = []
    notes = (
        f"HiAD (SCA, {args.detectors} detectors, {args.patch}-pixel patches, low branch on) with PatchCore on {args.backbone} "
        "(the demo's bank: max_fit_patches 60000, max_bank_size 6000); 20% of the training images held out for the "
        "calibration (each also with pasted pseudo-anomalies) and thresholds; one run, seed 0. The two rows of a dataset "
        "come from two fits with the same seed whose detectors are equal (same_detectors) and differ only in "
        "strategy.shared_anomaly_peak. "
        f"{texture_and_capsules_notes(args)} See the script's docstring for the columns."
    )
    columns = ["dataset", "rule", "image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05", "lifted", "max_spread", "normal_max_high_over_low", "same_detectors", "n_train", "n_test"]
    with tempfile.TemporaryDirectory(prefix="hrad_hiad_calibration_") as work:
        for name, train, test in texture_and_capsules(args, Path(work)):
            rows.extend(run(name, train, test, args, examples))
            write_results(args.out, rows, notes, columns=columns)
            plot(examples, RESULTS / f"{args.out}.png")

if __name__ == "__main__":
    main()
