"""Issue 6 benchmark: MRF-AD ablation in the layout of the paper's Table 8, plus PatchCore.

Setups (all through ``AnomalyModel`` + ``hrad.evaluation``, maps exact at the ground truth's own
resolution; every setup trains on the same images, no validation hold-out):

* ``mrf/<layer>-(all scales)``: one layer, the maps of all scales fused (one row per layer);
* ``mrf/(all layers)-<scale>``: all layers at one input scale (one row per scale);
* ``mrf/(all layers)-(all scales)``: the full method; with ``--foreground`` also the same with
  the built-in PCA foreground masker (the paper's background removal uses BEN2, unavailable);
* ``patchcore/<backbone>/down<size>``: PatchCore on the same backbone, whole image resized to
  ``--patchcore-size`` (the usual low-resolution baseline).

The paper's primary metric is AU-PRO_0.05 (``aupro_05``), then AU-ROC_0.05 (``pixel_auroc_05``).
Images are first resized to ``--pixel-budget`` pixels (paper: ~5 Mpx). ``bank_gib_full`` is the
float32 size all banks would have without reduction (``N * L * sum(s^2) * P / 196 * D * 4``);
``coreset_ratio`` is the per-image k-center ratio the strategy then uses to stay under
``--max-bank-gib``.

    python benchmarks/mrf.py --n-train 100 --n-test 100                         # the table (GPU advised)
    python benchmarks/mrf.py --n-train 3 --n-test 4 --backbone tiny-vit \\
        --pixel-budget 60000 --no-patchcore --out mrf_smoke                     # plumbing smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import CAPSULES, MAIN_COLUMNS, SIZE_COLUMNS, run_setup, subset, write_results
from hrad.data.datasets import load_dataset
from hrad.data.images import read_image
from hrad.features import BackboneConfig, build_backbone
from hrad.strategies.mrf import bank_bytes_estimate, default_layers

COLUMNS = [*MAIN_COLUMNS[:6], "pixel_auroc_05", *MAIN_COLUMNS[6:], "bank_gib_full", "coreset_ratio"]
TABLE8_COLUMNS = ["setup", "layers", "scales", "aupro_05", "pixel_auroc_05", "aupro_30", "image_auroc"]


def mrf_overrides(backbone: str, layers: Sequence[str], scales: Sequence[float], args: argparse.Namespace, foreground: bool = False) -> dict[str, Any]:
    return {
        "backbone": {"name": backbone},
        "detector": {"name": "patchcore"} if args.patchcore else {"name": args.placeholder_detector},
        "strategy": {
            "name": "mrf",
            "pixel_budget": args.pixel_budget,
            "scales": tuple(scales),
            "layers": tuple(layers),
            "distance": args.distance,
            "max_bank_gib": args.max_bank_gib,
            "foreground": foreground,
        },
        "threshold": {"validation_fraction": 0.0},
        "device": args.device,
    }


def patchcore_overrides(backbone: str, size: int, device: str) -> dict[str, Any]:
    return {
        "backbone": {"name": backbone},
        "detector": {"name": "patchcore"},
        "strategy": {"name": "downsample", "image_size": size},
        "threshold": {"validation_fraction": 0.0},
        "device": device,
    }


def bank_columns(n_images: int, image_shape: tuple[int, int], layers: Sequence[str], scales: Sequence[float], channels: int, args: argparse.Namespace) -> dict[str, Any]:
    pixels = args.pixel_budget or image_shape[0] * image_shape[1]
    full = bank_bytes_estimate(n_images, pixels, scales, len(layers), channels) / 2**30
    ratio = min(1.0, args.max_bank_gib / full) if args.max_bank_gib else 1.0
    return {"bank_gib_full": full, "coreset_ratio": ratio, "layers": "+".join(layers), "scales": "+".join(f"{s:g}" for s in scales)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CAPSULES, help="dataset category folder (MVTec / VisA layout)")
    parser.add_argument("--category", default=None, help="category, for a VisA root with split_csv/")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--backbone", default="dinov2-vits14", help="the paper uses DINOv2-reg ViT-B/14")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--layers", nargs="*", default=None, help="default: the paper's blocks 7, 9, 11 (1-based)")
    parser.add_argument("--pixel-budget", type=int, default=5_000_000)
    parser.add_argument("--distance", default="l2", choices=("l2", "cosine"))
    parser.add_argument("--max-bank-gib", type=float, default=6.0)
    parser.add_argument("--foreground", action=argparse.BooleanOptionalAction, default=True, help="also the fused setup with PCA masking")
    parser.add_argument("--patchcore", action=argparse.BooleanOptionalAction, default=True, help="PatchCore baseline")
    parser.add_argument("--patchcore-size", type=int, default=518)
    parser.add_argument("--placeholder-detector", default="students", help="detector section when PatchCore is off (mrf ignores it)")
    parser.add_argument("--fused-only", action="store_true", help="skip the single-layer / single-scale rows (large runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="mrf_capsules", help="results name under benchmarks/results/")
    args = parser.parse_args(argv)

    dataset = load_dataset(args.data, category=args.category)
    train, test = subset(dataset, args.n_train, args.n_test, seed=args.seed)
    extractor = build_backbone(BackboneConfig(name=args.backbone))
    layers = tuple(args.layers) if args.layers else default_layers(extractor)
    scales = tuple(sorted(args.scales))
    channels = extractor.layer_channels[layers[0]]
    shape = read_image(train[0]).shape[:2]
    del extractor

    def mrf_row(label: str, use_layers: Sequence[str], use_scales: Sequence[float], foreground: bool = False) -> dict[str, Any]:
        extra = bank_columns(len(train), shape, use_layers, use_scales, channels, args)
        return run_setup(label, mrf_overrides(args.backbone, use_layers, use_scales, args, foreground), train, test, **extra)

    all_scales = "(" + "+".join(f"{s:g}" for s in scales) + ")"
    all_layers = "(" + "+".join(layers) + ")"
    rows = []
    if not args.fused_only:
        rows += [mrf_row(f"mrf/{layer}-{all_scales}", (layer,), scales) for layer in layers]
        rows += [mrf_row(f"mrf/{all_layers}-{scale:g}", layers, (scale,)) for scale in scales]
    rows.append(mrf_row(f"mrf/{all_layers}-{all_scales}", layers, scales))
    if args.foreground:
        rows.append(mrf_row(f"mrf/{all_layers}-{all_scales}+pca-foreground", layers, scales, foreground=True))
    if args.patchcore:
        label = f"patchcore/{args.backbone}/down{args.patchcore_size}"
        rows.append(run_setup(label, patchcore_overrides(args.backbone, args.patchcore_size, args.device), train, test))

    notes = (
        f"{len(train)} training images, {len(test)} test images (seeded, label-stratified subset of the official split). "
        f"Backbone `{args.backbone}` (the paper: DINOv2-reg ViT-B/14), layers {', '.join(layers)} (1-based block outputs), "
        f"images resized to {args.pixel_budget} px (aspect kept), {args.distance} nearest-neighbour distance, maps "
        "upsampled bilinearly and averaged, Gaussian sigma 4 at full resolution for every setup. Banks above "
        f"{args.max_bank_gib} GiB (float32) are reduced per image by a greedy k-center coreset (`coreset_ratio`). "
        "Primary metric AU-PRO_0.05 (`aupro_05`); F1-max is an oracle threshold. Foreground: built-in PCA masker "
        "(the paper: BEN2)."
    )
    print(
        write_results(
            args.out,
            rows,
            notes,
            columns=COLUMNS,
            extra_tables={"Table 8 layout (layers - scales)": TABLE8_COLUMNS, "Size-aware AUPRO (defect-size quartiles)": SIZE_COLUMNS},
        )
    )


if __name__ == "__main__":
    main()
