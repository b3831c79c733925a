"""Reproduce the tiled-ensemble paper's comparison and its memory-scaling figure.

Part 1 (accuracy table): the six setups of Rolih et al. (SM256, SM512, ST4, ST9, ENS4, ENS9)
plus a tiled ensemble at native resolution (ENS-native), for each detector (PatchCore, PaDiM),
fitted with :class:`hrad.model.AnomalyModel` and scored with :func:`hrad.evaluation.evaluate`
(image AUROC, pixel AUPRO@30%, exact at full ground-truth resolution).

Part 2 (memory table): peak predict memory of a single model (whole image at S x S) against a
tiled ensemble (256 tiles at native S x S) for S in 512/1024/2048/4096 on upscaled images. Each
measurement runs in a fresh process (fit + save, then load + predict) so that one run's memory
does not leak into the next; peak RSS (and peak GPU memory on CUDA) cover load + predict.

    python benchmarks/tiled_ensemble.py --data /work/shared/data/visa/capsules --out runs/ens

Notes: ST4/ST9 use the ``tiled`` strategy, whose ``image_size`` is the long side (aspect kept),
while SM*/ENS* resize to a 512 x 512 square as in the paper. The paper averages 3 seeds with
ResNet18; ``--seeds`` and ``--backbone`` control that here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
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

#: the paper's setups (section 4.2) plus the ensemble at the images' own resolution
SETUPS: dict[str, dict[str, Any]] = {
    "SM256": {"name": "downsample", "image_size": 256},
    "SM512": {"name": "downsample", "image_size": 512},
    "ST4": {"name": "tiled", "image_size": 512, "tile": 256, "stride": 256},
    "ST9": {"name": "tiled", "image_size": 512, "tile": 256, "stride": 128},
    "ENS4": {"name": "tiled-ensemble", "image_size": 512, "tile": 256, "stride": 256},
    "ENS9": {"name": "tiled-ensemble", "image_size": 512, "tile": 256, "stride": 128},
    "ENS-native": {"name": "tiled-ensemble", "image_size": None, "tile": 256, "stride": 256},
}


class PathImages:
    """Lazy :class:`~hrad.strategies.base.ImageSource` over image files, optionally resized square."""

    def __init__(self, paths: Sequence[Path], size: int | None = None) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        image = read_image(self.paths[index])
        return image if self.size is None else upscale(image, self.size)


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1).astype(np.float32)


def model_config(args: argparse.Namespace, detector: str, setup: dict[str, Any], seed: int) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(name=args.backbone),
        detector=detector_config({"name": detector, "seed": seed}),
        strategy=strategy_config({**setup, "batch_size": args.batch_size}),
        device=args.device,
        seed=seed,
    )


def run_setups(args: argparse.Namespace, dataset: Dataset) -> list[dict[str, Any]]:
    train = PathImages(dataset.train[: args.n_train])
    validation = PathImages(dataset.validation) if dataset.validation else None
    test = subset_test(dataset.test, args.n_test)
    rows: list[dict[str, Any]] = []
    for detector in args.detectors:
        for name in args.setups:
            for seed in range(args.seeds):
                row: dict[str, Any] = {"detector": detector, "setup": name, "seed": seed}
                try:
                    model = AnomalyModel(model_config(args, detector, SETUPS[name], seed))
                    with PeakMemory() as fit_memory:
                        model.fit(train, validation=validation)
                    metrics = evaluate(model, test)
                except (HradError, MemoryError, RuntimeError) as error:
                    row["error"] = str(error).splitlines()[0]
                    print(f"{detector} {name} seed {seed}: {row['error']}", file=sys.stderr)
                    rows.append(row)
                    continue
                row.update(
                    image_auroc=metrics["image_auroc"],
                    aupro_30=metrics.get("aupro_30"),
                    pixel_auroc=metrics.get("pixel_auroc"),
                    fit_s=fit_memory.seconds,
                    fit_peak_rss_mb=fit_memory.peak_rss_mb,
                    predict_s_per_image=metrics["seconds_per_image"],
                    eval_peak_rss_mb=metrics["peak_rss_mb"],
                    eval_peak_gpu_mb=metrics.get("peak_gpu_mb"),
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds per (detector, setup); AUROC / AUPRO shown in percent like the paper."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["detector"], row["setup"]), []).append(row)
    out = []
    for (detector, setup), group in grouped.items():
        good = [r for r in group if "error" not in r]
        if not good:
            out.append({"detector": detector, "setup": setup, "AUROC/AUPRO": group[0]["error"]})
            continue

        def mean(key: str, rows: list[dict[str, Any]] = good) -> float:
            values = [r[key] for r in rows if r.get(key) is not None]
            return float(np.mean(values)) if values else float("nan")

        out.append(
            {
                "detector": detector,
                "setup": setup,
                "AUROC/AUPRO": f"{100 * mean('image_auroc'):.1f} / {100 * mean('aupro_30'):.1f}",
                "seeds": len(good),
                "fit s": f"{mean('fit_s'):.1f}",
                "s/image": f"{mean('predict_s_per_image'):.2f}",
                "eval peak RSS MB": f"{mean('eval_peak_rss_mb'):.0f}",
            }
        )
    return out


# ---------------------------------------------------------------------------------- memory
def memory_strategies(size: int) -> dict[str, dict[str, Any]]:
    return {
        "single model": {"name": "downsample", "image_size": size},
        "tiled ensemble": {"name": "tiled-ensemble", "image_size": None, "tile": 256, "stride": 256},
    }


def memory_worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process: ``fit`` saves a model, ``predict`` loads and measures."""
    setup = json.loads(args.worker_setup)
    artifact = Path(args.worker_artifact)
    if args.worker == "fit":
        dataset = load_dataset(args.data, category=args.category)
        images = PathImages(dataset.train[: args.memory_train], size=args.worker_size)
        model = AnomalyModel(model_config(args, args.memory_detector, setup, 0))
        model.fit(images, validation=[])
        model.save(artifact)
        return
    dataset = load_dataset(args.data, category=args.category)
    image = upscale(read_image(dataset.test[0].path), args.worker_size)
    with PeakMemory() as memory:
        model = AnomalyModel.load(artifact, device=args.device)
        start = time.perf_counter()
        model.predict(image)
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"peak_rss_mb": memory.peak_rss_mb, "peak_gpu_mb": memory.peak_gpu_mb, "predict_s": seconds}
        )
    )


def run_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    base = [
        sys.executable,
        __file__,
        "--data",
        str(args.data),
        "--backbone",
        args.backbone,
        "--device",
        args.device,
    ]
    base += ["--memory-detector", args.memory_detector, "--memory-train", str(args.memory_train)]
    base += ["--batch-size", str(args.batch_size)] + (["--category", args.category] if args.category else [])
    # the fitted models are only the workers' hand-over: a temporary folder, never the results
    work = Path(tempfile.mkdtemp(prefix="hrad_tiled_ensemble_memory_"))
    for size in args.memory_sizes:
        for label, setup in memory_strategies(size).items():
            artifact = work / f"{label.replace(' ', '-')}-{size}"
            common = base + ["--worker-size", str(size), "--worker-setup", json.dumps(setup)]
            common += ["--worker-artifact", str(artifact)]
            row: dict[str, Any] = {"size": size, "strategy": label}
            fit = subprocess.run([*common, "--worker", "fit"], capture_output=True, text=True)
            if fit.returncode != 0:
                row["error"] = "fit failed: " + (fit.stderr.strip().splitlines() or ["?"])[-1]
            else:
                predict = subprocess.run([*common, "--worker", "predict"], capture_output=True, text=True)
                if predict.returncode != 0:
                    row["error"] = "predict failed: " + (predict.stderr.strip().splitlines() or ["?"])[-1]
                else:
                    row.update(json.loads(predict.stdout.strip().splitlines()[-1]))
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(artifact, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------- main
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="dataset category folder (MVTec/VisA layout)"
    )
    parser.add_argument("--category", default=None, help="category, when --data holds several")
    parser.add_argument("--n-train", type=int, default=None, help="first N training images (default all)")
    parser.add_argument(
        "--n-test", type=int, default=None, help="N test images, anomalous and good interleaved"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/tiled_ensemble"))
    parser.add_argument("--detectors", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--backbone", default="resnet18", help="the paper uses ResNet18 for every setup")
    parser.add_argument("--seeds", type=int, default=1, help="the paper averages 3")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-setups", action="store_true", help="only the memory table")
    parser.add_argument("--skip-memory", action="store_true", help="only the accuracy table")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--memory-detector", default="padim", help="the paper's figure 6 uses PaDiM")
    parser.add_argument("--memory-train", type=int, default=4, help="upscaled training images per memory run")
    # internal: one memory measurement in a fresh process
    parser.add_argument("--worker", choices=["fit", "predict"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-setup", help=argparse.SUPPRESS)
    parser.add_argument("--worker-artifact", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        memory_worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(args.data, category=args.category)
    report = ["# Tiled ensemble: paper setups and memory scaling", "", f"Data: {dataset!r}", ""]
    results: dict[str, Any] = {
        "environment": environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if not args.skip_setups:
        rows = run_setups(args, dataset)
        results["setups"] = rows
        report += ["## Accuracy (image AUROC / AUPRO@30%, percent)", "", table(mean_rows(rows)), ""]
    if not args.skip_memory:
        memory = run_memory(args)
        results["memory"] = memory
        report += [
            f"## Predict peak memory ({args.memory_detector}, upscaled S x S images)",
            "",
            table(memory),
            "",
        ]
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "results.md").write_text("\n".join(report))
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    if os.environ.get("HRAD_BENCH_REGISTER"):  # tests/smoke runs: import a module that registers detectors
        __import__(os.environ["HRAD_BENCH_REGISTER"])
    main()
