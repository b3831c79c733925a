"""``hrad predict`` before and after the batched pipeline, on one folder of capsules images, same run.

One fitted tiled-PatchCore model (EfficientNet-Lite0, 512 tiles, ``batch_size`` 4 tiles per
backbone call) predicts the same capsules test images with ``hrad predict``'s writer (16-bit map,
mask and overlay PNGs) and its pipeline (decoding and writing in threads), in these modes:

- ``per-image (before)``: the path ``hrad predict`` took before batching: one image at a time
  through ``hrad.pipeline.overlapped`` (prefetch 2, 1 writer), each image's tiles through the
  backbone and the detector one batch of windows at a time (``predict`` with ``score_windows``:
  the per-window-batch scoring of old), then the model's smoothing and score;
- ``batched N``: ``hrad predict --batch-images N`` (``overlapped_batches``: N images per
  ``AnomalyModel.predict_batch``, their windows streamed through shared backbone batches and the
  concatenated embeddings scored in few kNN searches, the next N images decoded meanwhile).

Modes run one after another in each round (``--rounds``, the order reversed every other round);
the table keeps each mode's best time and its ratio to the ``per-image (before)`` time of the same
run. Every mode's scores are compared with the per-image ones (max relative difference).

    PYTHONPATH=. python benchmarks/predict_pipeline.py --n-train 10 --n-images 20 --batches 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import capsules, subset, write_results
from hrad.config import load_config
from hrad.data.images import ImageList, read_pixels
from hrad.detectors.patchcore import PatchCore
from hrad.model import AnomalyModel, Prediction
from hrad.outputs import OutputRow, PredictionWriter
from hrad.pipeline import overlapped, overlapped_batches
from hrad.postprocess.smoothing import smooth_and_score
from hrad.strategies.tiled import TiledStrategy

BEFORE = "per-image (before)"


def predict_before(model: AnomalyModel, image: Any) -> Prediction:
    """One image as ``hrad predict`` computed it before batching: each batch of windows through the
    backbone and then the detector (``score_windows``), merged, smoothed and scored."""
    strategy = model.strategy
    assert isinstance(strategy, TiledStrategy)
    image_threshold, pixel_threshold = model.decision_thresholds()
    with torch.inference_mode():
        result = strategy.predict(image, score_windows=strategy.score_windows)
    anomaly_map, score = smooth_and_score(result.anomaly_map, result.score, model.config.postprocess)
    return Prediction(anomaly_map=anomaly_map, score=score, image_threshold=image_threshold, pixel_threshold=pixel_threshold)


def _bank_summary(model: AnomalyModel) -> str:
    """``rows x dims, index kind`` of a tiled PatchCore model's memory bank."""
    strategy = model.strategy
    assert isinstance(strategy, TiledStrategy) and isinstance(strategy.detector, PatchCore)
    bank = strategy.detector.memory_bank
    return f"{bank.shape[0]} x {bank.shape[1]}, {strategy.detector.neighbours.index_kind}"


def run(model: AnomalyModel, paths: list[Path], out: Path, batch: int | None) -> tuple[float, list[float]]:
    """Seconds to predict and write ``paths`` (``batch`` None: the per-image path of before)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    writer = PredictionWriter.for_model(out, model)

    def finish(path: Path, image: Any, prediction: Prediction) -> OutputRow:
        return writer.write(path, path.stem, image, prediction)

    start = time.perf_counter()
    if batch is None:
        stages = overlapped(paths, read_pixels, lambda path, image: predict_before(model, image), finish, prefetch=2, writers=1)
    else:
        stages = overlapped_batches(
            paths, read_pixels, lambda batch_paths, images: model.predict_batch(images), finish, batch=batch, writers=1
        )
    rows = list(stages)
    seconds = time.perf_counter() - start
    scores: list[float] = []
    for _, row in rows:
        if isinstance(row, Exception):
            raise row
        assert row.score is not None
        scores.append(row.score)
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=10)
    parser.add_argument("--n-images", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="--batch-images values to time")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--windows-per-call",
        type=int,
        nargs="+",
        default=[4],
        help="strategy batch_size values (tile windows per backbone call) to time the batched modes with; "
        "the per-image (before) mode always uses 4, the default when batching was added",
    )
    parser.add_argument(
        "--openvino",
        action="store_true",
        help="also fit the same model with backbone.runtime openvino and time its batched modes in the same rounds",
    )
    parser.add_argument("--out", default="predict_pipeline")
    args = parser.parse_args()
    dataset = capsules()
    train, _ = subset(dataset, args.n_train, None)
    paths = sorted(s.path for s in dataset.test)[: args.n_images]
    overrides = {"strategy": {"name": "tiled", "tile": 512}, "threshold": {"validation_fraction": 0.2}}
    fit_start = time.perf_counter()
    model = AnomalyModel(load_config(None, overrides)).fit(ImageList(list(train)))
    fit_seconds = time.perf_counter() - fit_start
    print(f"fit {fit_seconds:.0f}s on {len(train)} images", flush=True)
    models = {"torch": model}
    if args.openvino:
        openvino_overrides = {**overrides, "backbone": {"runtime": "openvino"}}
        models["openvino"] = AnomalyModel(load_config(None, openvino_overrides)).fit(ImageList(list(train)))
    banks = {name: _bank_summary(fitted) for name, fitted in models.items()}
    work = Path(tempfile.mkdtemp(prefix="hrad_pipeline_"))
    modes: dict[str, tuple[str, int | None, int]] = {BEFORE: ("torch", None, 4)}
    for runtime in models:
        for windows in args.windows_per_call:
            suffix = "" if args.windows_per_call == [4] else f", {windows} window(s) per backbone call"
            suffix += ", OpenVINO backbone" if runtime == "openvino" else ""
            modes.update(
                {f"batched {n} (hrad predict --batch-images {n}){suffix}": (runtime, n, windows) for n in args.batches}
            )
    times: dict[str, list[float]] = {name: [] for name in modes}
    scores: dict[str, list[float]] = {}
    loads: list[float] = []
    try:
        for fitted in models.values():
            run(fitted, paths[:2], work / "warm", 2)  # first-call costs (threads, allocator, faiss, OpenVINO compile)
        for round_index in range(args.rounds):
            order = list(modes) if round_index % 2 == 0 else list(reversed(modes))
            for name in order:
                runtime, batch, windows = modes[name]
                strategy = models[runtime].strategy
                assert isinstance(strategy, TiledStrategy)
                strategy.config.batch_size = windows
                # the mode's windows go through the backbone whole (no per-window CPU split)
                strategy.embedder.extractor.cpu_windows_per_call = None
                seconds, found = run(models[runtime], paths, work / "out", batch)
                times[name].append(seconds)
                scores[name] = found
                loads.append(os.getloadavg()[0])
                print(f"{name}: {seconds:.1f}s ({len(paths) / seconds:.3f} images/s), load {loads[-1]:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before = min(times[BEFORE])
    rows = []
    for name, values in times.items():
        difference = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(scores[name], scores[BEFORE], strict=True))
        rows.append(
            {
                "mode": name,
                "images": len(paths),
                "best_seconds": round(min(values), 1),
                "images_per_second": round(len(paths) / min(values), 3),
                "speedup_vs_before": round(before / min(values), 3),
                "all_runs_seconds": " / ".join(f"{v:.1f}" for v in values),
                "max_rel_score_diff_vs_before": f"{difference:.1e}",
            }
        )
    notes = (
        f"Tiled PatchCore (EfficientNet-Lite0, 512 tiles, {'/'.join(map(str, args.windows_per_call))} window(s) per backbone "
        f"call in the batched modes, 4 in `{BEFORE}`, PatchCore defaults) fitted on "
        f"{len(train)} capsules training images ({fit_seconds:.0f} s, 20% held out for thresholds; memory bank "
        f"{'; '.join(f'{name}: {bank}' for name, bank in banks.items())}); {len(paths)} capsules "
        f"test images (1500x1000 PNG, 6 tiles each) predicted and written as `hrad predict` does (16-bit map, mask, "
        f"overlay PNGs; decoding and writing in threads in every mode); {args.rounds} round(s), best of each mode; "
        f"speedup_vs_before = best seconds of `{BEFORE}` / best seconds of the mode, same run. 1-minute load average "
        f"after each timing: {', '.join(f'{v:.1f}' for v in loads)} (a shared 2-core CPU)."
    )
    write_results(args.out, rows, notes, columns=list(rows[0]))


if __name__ == "__main__":
    main()
