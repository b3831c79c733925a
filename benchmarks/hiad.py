"""HiAD ablations (Zhang et al., Tables VIII-XII) through the public model and evaluation API.

Groups (``--groups``, default all):

* ``branches``   low-resolution branch on/off x fusion rates {0}, {0,1}, {0,1,2} (Tables VIII, IX)
* ``assignment`` A2O / O2O / NA / SCA / RA with M = 1, 2, 4, 8 (Tables X, XI); setups whose M
  exceeds the patch positions are recorded with their error instead of silently skipped
* ``patch``      patch size 256 / 384 / 512 (Table XII)
* ``baselines``  HiAD vs a tiled ensemble at native resolution vs uniform downsampling (512)

``--detector`` takes one or more names: every setup runs once per detector on the same images, so
``--detector patchcore fastflow rdpp --groups baselines --only HiAD`` is one HiAD pool table.
``--detector-option KEY=VALUE`` applies to every detector, ``NAME:KEY=VALUE`` to detector NAME only
(e.g. ``rdpp:epochs=10``). ``NAME@LABEL`` runs detector NAME under its own label, so one run can
compare two configurations of a detector: ``--detector realnet realnet@image --detector-option
realnet@image:synthesis=image``.

Every setup is fitted with :class:`hrad.model.AnomalyModel` (20% of the training images held out
for calibration and thresholds) and evaluated with :func:`hrad.evaluation.evaluate` at full
ground-truth resolution (``--protocol hiad512`` for the paper's 512 x 512 pixel metrics).

    python benchmarks/hiad.py --data /work/shared/data/visa/capsules --out runs/hiad
    python benchmarks/hiad.py --data /work/shared/data/visa/capsules --build-2k runs/visa2k --out runs/hiad2k

``--build-2k DIR`` first writes a VisA-2K-style set (upscaled to 2048, transplanted tiny defects,
:func:`hrad.data.hd_builder.build_hd_dataset`) to DIR, then benchmarks on it. Full-size runs take
hours on a CPU; use --n-train / --n-test for smoke runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import subset_test
from hrad.config import ModelConfig
from hrad.data.datasets import Dataset, load_dataset
from hrad.data.images import read_image
from hrad.detectors.base import detector_config
from hrad.errors import HradError
from hrad.evaluation import environment, evaluate
from hrad.features.base import BackboneConfig
from hrad.model import AnomalyModel
from hrad.profiling import PeakMemory
from hrad.reports.markdown import table
from hrad.strategies.base import strategy_config

GROUPS = ("branches", "assignment", "patch", "baselines")
COLUMNS = [
    "group",
    "setup",
    "detector",
    "image_auroc",
    "pixel_auroc",
    "pixel_ap",
    "aupro_30",
    "detectors",
    "fit_s",
    "predict_s_per_image",
    "fit_peak_rss_mb",
    "error",
]


def hiad(**options: Any) -> dict[str, Any]:
    return {"name": "hiad", **options}


def setups(group: str, base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, strategy section) pairs of one ablation group; ``base`` holds shared HiAD options."""
    if group == "branches":
        rows = []
        for low in (False, True):
            for rates in ((0,), (0, 1), (0, 1, 2)):
                label = f"low={'on' if low else 'off'} rates={{{','.join(map(str, rates))}}}"
                rows.append((label, hiad(**{**base, "low_branch": low, "fusion_rates": rates})))
        return rows
    if group == "assignment":
        rows = [
            ("A2O (1)", hiad(**{**base, "assignment": "a2o"})),
            ("O2O", hiad(**{**base, "assignment": "o2o"})),
        ]
        for kind in ("na", "sca", "ra"):
            for count in (1, 2, 4, 8):
                rows.append(
                    (
                        f"{kind.upper()} ({count})",
                        hiad(**{**base, "assignment": kind, "num_detectors": count}),
                    )
                )
        return rows
    if group == "patch":
        return [(f"patch {size}", hiad(**{**base, "patch_size": size})) for size in (256, 384, 512)]
    if group == "baselines":
        size = int(base.get("patch_size", 512))
        return [
            ("HiAD", hiad(**base)),
            (
                f"tiled ensemble (native, {size} tiles)",
                {"name": "tiled-ensemble", "image_size": None, "tile": size},
            ),
            (f"downsampling ({size})", {"name": "downsample", "image_size": size}),
        ]
    raise SystemExit(f"unknown group {group!r}; known: {', '.join(GROUPS)}")


class PathImages:
    """Lazy image source over files (only one image in memory at a time)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])


def run(args: argparse.Namespace, dataset: Dataset) -> list[dict[str, Any]]:
    train = PathImages(sorted(dataset.train)[: args.n_train])
    test = subset_test(dataset.test, args.n_test)
    base: dict[str, Any] = {"batch_size": args.batch_size, "workers": args.workers}
    if args.assignment:
        base["assignment"] = args.assignment
    if args.num_detectors is not None:
        base["num_detectors"] = args.num_detectors
    if args.patch_size is not None:  # ViT backbones need a multiple of their patch (14 for DINOv2)
        base["patch_size"] = base["low_res_size"] = args.patch_size
    rows: list[dict[str, Any]] = []
    for group in args.groups:
        for label, strategy in setups(group, base):
            if args.only and not any(label.startswith(prefix) for prefix in args.only):
                continue
            for name in args.detector:
                rows.append(run_setup(args, train, test, group, label, strategy, name))
                write(args.out, rows, args)  # after every row: a run cut short keeps what it measured
    return rows


def detector_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The ``--detector-option`` entries for detector ``name``: unprefixed ones and ``name:`` ones."""
    options: dict[str, Any] = {}
    for key, value in args.detector_option:
        target, sep, field = key.rpartition(":")
        if not sep:
            options[key] = value
        elif target == name:
            options[field] = value
    return options


def run_setup(
    args: argparse.Namespace,
    train: PathImages,
    test: Any,
    group: str,
    label: str,
    strategy: dict[str, Any],
    name: str,
) -> dict[str, Any]:
    """Fit and evaluate one (setup, detector) pair; a failure is recorded in the row's ``error``."""
    detector = {"name": name.partition("@")[0], "seed": args.seed, **detector_options(args, name)}
    row: dict[str, Any] = {"group": group, "setup": label, "detector": name}
    try:
        config = ModelConfig(
            backbone=BackboneConfig(name=args.backbone),
            detector=detector_config(detector),
            strategy=strategy_config(strategy),
            device=args.device,
            seed=args.seed,
        )
        model = AnomalyModel(config)
        with PeakMemory() as fit_memory:
            model.fit(train)
        metrics = evaluate(model, test, protocol=args.protocol)
    except (HradError, MemoryError, RuntimeError) as error:
        row["error"] = str(error).splitlines()[0]
        print(f"[{group}] {label} {name}: {row['error']}", file=sys.stderr, flush=True)
        return row
    row.update(
        image_auroc=metrics.get("image_auroc"),
        pixel_auroc=metrics.get("pixel_auroc"),
        pixel_ap=metrics.get("pixel_ap"),
        aupro_30=metrics.get("aupro_30"),
        detectors=getattr(model.strategy, "detector_count", None),
        fit_s=fit_memory.seconds,
        fit_peak_rss_mb=fit_memory.peak_rss_mb,
        predict_s_per_image=metrics.get("seconds_per_image"),
        config=config.model_dump(mode="json"),
    )
    print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    return row


def write(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/hiad.py " + " ".join(sys.argv[1:])
    env = environment()
    (out / "hiad.json").write_text(
        json.dumps({"command": command, "environment": env, "rows": rows}, indent=2, default=str)
    )
    text = (
        "# HiAD ablations\n\n"
        f"Data: `{args.data}`{' (built to 2K)' if args.build_2k else ''}; "
        f"detector{'s' if len(args.detector) > 1 else ''} {', '.join(args.detector)}"
        f"{' ' + str(dict(args.detector_option)) if args.detector_option else ''} on {args.backbone}; "
        f"{args.n_train or 'all'} training images (20% held out for calibration), {args.n_test or 'all'} test images; "
        f"pixel protocol {args.protocol}.\n\nCommand: `{command}`\n\n"
        f"Machine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']} on {env['device']}; date {env['date']}.\n\n"
    )
    for group in args.groups:
        text += f"## {group}\n\n" + table([r for r in rows if r["group"] == group], COLUMNS) + "\n"
    (out / "hiad.md").write_text(text)
    return out / "hiad.md"


def option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, JSON value or the plain string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset root (MVTec / VisA layout)")
    parser.add_argument("--n-train", type=int, default=None, help="first N training images (default all)")
    parser.add_argument("--n-test", type=int, default=None, help="N test images, good and bad interleaved")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hiad"), help="results directory")
    parser.add_argument(
        "--build-2k", type=Path, default=None, metavar="DIR", help="build a 2K set from --data into DIR first"
    )
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="PREFIX", help="run only setups whose label starts with one of these"
    )
    parser.add_argument(
        "--detector",
        nargs="+",
        default=["patchcore"],
        help="one or more detectors (NAME or NAME@LABEL); every setup runs once per detector on the same images",
    )
    parser.add_argument(
        "--detector-option",
        type=option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="detector config field, repeatable (e.g. epochs=5, or rdpp:epochs=5 for one detector only); "
        "values parsed as JSON when they can be",
    )
    parser.add_argument("--patch-size", type=int, default=None, help="HiAD patch / low-res size, ensemble tile, downsample size")
    parser.add_argument("--num-detectors", type=int, default=None, help="HiAD pool size M for sca/na/ra")
    parser.add_argument("--backbone", default="wide-resnet50")
    parser.add_argument(
        "--assignment",
        default="o2o",
        help="assignment for the non-assignment groups (paper: o2o for PatchCore)",
    )
    parser.add_argument("--protocol", default="full", choices=("full", "hiad512"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="detector-parallel worker processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = sorted({key.rpartition(":")[0] for key, _ in args.detector_option} - {"", *args.detector})
    if unknown:
        parser.error(f"--detector-option names detectors not in --detector: {', '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    root = args.data
    if args.build_2k is not None:
        from hrad.data.hd_builder import build_hd_dataset

        if not (args.build_2k / "train").is_dir():
            build_hd_dataset(args.data, args.build_2k, target_size=2048, seed=args.seed)
        root = args.build_2k
    rows = run(args, load_dataset(root))
    print(write(args.out, rows, args))


if __name__ == "__main__":
    main()
