"""hrad's tiled ensemble against anomalib's, at the same settings, back to back in one run.

ENS4 of Rolih et al.: images resized to 512 x 512, tiles of 256, stride 256 (four tile models),
PatchCore on ResNet-18 layer2 + layer3 with coreset ratio 0.01. Both sides use the same seeded
random ResNet-18 weights (``torchvision.models.resnet18()`` after ``torch.manual_seed(seed)``,
written once to a ``.pth`` file: no pretrained download is possible on these machines), the same
training and test images (a folder of links in the MVTec layout) and seam smoothing with band 0.1
and sigma 2. anomalib runs in its own virtualenv (``--anomalib-python``), through its
``TrainTiledEnsemble`` / ``EvalTiledEnsemble`` pipelines' runners with one workaround: its
``get_model`` merges the ensemble's ``PreProcessor`` object into the model's ``init_args``
OmegaConf node, which OmegaConf refuses (``UnsupportedValueType: Value 'PreProcessor' is not a
supported primitive type``, anomalib issue #2898), so the helper module's ``get_model`` is
replaced by one that builds the model class by name from a plain dict of the same arguments.

Each phase runs in a fresh process, in this order: anomalib fit, anomalib predict, hrad fit,
hrad predict (one image at a time through ``AnomalyModel.predict``), hrad predict in batches
(``predict_batch``). Peak RSS is the kernel's high-water mark of that process (``os.wait4``);
seconds are measured inside the process from before the model is loaded (anomalib: its
predict job loads each tile's checkpoint) to the last image's scored full map, so interpreter
start and imports are excluded on both sides, decoding included. anomalib's visualisation and
metrics jobs run after the timed part (metrics give its image AUROC as a sanity check).

    PYTHONPATH=. python benchmarks/vs_anomalib.py --anomalib-python /tmp/anomalib_venv/bin/python \\
        --n-train 20 --n-test 20

Install anomalib's side (outside the repository):
``python3 -m venv /tmp/anomalib_venv && /tmp/anomalib_venv/bin/pip install torch==2.14.1
torchvision==0.29.1 && /tmp/anomalib_venv/bin/pip install anomalib==2.7.0``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGE_SIZE, TILE, STRIDE, CORESET = 512, 256, 256, 0.01
LAYERS = ["layer2", "layer3"]
SEAM_BAND, SEAM_SIGMA = 0.1, 2.0


# --------------------------------------------------------------------------- anomalib side
# (runs with the anomalib virtualenv's python: only the standard library at module level)
def anomalib_config(work: Path, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "accelerator": "cpu",
        "default_root_dir": str(work / "anomalib_results"),
        "tiling": {"image_size": [IMAGE_SIZE, IMAGE_SIZE], "tile_size": [TILE, TILE], "stride": STRIDE},
        "normalization_stage": "image",
        "thresholding_stage": "image",
        "data": {
            "class_path": "anomalib.data.Folder",
            "init_args": {
                "name": "capsules",
                "root": str(work / "data"),
                "normal_dir": "train/good",
                "abnormal_dir": "test/bad",
                "normal_test_dir": "test/good",
                "mask_dir": "ground_truth/bad",
                "num_workers": 0,
                "test_split_mode": "from_dir",
                "val_split_mode": "from_train",  # 20% of the training images, as hrad's thresholds
                "val_split_ratio": 0.2,
                "seed": seed,
            },
        },
        "SeamSmoothing": {"apply": True, "sigma": SEAM_SIGMA, "width": SEAM_BAND},
        "TrainModels": {
            "model": {
                "class_path": "Patchcore",
                "init_args": {
                    "backbone": "resnet18",
                    "layers": LAYERS,
                    "pre_trained": False,
                    "coreset_sampling_ratio": CORESET,
                },
            }
        },
    }


def anomalib_patches(weights: Path) -> None:
    """The ``init_args`` workaround, and the seeded weights loaded into every timm ResNet-18."""
    import torch
    from anomalib.models import get_model
    from anomalib.models.components.feature_extractors import timm as timm_extractor
    from anomalib.pipelines.tiled_ensemble.components.utils import helper_functions

    def get_model_plain(model: Any, *args: Any, **kwargs: Any) -> Any:
        spec = dict(model)
        init = dict(spec.get("init_args") or {})
        init.update(kwargs)
        return get_model(str(spec["class_path"]).split(".")[-1].lower(), *args, **init)

    helper_functions.get_model = get_model_plain  # type: ignore[assignment]
    state = torch.load(weights, map_location="cpu")
    original = timm_extractor.TimmFeatureExtractor.__init__

    def init_with_weights(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        missing, _ = self.feature_extractor.load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(f"seeded ResNet-18 weights miss {missing[:3]}")

    timm_extractor.TimmFeatureExtractor.__init__ = init_with_weights  # type: ignore[method-assign]


def run_runners(runners: list[Any], config: dict[str, Any]) -> tuple[dict[str, float], Any]:
    """Run a pipeline's runners in order as ``Pipeline.run`` does, timing each stage."""
    seconds: dict[str, float] = {}
    previous = None
    for runner in runners:
        name = runner.generator.job_class.name
        started = time.perf_counter()
        previous = runner.run(config.get(name) or {}, previous)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
    return seconds, previous


def anomalib_worker(phase: str, work: Path, seed: int) -> dict[str, Any]:
    import anomalib
    import torch

    if phase == "weights":
        import torchvision

        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18().state_dict(), work / "resnet18_seeded.pth")
        return {"weights": str(work / "resnet18_seeded.pth"), "torch": torch.__version__, "anomalib": anomalib.__version__}
    anomalib_patches(work / "resnet18_seeded.pth")
    config = anomalib_config(work, seed)
    out: dict[str, Any] = {"anomalib": anomalib.__version__, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if phase == "fit":
        from anomalib.pipelines.tiled_ensemble.train_pipeline import TrainTiledEnsemble

        started = time.perf_counter()
        pipeline = TrainTiledEnsemble()
        runners = pipeline._setup_runners(config)  # noqa: SLF001  (the pipeline's own runners, errors not swallowed)
        stages, _ = run_runners(runners, config)
        out["fit_seconds"] = time.perf_counter() - started
        out["stages"] = stages
        (work / "anomalib_root.txt").write_text(str(pipeline.root_dir))
        return out
    from anomalib.pipelines.tiled_ensemble.test_pipeline import EvalTiledEnsemble

    root = Path((work / "anomalib_root.txt").read_text())
    runners = EvalTiledEnsemble(root)._setup_runners(config)  # noqa: SLF001
    untimed = {"Visualize", "Metrics"}
    timed_runners = [r for r in runners if r.generator.job_class.name not in untimed]
    started = time.perf_counter()
    stages, predictions = run_runners(timed_runners, config)
    out["predict_seconds"] = time.perf_counter() - started
    out["stages"] = stages
    metrics_runners = [r for r in runners if r.generator.job_class.name == "Metrics"]
    if metrics_runners:
        metrics = metrics_runners[0].run(config.get("Metrics") or {}, predictions)
        out["metrics"] = {key: float(value) for key, value in (metrics or {}).items()}
    return out


# --------------------------------------------------------------------------- hrad side
def hrad_config(work: Path, seed: int, runtime: str = "torch") -> dict[str, Any]:
    return {
        "backbone": {"name": "resnet18", "weights": str(work / "resnet18_seeded.pth"), "runtime": runtime},
        "detector": {"name": "patchcore", "coreset_ratio": CORESET, "layers": LAYERS},
        "strategy": {
            "name": "tiled-ensemble",
            "image_size": IMAGE_SIZE,
            "tile": TILE,
            "stride": STRIDE,
            "seam_smoothing": True,
            "seam_band": SEAM_BAND,
            "seam_sigma": SEAM_SIGMA,
        },
        "seed": seed,
    }


def hrad_worker(phase: str, work: Path, seed: int, batch_images: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from hrad.config import load_config
    from hrad.data.images import ImageList, as_pixels
    from hrad.model import AnomalyModel
    from hrad.postprocess.smoothing import smooth_and_score

    lists = json.loads((work / "images.json").read_text())
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    phase, _, runtime = phase.partition(":")
    if runtime == "openvino":
        import openvino

        out["openvino"] = openvino.__version__
    artifact = work / f"hrad_model_{runtime or 'torch'}"
    if phase == "fit":
        started = time.perf_counter()
        config = load_config(None, hrad_config(work, seed, runtime or "torch"))
        model = AnomalyModel(config).fit(ImageList([Path(p) for p in lists["train"]]))
        out["fit_seconds"] = time.perf_counter() - started
        model.save(artifact)
        out["config"] = model.config.model_dump(mode="json")
        return out
    paths = [Path(p) for p in lists["test"]]
    started = time.perf_counter()
    model = AnomalyModel.load(artifact)
    out["load_seconds"] = time.perf_counter() - started
    scores: list[float] = []
    if phase == "predict":
        for path in paths:
            scores.append(model.predict(path).score)
    else:  # batches of images through Strategy.predict_batch, then the model's one post-processing step
        for start in range(0, len(paths), batch_images):
            arrays = [as_pixels(path) for path in paths[start : start + batch_images]]
            with torch.inference_mode():
                results = model.strategy.predict_batch(arrays)
            for result in results:
                scores.append(smooth_and_score(result.anomaly_map, result.score, model.config.postprocess)[1])
    out["predict_seconds"] = time.perf_counter() - started
    out["images"] = len(paths)
    labels = np.array(lists["labels"])
    values = np.array(scores)
    if 0 < labels.sum() < len(labels):  # image AUROC as a sanity check (rank statistic)
        ranks = values.argsort().argsort() + 1.0
        positives = labels == 1
        out["image_auroc"] = float((ranks[positives].sum() - positives.sum() * (positives.sum() + 1) / 2) / (positives.sum() * (~positives).sum()))
    return out


# --------------------------------------------------------------------------- driver
def link_images(work: Path, n_train: int, n_test: int, data: Path) -> dict[str, Any]:
    """Links to the chosen images in the MVTec layout anomalib's Folder reads; the same lists for hrad."""
    from benchmarks.common import subset_test
    from hrad.data.datasets import load_dataset

    dataset = load_dataset(data)
    train = sorted(dataset.train)[:n_train]
    test = subset_test(dataset.test, n_test)
    root = work / "data"
    for folder in ("train/good", "test/good", "test/bad", "ground_truth/bad"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for path in train:
        (root / "train/good" / path.name).symlink_to(path)
    for sample in test:
        kind = "bad" if sample.label == 1 else "good"
        (root / "test" / kind / sample.path.name).symlink_to(sample.path)
        if sample.label == 1:
            assert sample.mask_path is not None
            (root / "ground_truth/bad" / f"{sample.path.stem}_mask.png").symlink_to(sample.mask_path)
    lists = {
        "train": [str(p) for p in train],
        "test": [str(s.path) for s in test],
        "labels": [int(s.label) for s in test],
    }
    (work / "images.json").write_text(json.dumps(lists))
    return lists


def run_phase(python: str, phase: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """One phase in a fresh process; its JSON result plus the process's peak RSS (``os.wait4``)."""
    command = [python, str(Path(__file__).resolve()), "--worker", phase, "--work", str(args.work), "--seed", str(args.seed), "--batch-images", str(args.batch_images)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(f"[{phase}] ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "a") as stream:
        stream.write(f"\n===== {phase}\n")
        stream.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stream, env=env, cwd=ROOT, text=True)
        assert process.stdout is not None
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{phase} failed with status {process.returncode}; see {log}: {log.read_text()[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    result["wall_seconds"] = time.perf_counter() - started
    print(f"[{phase}] {json.dumps(result)[:400]}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    from benchmarks.common import CAPSULES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anomalib-python", default="/tmp/anomalib_venv/bin/python")
    parser.add_argument("--data", type=Path, default=CAPSULES)
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--batch-images", type=int, default=8, help="images per predict_batch call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hrad_vs_anomalib"))
    parser.add_argument("--name", default="vs_anomalib")
    args = parser.parse_args()
    import shutil

    from hrad.evaluation import environment
    from hrad.reports.markdown import table

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    log = args.work / "log.txt"
    link_images(args.work, args.n_train, args.n_test, args.data)
    weights = run_phase(args.anomalib_python, "anomalib-weights", args, log)
    phases = {
        "anomalib fit": ("anomalib", "fit"),
        "anomalib predict": ("anomalib", "predict"),
        "hrad fit": ("hrad", "fit"),
        "hrad predict": ("hrad", "predict"),
        "hrad predict_batch": ("hrad", "predict-batch"),
        "hrad fit, OpenVINO backbone": ("hrad", "fit:openvino"),
        "hrad predict, OpenVINO backbone": ("hrad", "predict:openvino"),
        "hrad predict_batch, OpenVINO backbone": ("hrad", "predict-batch:openvino"),
    }
    results: dict[str, dict[str, Any]] = {}
    for label, (side, phase) in phases.items():
        python = args.anomalib_python if side == "anomalib" else sys.executable
        results[label] = run_phase(python, f"{side}-{phase}", args, log)
    rows: list[dict[str, Any]] = []
    anomalib_predict = results["anomalib predict"]
    base_per_image = anomalib_predict["predict_seconds"] / args.n_test
    base_rss = anomalib_predict["peak_rss_mib"]
    for label, result in results.items():
        row: dict[str, Any] = {"phase": label, "peak_rss_mib": result["peak_rss_mib"]}
        if "fit_seconds" in result:
            row["fit_seconds"] = result["fit_seconds"]
        if "predict_seconds" in result:
            per_image = result["predict_seconds"] / args.n_test
            row["predict_seconds_per_image"] = per_image
            row["speedup_vs_anomalib"] = base_per_image / per_image
            row["rss_fraction_of_anomalib"] = result["peak_rss_mib"] / base_rss
        auroc = result.get("image_auroc", (result.get("metrics") or {}).get("image_AUROC"))
        if auroc is not None:
            row["image_auroc"] = auroc
        rows.append(row)
    fit_ratio = results["anomalib fit"]["fit_seconds"] / results["hrad fit"]["fit_seconds"]
    openvino_version = results["hrad fit, OpenVINO backbone"].get("openvino")
    env = environment()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "hrad"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
    env["hrad_commit"] = commit + (f" (uncommitted changes in: {', '.join(line[3:] for line in dirty.splitlines())})" if dirty else "")
    command = "PYTHONPATH=. python benchmarks/vs_anomalib.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    notes = (
        f"ENS4 (image {IMAGE_SIZE}, tiles {TILE}, stride {STRIDE}, 4 PatchCore tile models, coreset {CORESET}, "
        f"ResNet-18 {'+'.join(LAYERS)}, the same seeded random weights, seed {args.seed}), seam smoothing band "
        f"{SEAM_BAND} sigma {SEAM_SIGMA}; {args.n_train} training images (20% held out for thresholds on both sides), "
        f"{args.n_test} test images, VisA capsules. anomalib {weights['anomalib']} (torch {weights['torch']}) in its "
        f"own virtualenv, hrad at {env['hrad_commit']} (torch {env['torch']}). One fresh process per phase, in the order "
        "of the table; peak RSS = the process's high-water mark. Predict seconds per image = (load + predict of all "
        "test images) / images, decoding included; anomalib's maps stay at 512 x 512 while hrad's are resized back "
        "to each image's 1500 x 1000 and blurred there (sigma 4), so hrad does more work per image. anomalib's "
        f"visualisation and metrics jobs are not timed. hrad predict_batch: {args.batch_images} images per call. "
        f"OpenVINO rows: the same settings with `backbone.runtime: openvino` (OpenVINO {openvino_version}; the "
        "backbone converted by the OpenVINO fit phase and read back from the hrad cache folder by the timed predict), a separate fit. "
        f"Fit: anomalib / hrad = {fit_ratio:.2f}x. The machine is a loaded, shared 2-core CPU: only the ratios "
        "within this run mean anything."
    )
    payload = {
        "command": command,
        "environment": env,
        "anomalib": weights,
        "notes": notes,
        "rows": rows,
        "phases": results,
        "anomalib_config": anomalib_config(args.work, args.seed),
        "hrad_config": hrad_config(args.work, args.seed),
        "hrad_config_openvino": hrad_config(args.work, args.seed, "openvino"),
        "images": json.loads((args.work / "images.json").read_text()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=str))
    columns = ["phase", "fit_seconds", "predict_seconds_per_image", "speedup_vs_anomalib", "peak_rss_mib", "rss_fraction_of_anomalib", "image_auroc"]
    text = f"# {args.name}\n\n{notes}\n\nData: VisA `capsules` (Zou et al., ECCV 2022), CC BY 4.0, 1500x1000 images.\n\n"
    text += f"Command: `{command}`\n\nMachine: {env['machine']}, {env['cpus']} CPUs, no GPU; date {env['date']}.\n\n"
    text += table(rows, columns)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(RESULTS / f"{args.name}.md")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_parser = argparse.ArgumentParser()
        worker_parser.add_argument("--worker", required=True)
        worker_parser.add_argument("--work", type=Path, required=True)
        worker_parser.add_argument("--seed", type=int, default=0)
        worker_parser.add_argument("--batch-images", type=int, default=8)
        worker_args = worker_parser.parse_args()
        side, _, phase = worker_args.worker.partition("-")
        if side == "anomalib":
            result = anomalib_worker(phase, worker_args.work, worker_args.seed)
        else:
            result = hrad_worker(phase, worker_args.work, worker_args.seed, worker_args.batch_images)
        print(json.dumps(result, default=str))
    else:
        main()
