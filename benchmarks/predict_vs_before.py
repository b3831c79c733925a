"""``hrad predict`` of an earlier commit against today's, as a user runs them, in one run.

The earlier commit (default ``91e943f``: seam-free tiling in, so the same tile geometry and
the same work per image as today, but before issue 18's predict work: one image at a time,
decoding and writing on the compute thread, 4 windows per backbone call, padded TF-SAME
convolutions, zlib level 6 map PNGs) is checked out in a temporary git worktree and run with
this virtualenv. Each side fits its own model with its own ``hrad fit`` on the same training
images (tiled PatchCore, EfficientNet-Lite0, 512 tiles, defaults otherwise) and predicts the
same folder of capsules test images with its own ``hrad predict`` (maps, masks where the
version writes them, overlays). A timing is the wall time of the whole command (interpreter
start, imports and model load included, as a user waits for it); sides alternate, the order
reversed every other round, and each side keeps its best time. The two sides' scores are
compared image by image (they differ a little: the kNN index settings changed between the
commits).

    PYTHONPATH=. python benchmarks/predict_vs_before.py --n-train 20 --n-images 40 --rounds 2

``--openvino`` adds a third side: today's command on a model fitted with
``--set backbone.runtime=openvino`` (OpenVINO's CPU kernels for the backbone; needs the
``openvino`` extra).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, capsules, subset, write_results

TODAY = "today"
OPENVINO = "today, backbone.runtime=openvino"


def hrad(tree: Path, *arguments: str) -> float:
    """Seconds of one ``hrad`` command run from ``tree``'s source with this interpreter."""
    command = [sys.executable, "-m", "hrad.cli.main", *arguments]
    started = time.perf_counter()
    subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def scores(out: Path) -> dict[str, float]:
    """Image name -> score from ``scores.csv`` (the path column is ``image`` in older versions)."""
    with open(out / "scores.csv", newline="") as stream:
        rows = csv.DictReader(stream)
        return {Path(row.get("path") or row["image"]).name: float(row["score"]) for row in rows if row.get("score")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-commit", default="91e943f")
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-images", type=int, default=4, help="today's hrad predict --batch-images")
    parser.add_argument(
        "--openvino", action="store_true", help="also today's predict of a model fitted with --set backbone.runtime=openvino"
    )
    parser.add_argument("--out", default="predict_vs_before")
    args = parser.parse_args()
    repository = ROOT.parent
    dataset = capsules()
    train, _ = subset(dataset, args.n_train, None)
    images = sorted(s.path for s in dataset.test)[: args.n_images]
    work = Path(tempfile.mkdtemp(prefix="hrad_vs_before_"))
    before_tree = work / "before"
    commit = subprocess.run(["git", "rev-parse", args.before_commit], cwd=repository, capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), commit], cwd=repository, check=True, capture_output=True)
    trees = {f"before ({commit[:7]})": before_tree, TODAY: repository}
    fit_extra: dict[str, list[str]] = {side: [] for side in trees}
    if args.openvino:
        trees[OPENVINO] = repository
        fit_extra[OPENVINO] = ["--set", "backbone.runtime=openvino"]
    models = {side: work / f"model_{index}" for index, side in enumerate(trees)}
    try:
        data = work / "data"
        (data / "train" / "good").mkdir(parents=True)
        (data / "test" / "good").mkdir(parents=True)
        folder = work / "images"
        folder.mkdir()
        for path in train:
            (data / "train" / "good" / path.name).symlink_to(path)
        for path in images:
            (folder / path.name).symlink_to(path)
        (data / "test" / "good" / images[0].name).symlink_to(images[0])  # the layout wants a test folder; fit ignores it
        fit_seconds = {}
        for side, tree in trees.items():
            fit_arguments = ["fit", "--data", str(data), "--strategy", "tiled", "--tile", "512", "--out", str(models[side]), *fit_extra[side]]
            fit_seconds[side] = hrad(tree, *fit_arguments)
            print(f"{side} fit {fit_seconds[side]:.0f}s", flush=True)
        times: dict[str, list[float]] = {side: [] for side in trees}
        found: dict[str, dict[str, float]] = {}
        loads: list[float] = []
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for side in order:
                tree = trees[side]
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                extra = ["--batch-images", str(args.batch_images)] if tree == repository else []
                seconds = hrad(tree, "predict", str(folder), "--model", str(models[side]), "--out", str(out), *extra)
                times[side].append(seconds)
                found[side] = scores(out)
                loads.append(os.getloadavg()[0])
                print(f"{side} predict: {seconds:.1f}s ({len(images) / seconds:.3f} images/s), load {loads[-1]:.1f}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=repository, check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    baseline_side = next(iter(trees))
    baseline = min(times[baseline_side])
    rows = []
    for side, values in times.items():
        common = sorted(set(found[side]) & set(found[baseline_side]))
        difference = max(abs(found[side][n] - found[baseline_side][n]) / max(abs(found[baseline_side][n]), 1e-12) for n in common)
        rows.append(
            {
                "hrad": side,
                "fit_seconds": round(fit_seconds[side], 1),
                "images": len(images),
                "predict_best_seconds": round(min(values), 1),
                "images_per_second": round(len(images) / min(values), 3),
                "speedup_vs_before": round(baseline / min(values), 3),
                "all_runs_seconds": " / ".join(f"{v:.1f}" for v in values),
                "scores_compared": len(common),
                "max_rel_score_diff_vs_before": f"{difference:.1e}",
            }
        )
    notes = (
        f"`hrad predict` at {commit[:7]} (before issue 18's predict work, after seam-free tiling) against today's "
        f"`hrad predict --batch-images {args.batch_images}`{' (also on a model fitted with --set backbone.runtime=openvino)' if args.openvino else ''}, "
        f"each with its own `hrad fit --strategy tiled --tile 512` "
        f"(EfficientNet-Lite0 PatchCore, defaults) on {len(train)} capsules training images; {len(images)} capsules test "
        f"images (1500x1000 PNG) predicted with each version's default outputs. Seconds are the whole command's wall "
        f"time (start, imports and model load included); {args.rounds} round(s), sides alternating, best of each; "
        f"speedup_vs_before = best before / best of the row, same run. 1-minute load average after each timing: "
        f"{', '.join(f'{v:.1f}' for v in loads)} (a shared 2-core CPU)."
    )
    write_results(args.out, rows, notes, columns=list(rows[0]))


if __name__ == "__main__":
    main()
