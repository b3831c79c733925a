"""Issue 17 ablation: why the L2BT students trail PatchCore on the same DINOv2 teacher.

One run, one training subset (``--shots`` seeded images, the few-shot rows' draw of
``benchmarks/students.py``), one test subset, one input size: PatchCore on the teacher's
features as the reference, then the students with one setting changed per row:

* ``default``: blocks (j, k) from ``default_student_blocks`` (8, 12 for ViT-S/14), 50 epochs,
  Adam lr 1e-3 (the paper);
* ``lr1e-4``: the reference code's learning rate;
* ``epochs<3x>``: three times the epochs (is the default under-trained?);
* ``paper-steps``: one optimiser step per training image on all its tokens (the paper's
  Algorithm 1) instead of token batches of 4096 drawn across images;
* ``reference-code``: 4 whole images per step and lr 1e-4 (alex-costanzino/L2BT);
* ``blocks j-k``: other block pairs (which teacher layers the students map between).

Everything else is ``benchmarks/students.py``'s setup (square padding, resize, top-0.1% image
score of the smoothed full-resolution map, final-epoch weights, no model selection on test data).

    python benchmarks/students_ablation.py --shots 50 --size 518 --n-test 60
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

from benchmarks.common import CAPSULES, MAIN_COLUMNS, run_setup, subset, write_results
from benchmarks.students import patchcore_overrides, students_overrides
from hrad.data.datasets import load_dataset

ABLATION_COLUMNS = ["setup", "change", "image_auroc", "aupro_30", "aupro_05", "pixel_ap", "fit_seconds", "loss_first_last"]


def variants(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(change, students overrides) per row; the first is the unchanged default."""
    base = students_overrides(args.vit, args.size, args.epochs, args.learning_rate, args.max_tokens)
    detector = base["detector"]
    rows: list[tuple[str, dict[str, Any]]] = [("default", base)]
    # the paper's Algorithm 1 (one step per image) and the reference code (4 images per step, lr 1e-4)
    rows.append(("paper-steps", {**base, "detector": {**detector, "batch_images": 1}}))
    rows.append(("reference-code", {**base, "detector": {**detector, "batch_images": 4, "learning_rate": 1e-4}}))
    rows.append((f"epochs{3 * args.epochs}", {**base, "detector": {**detector, "epochs": 3 * args.epochs}}))
    rows.append(("lr1e-4", {**base, "detector": {**detector, "learning_rate": 1e-4}}))
    for pair in args.blocks:
        j, k = pair.split("-")
        layers = [f"block{j}", f"block{k}"]
        rows.append((f"blocks {j}-{k}", {**base, "detector": {**base["detector"], "layers": layers}}))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=CAPSULES)
    parser.add_argument("--shots", type=int, default=50, help="seeded training images (the few-shot draw)")
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--vit", default="dinov2-vits14")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-tokens", type=int, default=1_000_000)
    parser.add_argument("--blocks", nargs="*", default=["6-12"], help="other (j-k) block pairs")
    parser.add_argument("--only", nargs="*", default=None, help="run only these changes (names as in the table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="students_ablation")
    args = parser.parse_args(argv)

    dataset = load_dataset(args.data)
    _, test = subset(dataset, 0, args.n_test, seed=args.seed)
    train = sorted(random.Random(args.seed).sample(sorted(dataset.train), args.shots))
    rows = [run_setup(f"patchcore/{args.vit}/down{args.size}", patchcore_overrides(args.vit, args.size), train, test, change="reference")]
    for change, overrides in variants(args):
        if args.only is not None and change not in args.only:
            continue
        rows.append(run_setup(f"students/{args.vit}/down{args.size}/{change}", overrides, train, test, change=change))
        write_results(args.out, rows, notes(args, len(test)), columns=MAIN_COLUMNS, extra_tables={"Ablation": ABLATION_COLUMNS})


def notes(args: argparse.Namespace, n_test: int) -> str:
    return (
        f"{args.shots} seeded training images (the few-shot draw of benchmarks/students.py), {n_test} test images "
        f"(seeded, label-stratified), input {args.size} (square padding, resize). One change per students row against "
        f"`default` ({args.epochs} epochs, Adam lr {args.learning_rate}, default blocks, final-epoch weights); PatchCore on "
        "the same teacher features as the reference. One run: every row on the same images (the file is rewritten "
        "after every row, so a stopped run keeps its finished rows)."
    )


if __name__ == "__main__":
    main()
