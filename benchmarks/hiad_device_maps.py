"""HiAD's per-image work outside the networks, step by step, and the two map paths of its predict.

What a GPU cannot speed up while it runs on the host: on an H200, 2K HiAD-DeSTSeg predicted in
296 ms with the Lite0 backbone at 4 ms (``results/gpu_cuda.md``). This script fits one HiAD model
on ``make-hd`` images of ``--size`` (hrad's synthetic demo textures scaled up, as
``benchmarks/gpu.py``) and times, on one test image, every full-resolution step of predict as
the host path runs it (numpy / OpenCV on the host, one map held) and as the device path runs it
(torch on the maps' device, ``HiAD.device_maps``; here forced on the CPU), then the whole
``Strategy.predict`` both ways and the model's own post-processing (border calibration, blur,
score) that follows either: on the host (numpy / OpenCV) or on the map's device
(``hrad.postprocess.device_maps.smooth_and_score``, one copy back), then the whole
``AnomalyModel.predict`` three ways: host maps and host post-processing (the CPU default), device
maps finished on the host (``AnomalyModel.device_postprocess`` off: a GPU predict before the model
finished device maps there), device maps finished on the device (a GPU's default now). Steps and
whole predicts alternate between the paths, ``--repeats`` times each; medians. The raw outputs
(backbone, fusion, detectors) are the same for both paths and timed once per repeat. On a CPU
the device path is forced there (its blur is torch's, several times slower than OpenCV's), so
its rows say what the device path costs where it runs, not what a GPU gains.

    PYTHONPATH=. python benchmarks/hiad_device_maps.py --size 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import write_results
from hrad.config import load_config
from hrad.data.datasets import load_dataset
from hrad.data.hd_builder import build_hd_dataset
from hrad.data.images import read_pixels
from hrad.data.synthetic import make_demo_dataset
from hrad.imaging import resize
from hrad.model import AnomalyModel
from hrad.postprocess import device_maps
from hrad.postprocess.smoothing import smooth_and_score
from hrad.prediction import Prediction
from hrad.strategies.hiad import HiAD

COLUMNS = ["step", "path", "ms_median", "ms_min", "share_of_predict"]


def timed(run: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = run()
        times.append(1000 * (time.perf_counter() - start))
    return times, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="make-hd long side")
    parser.add_argument("--detector", default="patchcore", choices=["patchcore", "destseg"])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--n-train", type=int, default=4, help="training images (a quarter held out for calibration)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="hiad_device_maps")
    args = parser.parse_args()
    detector: dict[str, Any] = {"name": args.detector}
    if args.detector == "destseg":
        detector.update(student_epochs=1, segmentation_epochs=1)
    strategy_options = {"name": "hiad", "patch_size": 512, "low_res_size": 512, "assignment": "sca", "num_detectors": 4}
    with tempfile.TemporaryDirectory(prefix="hrad_hiad_maps_") as work:
        source = make_demo_dataset(Path(work) / "source", image_size=512, n_train=args.n_train, n_test_good=1, n_test_bad=1)
        dataset = load_dataset(build_hd_dataset(source, Path(work) / "hd", target_size=args.size, seed=0))
        train = [read_pixels(path) for path in sorted(dataset.train)[: args.n_train]]
        image = read_pixels(sorted(dataset.test, key=lambda s: str(s.path))[-1].path)
    config = load_config(
        None,
        {
            "backbone": {"name": args.backbone},
            "detector": detector,
            "strategy": strategy_options,
            "threshold": {"validation_fraction": 0.25},
            "device": "cpu",
        },
    )
    start = time.perf_counter()
    model = AnomalyModel(config).fit(train)
    fit_s = time.perf_counter() - start
    strategy = model.strategy
    assert isinstance(strategy, HiAD)
    repeats = args.repeats
    height, width = image.shape[:2]
    samples: dict[tuple[str, str], list[float]] = {}

    def record(step: str, path: str, run: Callable[..., Any], *arguments: Any) -> Any:
        times, value = timed(lambda: run(*arguments), 1)
        samples.setdefault((step, path), []).extend(times)
        return value

    def upsampled_maximum(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return torch.maximum(high, resize(low[None, None], (height, width))[0, 0])

    def device_score(final: torch.Tensor) -> float:
        return float(device_maps.pooled_max(device_maps.gaussian_blur(final, cfg.score_sigma), cfg.score_pool))

    def predict(flag: bool) -> Any:
        strategy.device_maps = flag
        return strategy.predict(image)

    def model_predict(maps_on_device: bool, finish_on_device: bool) -> Prediction:
        strategy.device_maps, model.device_postprocess = maps_on_device, finish_on_device
        return model.predict(image)

    model_paths = {  # AnomalyModel.predict's three paths: (HiAD.device_maps, AnomalyModel.device_postprocess)
        "host maps, host post-processing": (False, True),
        "device maps, host post-processing": (True, False),
        "device maps, device post-processing": (True, True),
    }
    postprocess = model.config.postprocess

    cfg = strategy.config
    merge = "patch maps calibrated, upsampled to 512 and merged"
    calibrate_low = "low map: border ratios, min-max"
    maximum = "low map upsampled to the image, maximum with the high map"
    score = f"score: blur sigma {cfg.score_sigma:g}, {cfg.score_pool}x{cfg.score_pool} pooled max"
    with torch.inference_mode():
        for flag in (False, True):  # warm-up: lazy detectors, kernels, caches
            predict(flag)
        for maps_on_device, finish_on_device in model_paths.values():
            model_predict(maps_on_device, finish_on_device)
        for _ in range(repeats):
            raw = record("raw outputs (backbone, fusion, detectors), grid order, on the host", "both", strategy.raw_outputs, image)
            device_raw = record("raw outputs left on the device, grouped by detector", "device", strategy._device_outputs, image)
            # the host path, step by step (what predict runs with device_maps off)
            high = record(merge, "host", strategy._merged_high_map, raw)
            low = record(calibrate_low, "host", strategy._calibrated_low, raw.low_map)
            record(maximum, "host", strategy._maximum_with_low, high, low)
            record(score + " (banded)", "host", strategy._pooled_score, high)
            # the device path, step by step
            high_t = record(merge, "device", strategy._merged_high_tensor, device_raw)
            low_t = record(calibrate_low, "device", strategy._calibrated_low_tensor, device_raw.low_map)
            final_t = record(maximum, "device", upsampled_maximum, high_t, low_t)
            record(score, "device", device_score, final_t)
            record("final map to a numpy array (on a GPU: the one copy back)", "device", lambda t: t.cpu().numpy(), final_t)
            # whole predicts, alternating
            results = {path: record("Strategy.predict, whole", path, predict, flag) for path, flag in (("host", False), ("device", True))}
            host = results["host"]
            finish = f"model post-processing after predict (border calibration, blur sigma {postprocess.sigma:g}, {postprocess.image_score} score)"
            settings = (postprocess, model.border_ratios, model.roi, strategy.map_score)
            record(finish, "host", smooth_and_score, host.anomaly_map.copy(), host.score, *settings)
            # the same map as a tensor (this script runs on the CPU: the device is the host; not written)
            tensor_map, tensor_score = torch.from_numpy(host.anomaly_map.copy()), torch.tensor(host.score)
            record(finish + ", one copy back", "device", device_maps.smooth_and_score, tensor_map, tensor_score, *settings)
            predictions = {
                path: record("AnomalyModel.predict, whole", path, model_predict, *flags) for path, flags in model_paths.items()
            }
    difference = float(np.abs(results["host"].anomaly_map - results["device"].anomaly_map).max())
    score_difference = abs(results["host"].score - results["device"].score)
    whole = {path: statistics.median(samples[("Strategy.predict, whole", path)]) for path in ("host", "device")}
    model_whole = {path: statistics.median(samples[("AnomalyModel.predict, whole", path)]) for path in model_paths}
    reference = predictions["host maps, host post-processing"]
    model_difference = max(float(np.abs(p.anomaly_map - reference.anomaly_map).max()) for p in predictions.values())
    model_score_difference = max(abs(p.score - reference.score) for p in predictions.values())
    rows = []
    for (step, path), times in samples.items():
        reference = model_whole[path] if path in model_whole else whole.get(path, whole["host"])
        rows.append(
            {
                "step": step,
                "path": path,
                "ms_median": round(statistics.median(times), 1),
                "ms_min": round(min(times), 1),
                "share_of_predict": round(statistics.median(times) / reference, 3),
            }
        )
    notes = (
        f"HiAD-{args.detector} ({args.backbone}, patch 512, low branch 512, SCA pool of 4, fusion rates automatic) fitted "
        f"on {args.n_train} make-hd images of {height}x{width} from hrad's synthetic demo textures (a quarter held out for "
        f"calibration; fit {fit_s:.0f} s), one {height}x{width} test image; {repeats} repeats, steps and whole predicts "
        "alternating between the paths. host: predict's map work in numpy / OpenCV on the host (one full-size map, bands "
        "for the rest; the CPU default); device: the same work in torch on the maps' device (`HiAD.device_maps`, the "
        "default on a GPU), here forced on the CPU. share_of_predict: the step's median over the whole predict's median "
        f"of its path. Whole-predict ratio host / device {whole['host'] / whole['device']:.2f} on this CPU; the two "
        f"paths' maps differ by at most {difference:.1e}, their scores by {score_difference:.1e}. On a GPU every device "
        "step runs there and the host waits once, for the finished map; on the CPU both run on the host, so this table "
        "says what the host path costs a GPU machine's host per image, and what the device path costs where it runs. "
        "AnomalyModel.predict rows: the whole model predict (share_of_predict against its own path's), medians "
        + ", ".join(f"{path} {ms:.0f} ms" for path, ms in model_whole.items())
        + f"; their maps differ by at most {model_difference:.1e}, their scores by {model_score_difference:.1e}."
    )
    write_results(args.out, rows, notes, columns=COLUMNS)


if __name__ == "__main__":
    main()
