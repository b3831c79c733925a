"""Issue 17 item 4: the trainable seed methods at paper settings on one GPU, next to PatchCore, one run.

The prepared script for a lent GPU. On the full VisA capsules category (all 300 training
images; the whole test split, 100 anomalous + 60 good; maps exact at the masks' 1500 x 1000)
it fits and evaluates, in this order, writing the results file after every row:

1. ``students/<vit>/down518`` and ``patchcore/<vit>/down518``;
2. ``students/<vit>/down1036`` and ``patchcore/<vit>/down1036``;
3. ``varad/<vit>/down1022/dir4/m4`` and ``patchcore/<vit>/down1022``.

Every setup pads the image to a square (edge replication) and resizes it to the given side
(``downsample``), the teacher / backbone is DINOv2 ViT-S/14 (``dinov2-vits14``; the L2BT paper
uses ViT-B/14, not installable here), post-processing Gaussian sigma 4 at full resolution, no
learned threshold (AUROC / AP / AUPRO need none; F1-max is an oracle number), final-epoch
weights (nothing chosen on test data).

- Students (L2BT), the paper's settings: blocks 8 and 12, 50 epochs, Adam lr 1e-3 (the
  reference code uses 1e-4), every training token kept (``max_tokens`` = 300 images' tokens,
  no subsample), one whole image per step in a fresh order every epoch (the paper's Algorithm
  1; ``--students-batch-images 4`` is the reference code's batching), image score = mean of the
  top 0.1% of the map.
- VarAD, the paper's settings: blocks 4 / 8 / 12, four scan directions, prediction step
  m = 4 scan lines, AdamW lr 5e-4 betas (0.5, 0.999), 10 epochs, 2 images per step (the paper's
  timing batch); the selective scan runs in mamba-ssm's CUDA kernel when the package is
  installed, else in the chunked torch scan (without recomputation on CUDA: ~40 GB, below).
- PatchCore: hrad's defaults (10% coreset of at most 200k sampled patches, bank <= 20k rows,
  1-NN) on the same backbone blocks hrad uses for PatchCore on a ViT, same geometry.

Mixed precision: the neural detectors train and predict at ``--precision`` (default ``auto`` =
bfloat16 autocast on CUDA, see ``hrad.detectors.neural``), the backbone at
``--backbone-precision`` (default bfloat16 on CUDA, float32 on CPU); the same backbone
precision for every row, so each method meets PatchCore on the same features. The 300
training images are decoded once (threads) and kept as uint8 (1.35 GB); test images are
decoded by the evaluation's loader thread while the GPU predicts.

Time on one H200 (estimate, not measured; no GPU was lent when this was written). Made from
FLOP counts at an assumed effective rate, plus the per-image CPU work the GPU does not do, timed
ad hoc (not a committed benchmark) on 8 capsules test images on the shared 2-core machine at a
load average of ~13: decoding image + mask (``read_pixels``, ``load_mask``) 0.56 s and adding a
1500 x 1000 map to ``PixelMetrics`` 0.73 s per image, taken as ~6x slower than an idle core:

- decoding: ~0.1 s per 1500 x 1000 PNG on one core; the 300 training images on 16 threads
  ~3 s once; test images overlap with prediction (the evaluation's loader thread);
- evaluation: adding one full-resolution map to the streaming pixel metrics ~0.12 s on one
  core (the writer thread), so ~20 s per setup for 160 images, ~2 min for the six setups;
- teacher: ViT-S/14 at 1036 (5476 tokens) ~0.8 TFLOP per image; at ~200 TFLOP/s effective in
  bfloat16 ~4 ms, so 460 images ~2 s per setup at 1036 and less at 518;
- students at 1036: 1.64 M tokens x 50 epochs, ~5.3 MFLOP per token-step (two 3-layer 384-wide
  MLPs, forward + backward): 0.44 PFLOP, 15000 steps of 5476 tokens (one image each); ~20-40 s
  (small matmuls, launch-bound: ~2 ms a step); at 518 15000 steps of 1369 tokens, ~20-30 s;
- VarAD at 1022: 300 images x 10 epochs x 3 levels x 4 directions x 5585 tokens (5329 + 256 BOS)
  x ~5.7 MFLOP (a 384-wide Mamba block, forward + backward): 1.2 PFLOP; launch- and
  memory-bound, ~60-120 s with mamba-ssm's kernel; the chunked torch scan moves ~13 GB per level
  and step instead (b x d_inner x L x d_state intermediates), ~3x that: ~3-5 min without
  mamba-ssm, which would take the run past 8 minutes (install mamba-ssm for this row);
- PatchCore: greedy coreset of 20k from 200k patches on the GPU, seconds.

Total with mamba-ssm: ~2 min evaluation + ~1 min students + ~1.5 min VarAD + ~0.5 min
teachers and PatchCore + ~0.5 min start-up (weights, CUDA context) = ~5.5 min, under 8; the
rows are written as they finish, so a run stopped by a time limit keeps the finished ones.

``--smoke`` runs the same setups tiny (``tiny-vit``, 56 / 112 px, 2 epochs, a handful of
images of capsules, or of hrad's synthetic demo set where ``../shared`` is absent) on the
CPU in about half a minute of CPU time: it checks the plumbing (tests/test_gpu_train.py runs
its students and PatchCore rows on synthetic images), not quality or speed.

    PYTHONPATH=. python benchmarks/gpu_train.py                    # on the GPU machine
    PYTHONPATH=. python benchmarks/gpu_train.py --smoke --out gpu_train_smoke
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import CAPSULES, MAIN_COLUMNS, SIZE_COLUMNS, run_setup, subset, write_results
from hrad.data.datasets import load_dataset
from hrad.data.images import read_pixels
from hrad.data.synthetic import make_demo_dataset
from hrad.detectors.mamba import fused_scan_available

COLUMNS = [*MAIN_COLUMNS[:7], "fit_seconds", "seconds_per_image", "epochs", "train_images", "error"]
#: teacher tokens per image side: a ViT-*/14 at side s has (s / 14)^2 tokens
PATCH = 14


def downsample(side: int, batch_size: int) -> dict[str, Any]:
    return {"name": "downsample", "image_size": side, "pad_to_square": True, "batch_size": batch_size}


def setups(args: argparse.Namespace, n_train: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(label, config overrides, extra columns)`` in run order (see the module docstring)."""
    backbone = {"name": args.vit, "precision": args.backbone_precision}
    common = {"backbone": backbone, "threshold": {"validation_fraction": 0.0}, "device": args.device}
    students_post = {"sigma": 4.0, "image_score": "top-fraction", "top_fraction": 0.001}
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for side in args.students_sides:
        tokens = (side // PATCH) ** 2
        students = {
            "name": "students",
            "epochs": args.students_epochs,
            "learning_rate": args.students_lr,
            "max_tokens": max(1, n_train * tokens),  # every training token (no subsample)
            "batch_images": args.students_batch_images,  # whole images per step (paper: 1)
            "precision": args.precision,
        }
        rows.append((
            f"students/{args.vit}/down{side}",
            {**common, "detector": students, "strategy": downsample(side, 4), "postprocess": students_post},
            {"epochs": args.students_epochs},
        ))
        rows.append(patchcore(args, side))
    for side in args.varad_sides:
        varad = {
            "name": "varad",
            "epochs": args.varad_epochs,
            "directions": 4,
            "step_m": args.varad_m,
            "recompute_scan": args.device == "cpu",  # CUDA: ~40 GB without recomputation, H200 has 141
            "precision": args.precision,
        }
        rows.append((
            f"varad/{args.vit}/down{side}/dir4/m{args.varad_m:g}",
            {
                **common,
                "detector": varad,
                "strategy": downsample(side, args.varad_batch),
                "postprocess": {"sigma": 4.0, "image_score": "max"},
            },
            {"epochs": args.varad_epochs},
        ))
        if side not in args.students_sides:  # else its PatchCore row is already there
            rows.append(patchcore(args, side))
    return rows


def patchcore(args: argparse.Namespace, side: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    return (
        f"patchcore/{args.vit}/down{side}",
        {
            "backbone": {"name": args.vit, "precision": args.backbone_precision},
            "detector": {"name": "patchcore"},
            "strategy": downsample(side, 4),
            "postprocess": {"sigma": 4.0},
            "threshold": {"validation_fraction": 0.0},
            "device": args.device,
        },
        {},
    )


def decode(paths: Sequence[Path], threads: int) -> list[np.ndarray]:
    """The images in their own pixel type (uint8 for VisA), decoded on ``threads`` threads."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(read_pixels, paths))


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny ViT, tiny sizes, 2 epochs: plumbing on a CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:1, cpu")
    parser.add_argument("--source", default="auto", choices=["auto", "capsules", "synthetic"],
                        help="auto: capsules when ../shared has it, else hrad's synthetic demo set")  # fmt: skip
    parser.add_argument("--data", type=Path, default=CAPSULES, help="dataset category folder (MVTec / VisA layout)")
    parser.add_argument("--n-train", type=int, default=None, help="training images (default all; smoke 4)")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default all; smoke 6)")
    parser.add_argument("--vit", default=None, help="teacher / backbone (default dinov2-vits14; smoke tiny-vit)")
    parser.add_argument("--students-sides", type=int, nargs="*", default=None, help="default 518 1036; smoke 56 112")
    parser.add_argument("--students-epochs", type=int, default=None, help="default 50 (paper); smoke 2")
    parser.add_argument("--students-lr", type=float, default=1e-3, help="paper 1e-3 (reference code 1e-4)")
    parser.add_argument("--students-batch-images", type=int, default=1,
                        help="whole images per step: 1 = paper's Algorithm 1, 4 = reference code")  # fmt: skip
    parser.add_argument("--varad-sides", type=int, nargs="*", default=None, help="default 1022; smoke 112")
    parser.add_argument("--varad-epochs", type=int, default=None, help="default 10 (paper); smoke 2")
    parser.add_argument("--varad-m", type=float, default=4.0, help="prediction step in scan lines (paper: 4)")
    parser.add_argument("--varad-batch", type=int, default=2, help="images per VarAD step (paper: 2)")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="neural detectors' compute precision (auto: bfloat16 on CUDA)")  # fmt: skip
    parser.add_argument("--backbone-precision", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--batch-images", type=int, default=4, help="test images per predict_batch")
    parser.add_argument("--only", nargs="+", default=None, help="run only setups whose label contains one of these")
    parser.add_argument("--out", default=None, help="results name (default gpu_train_<device>; smoke gpu_train_smoke)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.smoke
    args.vit = args.vit or ("tiny-vit" if smoke else "dinov2-vits14")
    args.students_sides = args.students_sides if args.students_sides is not None else ([56, 112] if smoke else [518, 1036])
    args.varad_sides = args.varad_sides if args.varad_sides is not None else ([112] if smoke else [1022])
    args.students_epochs = args.students_epochs or (2 if smoke else 50)
    args.varad_epochs = args.varad_epochs or (2 if smoke else 10)
    if args.backbone_precision is None:
        args.backbone_precision = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    started = time.perf_counter()
    use_capsules = args.source == "capsules" or (args.source == "auto" and args.data.is_dir())
    work = tempfile.TemporaryDirectory(prefix="hrad_gpu_train_")
    if use_capsules:
        dataset = load_dataset(args.data)
        source_line = f"{args.data.name} ({args.data})"
    else:
        side = 128 if args.smoke else 1024
        root = make_demo_dataset(Path(work.name) / "demo", image_size=side, n_train=4 if args.smoke else 30,
                                 n_test_good=3, n_test_bad=3)  # fmt: skip
        dataset = load_dataset(root)
        source_line = f"hrad's synthetic demo textures ({side} px, make_demo_dataset seed 0)"
    n_train = args.n_train if args.n_train is not None else (4 if args.smoke else None)
    n_test = args.n_test if args.n_test is not None else (6 if args.smoke else None)
    train, test = subset(dataset, n_train, n_test)
    device = args.device
    print(f"decoding {len(train)} training images ...", file=sys.stderr, flush=True)
    images = decode(train, os.cpu_count() or 1)
    decode_seconds = time.perf_counter() - started
    fused = fused_scan_available()
    name = args.out or ("gpu_train_smoke" if args.smoke else f"gpu_train_{slug(device_label(device))}")
    rows: list[dict[str, Any]] = []

    def notes() -> str:
        return (
            f"Device: {device_label(device)}; torch {torch.__version__}; neural detectors at precision {args.precision}, "
            f"backbone {args.vit} at {args.backbone_precision}; mamba-ssm {'installed (VarAD scan: its CUDA kernel)' if fused else 'not installed (VarAD scan: chunked torch scan on CUDA, compiled numba scan on CPU)'}. "
            f"Data: {source_line}; {len(train)} training images, {len(test)} test images"
            f"{' (the whole test split)' if n_test is None else ''}; maps exact at the ground truth's resolution. "
            f"Students: {args.students_epochs} epochs, Adam lr {args.students_lr:g}, every training token, {args.students_batch_images} whole image(s) per step. "
            f"VarAD: {args.varad_epochs} epochs, four directions, m = {args.varad_m:g}, {args.varad_batch} images per step. "
            "Final-epoch weights; no threshold learned; F1-max is an oracle number. fit_seconds: wall time of the fit "
            "(teacher features included) on the decoded images; seconds_per_image: the model's predict time per test image. "
            f"Training images decoded once in {decode_seconds:.1f} s; total wall time so far {time.perf_counter() - started:.0f} s. "
            + ("SMOKE setting (tiny random ViT, tiny images, 2 epochs): checks the script, says nothing about quality or speed." if args.smoke else "")
        )  # fmt: skip

    try:
        for label, overrides, extra in setups(args, len(train)):
            if args.only and not any(part in label for part in args.only):
                continue
            try:
                row = run_setup(label, overrides, train, test, train_images=images, batch_images=args.batch_images,
                                **extra)  # fmt: skip
                row["train_images"] = len(train)
            except Exception as error:  # a failing setup is a row, not the end of the run
                traceback.print_exc()
                first = str(error).splitlines()[0][:200] if str(error) else ""
                row = {"setup": label, "error": f"{type(error).__name__}: {first}", "train_images": len(train), **extra}
            rows.append(row)
            write_results(name, rows, notes(), columns=COLUMNS, extra_tables={"Size-aware AUPRO": SIZE_COLUMNS})
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    finally:
        work.cleanup()


if __name__ == "__main__":
    main()
