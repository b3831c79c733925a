"""Seam-free tiling on VisA capsules: before/after tables, seam profiles and image-score rules.

For each setup the model is fitted once and every test image predicted once; from that one
pass come (1) the usual metrics (pixel metrics exact at 1500x1000), (2) the seam profile: the
mean final-map score of *normal* pixels (good images and the defect-free pixels of defective
ones) against the distance to the nearest tile border, with the ratio of the band within 8 px
of a border to the pixels at least 64 px from every border, and (3) image AUROC under several
image-score rules computed from the same maps:

- ``strategy``: what the strategy returns (tiled: the detector's largest tile score; ensemble:
  the mean or max of the tile scores; HiAD: the max of the 16x16-pooled smoothed map);
- ``map_max``: the max of the smoothed full-resolution map (what the model shows);
- ``top_0.1%``: the mean of the top 0.1 % of the smoothed map's pixels;
- ``pool16``: the max of the smoothed map averaged over 16 x 16 windows (HiAD's rule).

"before" is hrad 0.1's geometry (``context=0``, ``tile_edge=zeros``: tiles embedded alone, the
image zero-padded at bottom/right); "after" is the default (context margins, shifted last tiles).

    PYTHONPATH=. python benchmarks/seam_free.py --backbone efficientnet-lite0 --n-train 30 --n-test 30
    PYTHONPATH=. python benchmarks/seam_free.py --backbone dinov2-vits14 --tile 518 --n-train 30 --n-test 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import ATTRIBUTION, RESULTS, capsules, subset, write_results
from hrad.config import load_config
from hrad.data.images import ImageList, read_image
from hrad.evaluation import environment
from hrad.metrics import PixelMetrics, image_metrics
from hrad.model import AnomalyModel
from hrad.postprocess.smoothing import gaussian_smooth, image_score, top_fraction_mean
from hrad.profiling import PeakMemory
from hrad.reports.markdown import table
from hrad.strategies.ensemble import TiledEnsemble
from hrad.strategies.hiad import HiAD
from hrad.strategies.tiled import SharedTileStrategy
from hrad.strategies.tiling import TileGrid
from hrad.tile_geometry import seam_distance

#: distance bins (pixels from the nearest tile border) of the seam profile
BINS = (0, 8, 16, 32, 64, 128, 10_000)
BEFORE = {"context": 0, "tile_edge": "zeros"}


def setups(tile: int, kinds: list[str]) -> list[tuple[str, dict[str, Any]]]:
    table = {
        "down512": {"name": "downsample", "image_size": 512},
        "tiled-before": {"name": "tiled", "tile": tile, **BEFORE},
        "tiled-after": {"name": "tiled", "tile": tile},
        "ensemble-before": {"name": "tiled-ensemble", "tile": tile, **BEFORE},
        "ensemble-after": {"name": "tiled-ensemble", "tile": tile},
        "hiad-before": {"name": "hiad", "patch_size": tile, "low_res_size": tile, **BEFORE},
        "hiad-after": {"name": "hiad", "patch_size": tile, "low_res_size": tile},
    }
    return [(kind, table[kind]) for kind in kinds]


def tile_grid(model: AnomalyModel, height: int, width: int) -> TileGrid | None:
    """The grid whose seams the profile measures (None for downsampling: no seams)."""
    strategy = model.strategy
    if isinstance(strategy, SharedTileStrategy):
        return strategy._tiles(height, width)[0]
    if isinstance(strategy, TiledEnsemble):
        return strategy.grid
    if isinstance(strategy, HiAD):
        return strategy._fusion().grid(height, width)
    return None


def phantom_distance(grid: TileGrid) -> np.ndarray:
    """Distance to *phantom* seams, lines halfway between the real tile borders (and the image
    border): the same content-dependent statistics, no seams. Its border/far ratio is the control
    that tells a seam apart from where the borders happen to lie on the part."""

    def midpoints(size: int, lines: list[int], tile: int) -> list[int]:
        # only intervals of at least half a tile: a shifted last tile's narrow overlap strip has
        # its midpoint right among real seams
        bounds = [0, *lines, size]
        return [(a + b) // 2 for a, b in zip(bounds, bounds[1:], strict=False) if 2 * (b - a) >= tile]

    rows, cols = grid.seams()
    return seam_distance(
        grid.height, grid.width, midpoints(grid.height, rows, grid.tile_h), midpoints(grid.width, cols, grid.tile_w)
    )


def ratio(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, float]:
    """The profile (mean per distance bin) and its band-within-8-px / at-least-64-px ratio (the
    mean of the two far bins' means)."""
    profile = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    far = counts[-2:] > 0
    value = float(profile[0] / profile[-2:][far].mean()) if counts[0] and far.any() else float("nan")
    return profile, value


def pooled_max(anomaly_map: np.ndarray, pool: int = 16) -> float:
    tensor = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    return float(F.avg_pool2d(tensor, (min(pool, tensor.shape[-2]), min(pool, tensor.shape[-1])), stride=1).max())


def run(setup: str, strategy: dict[str, Any], backbone: str, train: list[Path], test: list[Any]) -> dict[str, Any]:
    config = load_config(None, {"backbone": {"name": backbone}, "detector": {"name": "patchcore"}, "strategy": strategy})
    print(f"[{setup}] fitting on {len(train)} images ...", file=sys.stderr, flush=True)
    with PeakMemory() as fit_memory:
        model = AnomalyModel(config).fit(ImageList(train))
    pixel = PixelMetrics()
    rules: dict[str, list[float]] = {"model": [], "strategy": [], "map_max": [], "top_0.1%": [], "pool16": []}
    labels: list[int] = []
    sums = np.zeros((2, len(BINS) - 1))  # real seams, phantom seams
    counts = np.zeros((2, len(BINS) - 1))
    seconds = 0.0
    post = model.config.postprocess
    for sample in test:
        image = read_image(sample.path)
        start = time.perf_counter()
        result = model.strategy.predict(image)
        smoothed = gaussian_smooth(result.anomaly_map, post.sigma)
        seconds += time.perf_counter() - start
        mask = sample.load_mask(image.shape[:2])
        pixel.add(smoothed, mask)
        labels.append(sample.label)
        rules["model"].append(image_score(smoothed, result.score, post))
        rules["strategy"].append(result.score)
        rules["map_max"].append(float(smoothed.max()))
        rules["top_0.1%"].append(top_fraction_mean(smoothed, 0.001))
        rules["pool16"].append(pooled_max(smoothed))
        grid = tile_grid(model, *image.shape[:2])
        if grid is not None:
            normal = ~mask
            for k, distance in enumerate((grid.border_distance(), phantom_distance(grid))):
                which = np.digitize(distance[normal], BINS[1:-1])
                sums[k] += np.bincount(which, weights=smoothed[normal], minlength=sums.shape[1])
                counts[k] += np.bincount(which, minlength=counts.shape[1])
    row: dict[str, Any] = {"setup": setup}
    metrics = {**image_metrics(np.asarray(rules["model"]), np.asarray(labels)), **pixel.result()}
    row.update({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05")})
    for rule, values in rules.items():
        row[f"auroc_{rule}"] = image_metrics(np.asarray(values), np.asarray(labels))["image_auroc"]
    profile, row["border_over_far"] = ratio(sums[0], counts[0])
    phantom, row["phantom_border_over_far"] = ratio(sums[1], counts[1])
    row["profile"], row["phantom_profile"] = profile.tolist(), phantom.tolist()
    row["seam_excess"] = row["border_over_far"] / row["phantom_border_over_far"]
    row["fit_seconds"] = fit_memory.seconds
    row["seconds_per_image"] = seconds / len(test)
    row["fit_peak_rss_mb"] = fit_memory.peak_rss_mb
    margin = getattr(getattr(model.strategy, "tiles", None), "margin", 0)
    side = strategy.get("tile") or strategy.get("patch_size") or 0
    row["context_px"] = margin
    row["window_pixel_share"] = ((side + 2 * margin) / side) ** 2 if side else 1.0
    row["config"] = config.model_dump(mode="json")
    print(f"[{setup}] " + ", ".join(f"{k}={row[k]:.3f}" for k in ("image_auroc", "pixel_ap", "aupro_05", "border_over_far", "seconds_per_image")), file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--n-train", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--setups", nargs="+", default=["down512", "tiled-before", "tiled-after"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    name = args.out or f"seam_free_{args.backbone}"
    train, test = subset(capsules(), args.n_train, args.n_test)
    rows: list[dict[str, Any]] = []
    for setup, strategy in setups(args.tile, args.setups):
        rows.append(run(setup, strategy, args.backbone, list(train), test))
        path = save(name, rows, args.backbone, args.tile, len(train), len(test))  # after every setup: nothing lost
    print(path)


def save(name: str, rows: list[dict[str, Any]], backbone: str, tile: int, n_train: int, n_test: int) -> Path:
    notes = (
        f"PatchCore on {backbone}, tile/patch {tile}; {n_train} training images (20% held out for thresholds "
        f"and calibration), {n_test} test images (seeded, label-stratified subset of the official split), one run. "
        "Pixel metrics exact at 1500x1000 on the model's final (sigma-4 smoothed) map. `before` = hrad 0.1 geometry "
        "(context 0, zero padding); `after` = default context margin and shifted last tiles. border_over_far = mean "
        "normal-pixel score within 8 px of a tile border / at least 64 px from every border (the mean of the 64-128 and "
        ">=128 bins' means). phantom_border_over_far = the same ratio for phantom seams halfway between the real ones (a "
        "control: how much of the ratio comes from where the borders lie on the part, not from seams); seam_excess = "
        "border_over_far / phantom_border_over_far. auroc_* = image AUROC "
        "of each score rule on the same maps (see the script's docstring); image_auroc uses the model's configured rule. "
        "window_pixel_share = backbone pixels per tile with the margin / without."
    )
    columns = ["setup", "image_auroc", "pixel_ap", "pixel_auroc", "aupro_30", "aupro_05", "border_over_far", "phantom_border_over_far", "seam_excess", "context_px", "window_pixel_share", "fit_seconds", "seconds_per_image"]
    rule_columns = ["setup", "auroc_model", "auroc_strategy", "auroc_map_max", "auroc_top_0.1%", "auroc_pool16"]
    profile_rows = [{"setup": r["setup"], **{f"{BINS[i]}-{BINS[i + 1]}px": v for i, v in enumerate(r["profile"])}} for r in rows]
    path = write_results(name, rows, notes, columns=columns, extra_tables={"Image AUROC by score rule (same maps)": rule_columns})
    text = path.read_text()
    text += "\n## Seam profile: mean normal-pixel score by distance to the nearest tile border\n\n"
    text += table(profile_rows, list(profile_rows[0]))
    if any("phantom_profile" in r for r in rows):
        phantom_rows = [{"setup": r["setup"], **{f"{BINS[i]}-{BINS[i + 1]}px": v for i, v in enumerate(r.get("phantom_profile", []))}} for r in rows]
        text += "\n## Control: the same profile against phantom seams halfway between the tile borders\n\n"
        text += table(phantom_rows, list(profile_rows[0]))
    path.write_text(text)
    plot_profiles(rows, RESULTS / name / "seam_profile.png", backbone)
    (RESULTS / name / "environment.json").write_text(json.dumps({"environment": environment(), "attribution": ATTRIBUTION}, indent=2))
    return path


def plot_profiles(rows: list[dict[str, Any]], path: Path, backbone: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(BINS[i] + min(BINS[i + 1], 256)) / 2 for i in range(len(BINS) - 1)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for row in rows:
        profile = np.asarray(row["profile"], dtype=float)
        if np.isfinite(profile).any():
            ax.plot(centres, profile / np.nanmean(profile[-2:]), marker="o", label=f"{row['setup']} ({row['border_over_far']:.2f}x)")
    ax.axhline(1.05, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("distance to nearest tile border (px, bin centres)")
    ax.set_ylabel("normal-pixel score / far-field score")
    ax.set_title(f"Seam profile, PatchCore on {backbone} (capsules)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
