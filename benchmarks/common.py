"""Shared benchmark plumbing: subsets, one fit+evaluate run, results files with provenance.

Every figure in benchmarks/results/ comes from a script here; each results file records the
machine, date and exact command that produced it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hrad.config import load_config
from hrad.data.datasets import Dataset, Sample, load_dataset
from hrad.data.images import ImageList
from hrad.data.synthetic import make_demo_dataset
from hrad.evaluation import environment, evaluate
from hrad.model import AnomalyModel
from hrad.profiling import PeakMemory
from hrad.reports.markdown import table
from hrad.strategies.tiled import TiledStrategy

ROOT = Path(__file__).resolve().parent
# long fits report every epoch (hrad.detectors.neural) on stderr
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
RESULTS = ROOT / "results"
CAPSULES = ROOT.parent.parent / "shared" / "data" / "visa" / "capsules"
ATTRIBUTION = (
    "Data: VisA `capsules` (Zou et al., ECCV 2022), CC BY 4.0, official 1-class split, 1500x1000 images."
)
#: the datasets this run read that a results file must attribute (``"capsules"`` once VisA
#: capsules were read: :func:`capsules`, or :func:`subset` / :func:`subset_test` of data under
#: :data:`CAPSULES`); :func:`write_results` writes :data:`ATTRIBUTION` only then, not on runs of
#: synthetic textures alone (``--capsules-train 0``)
DATA_READ: set[str] = set()
MAIN_COLUMNS = [
    "setup", "image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro_30", "aupro_05",
    "fit_seconds", "seconds_per_image", "fit_peak_rss_mb", "predict_peak_rss_mb",
]
SIZE_COLUMNS = ["setup", "aupro_30_q1", "aupro_30_q2", "aupro_30_q3", "aupro_30_q4", "rho_30", "aupro_05_q1", "aupro_05_q4", "rho_05"]


def subset(dataset: Dataset, n_train: int | None, n_test: int | None, seed: int = 0) -> tuple[list[Path], list[Sample]]:
    """``n_train`` training images (sorted) and a seeded, label-stratified test subset.

    Seed 0 takes the first ``n_train`` training images by name, as every results file written
    before other seeds drew their own; any other seed draws them at random (the few-shot draw of
    benchmarks/students.py), so a second seed varies the training images too. ``n_train`` 0 or
    None: all of them."""
    _note_capsules([dataset.root])
    train = sorted(dataset.train)
    if seed != 0 and n_train and n_train < len(train):
        train = sorted(random.Random(seed).sample(train, n_train))
    train = train[: n_train or None]
    labelled = [s for s in dataset.test if s.label >= 0]
    if not n_test or n_test >= len(labelled):
        return train, labelled
    rng = random.Random(seed)
    good = [s for s in labelled if s.label == 0]
    bad = [s for s in labelled if s.label == 1]
    n_good = max(1, round(n_test * len(good) / len(labelled)))
    return train, sorted(rng.sample(good, n_good) + rng.sample(bad, n_test - n_good), key=lambda s: str(s.path))


def run_setup(
    setup: str,
    overrides: dict[str, Any],
    train: Sequence[Path],
    test: Sequence[Sample],
    describe: Callable[[AnomalyModel], dict[str, Any]] | None = None,
    *,
    train_images: Sequence[np.ndarray] | None = None,
    batch_images: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """Fit one configuration and evaluate it at full resolution; one results row.

    ``describe(model)`` adds columns about the fitted model (for example its parameter count).
    ``train_images``: the training images already decoded (in ``train``'s order), so runs of
    several setups decode them once; ``batch_images``: test images per ``predict_batch``.
    """
    config = load_config(None, overrides)
    print(f"[{setup}] fitting on {len(train)} images ...", file=sys.stderr, flush=True)
    with PeakMemory() as fit_memory:
        model = AnomalyModel(config).fit(ImageList(list(train)) if train_images is None else list(train_images))
    print(f"[{setup}] fit {fit_memory.seconds:.1f}s; evaluating {len(test)} images ...", file=sys.stderr, flush=True)
    with PeakMemory() as predict_memory:
        metrics = evaluate(model, list(test), batch_images=batch_images)
    row = {"setup": setup, **extra, **metrics}
    row["fit_seconds"] = fit_memory.seconds
    row["fit_peak_rss_mb"] = fit_memory.peak_rss_mb
    row["predict_peak_rss_mb"] = predict_memory.peak_rss_mb
    row["config"] = config.model_dump(mode="json")
    history = model.strategy.training_history()
    if history:  # the loss curve of every trained stage, in the JSON and summarised in the table
        row["loss_curve"] = history
        row["loss_first_last"] = "; ".join(f"{stage} {values[0]:.4g} -> {values[-1]:.4g} ({len(values)} ep)" for stage, values in history.items())
    if describe is not None:
        row.update(describe(model))
    print(f"[{setup}] " + ", ".join(f"{k}={row[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro_30", "seconds_per_image")), file=sys.stderr, flush=True)
    return row


def tiled_strategy(model: AnomalyModel) -> TiledStrategy:
    """The model's tiled / downsample strategy, for benchmarks that embed images by hand."""
    strategy = model.strategy
    if not isinstance(strategy, TiledStrategy):
        raise TypeError(f"this benchmark needs a tiled or downsample strategy, got {type(strategy).__name__}")
    return strategy


def capsules(path: Path | None = None) -> Dataset:
    DATA_READ.add("capsules")
    return load_dataset(path or CAPSULES)


def _note_capsules(paths: Sequence[Path]) -> None:
    """Note in :data:`DATA_READ` when any of ``paths`` lies in the VisA capsules folder."""
    root = CAPSULES.resolve()
    if any(Path(path).resolve().is_relative_to(root) for path in paths):
        DATA_READ.add("capsules")


def add_texture_and_capsules_arguments(parser: argparse.ArgumentParser) -> None:
    """The datasets of the calibration benchmarks: hrad's demo textures and a capsules subset."""
    parser.add_argument("--textures", nargs="*", default=["gravel", "brick", "grass"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--demo-train", type=int, default=10)
    parser.add_argument("--demo-test", type=int, default=10, help="good and anomalous test images each")
    parser.add_argument("--capsules-train", type=int, default=30, help="0 skips capsules")
    parser.add_argument("--capsules-test", type=int, default=30)


def texture_and_capsules(args: argparse.Namespace, work: Path, seed: int = 0) -> Iterator[tuple[str, list[Path], list[Sample]]]:
    """(name, training paths, test samples) per dataset of :func:`add_texture_and_capsules_arguments`:
    each texture made with ``make_demo_dataset`` (``seed``) under ``work``, then capsules (a
    :func:`subset` drawn with ``seed``)."""
    for texture in args.textures:
        root = make_demo_dataset(
            work / texture, image_size=args.size, n_train=args.demo_train, n_test_good=args.demo_test,
            n_test_bad=args.demo_test, seed=seed, texture=texture,
        )  # fmt: skip
        dataset = load_dataset(root)
        yield f"demo {texture}", sorted(dataset.train), list(dataset.test)
    if args.capsules_train:
        train, test = subset(capsules(), args.capsules_train, args.capsules_test, seed=seed)
        yield "VisA capsules", list(train), test


def texture_and_capsules_notes(args: argparse.Namespace, seed: int = 0) -> str:
    """The results header's sentence on the datasets :func:`texture_and_capsules` gave for these
    arguments and ``seed``: only those that ran, with their sizes."""
    parts = []
    if args.textures:
        parts.append(
            f"Synthetic textures ({', '.join(args.textures)}): make_demo_dataset at {args.size}x{args.size}, seed {seed}, "
            f"{args.demo_train} training images, {args.demo_test} good + {args.demo_test} anomalous test images."
        )
    if args.capsules_train:
        chosen = "the first by name" if seed == 0 else f"drawn with seed {seed}"
        parts.append(
            f"VisA capsules: {args.capsules_train} training images ({chosen}), {args.capsules_test or 'all'} test images "
            f"(label-stratified subset, seed {seed})."
        )
    return " ".join(parts) or "No datasets."


def write_results(name: str, rows: list[dict[str, Any]], notes: str, columns: Sequence[str] = MAIN_COLUMNS, extra_tables: dict[str, Sequence[str]] | None = None) -> Path:
    """benchmarks/results/<name>.json and .md, with environment and command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).relative_to(ROOT.parent)) if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]])
    env = environment()
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command, "environment": env, "notes": notes, "rows": rows}, indent=2, default=str))
    attribution = f"{ATTRIBUTION}\n\n" if "capsules" in DATA_READ else ""
    text = f"# {name}\n\n{notes}\n\n{attribution}Command: `{command}`\n\nMachine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']} on {env['device']}; date {env['date']}.\n\n"
    text += table(rows, columns)
    for title, table_columns in (extra_tables or {}).items():
        text += f"\n## {title}\n\n" + table(rows, table_columns)
    curves = [row for row in rows if row.get("loss_curve")]
    if curves:
        plot_loss_curves(curves, RESULTS / f"{name}_loss.png")
        text += f"\n## Training loss (mean per epoch)\n\n![loss curves]({name}_loss.png)\n\n" + table(curves, ["setup", "loss_first_last"])
    (RESULTS / f"{name}.md").write_text(text)
    return RESULTS / f"{name}.md"


def plot_loss_curves(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per results row: mean training loss per epoch of each stage (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.2), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        for stage, values in row["loss_curve"].items():
            ax.plot(range(1, len(values) + 1), values, label=stage)
        ax.set(title=row["setup"], xlabel="epoch", ylabel="mean loss", yscale="log")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def subset_test(samples: Sequence[Sample], count: int | None) -> list[Sample]:
    """``count`` test samples, anomalous and good interleaved (deterministic; HiAD and ensemble benchmarks)."""
    _note_capsules([sample.path for sample in samples])
    if count is None or count >= len(samples):
        return list(samples)
    good = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    picked: list[Sample] = []
    while len(picked) < count and (good or bad):
        for group in (bad, good):
            if group and len(picked) < count:
                picked.append(group.pop(0))
    return picked
