"""Exported PatchCore on OpenVINO (FP32, FP16 weights, INT8) and onnxruntime vs the torch model, same tiles, same run.

Part 1 (tiled): one tiled PatchCore on EfficientNet-Lite0 is fitted on capsules, exported to
ONNX and to OpenVINO IR at FP32, FP16 and INT8 (NNCF post-training quantisation of the
backbone, calibrated on the tile windows of the training images; the kNN scoring stays FP32). The tile windows of the test images are recorded
once from ``model.predict`` and every backend scores the *same* windows (per-tile network:
backbone + kNN), interleaved per repeat so machine load hits all alike; then every backend
runs the whole predict (``predict_tiles`` around it) on the test images, giving the metric change
against torch (image AUROC, pixel AUROC, largest map difference relative to the map's range).

Part 2 (tiled ensemble): the layout choice of ``hrad/export_ensemble.py``: one graph with the
tile position as input (banks stacked) vs one graph per position (each with its own backbone
copy): bytes on disk and seconds to score every tile of an image.

    PYTHONPATH=. python benchmarks/openvino_export.py --n-train 5 --n-test 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks.common import capsules, subset, write_results
from hrad.config import load_config
from hrad.data.images import read_image
from hrad.export import OPENVINO_TOLERANCE, export_onnx, export_openvino, open_predictor
from hrad.export_graph import OPSET, NearestNeighbourScoring, TileScorer, scoring_module
from hrad.export_runtime import onnxruntime_session
from hrad.model import AnomalyModel
from hrad.reports.markdown import table


def fitted(strategy: dict[str, Any], train: Sequence[Path]) -> AnomalyModel:
    overrides = {"backbone": {"name": "efficientnet-lite0"}, "detector": {"name": "patchcore", "index": "exact"}, "strategy": strategy, "device": "cpu"}
    return AnomalyModel(load_config(None, overrides)).fit([read_image(p) for p in train])


def tiled_part(train: Sequence[Path], test: Sequence[Any], repeats: int, directory: Path, image_size: int = 768) -> list[dict[str, Any]]:
    model = fitted({"name": "tiled", "tile": 256, "image_size": image_size}, train)
    export_onnx(model, directory / "tiled.onnx")
    # the export's own check (graph vs onnxruntime: random inputs, INT8 on its calibration inputs);
    # INT8 is written even when it misses export's tolerance, so its effect is measured either way
    checks = {
        f"openvino-{precision}": json.loads(export_openvino(
            model, directory / precision / "tiled.xml", precision, tolerance=float("inf"),
            calibration_images=list(train) if precision == "int8" else None,
        ).read_text())["openvino"]["max_difference_vs_onnx"]
        for precision in ("fp32", "fp16", "int8")
    }  # fmt: skip
    backends: dict[str, Any] = {
        "torch": None,
        "onnxruntime": open_predictor(directory / "tiled.onnx"),
        "openvino-fp32": open_predictor(directory / "fp32" / "tiled.xml"),
        "openvino-fp16": open_predictor(directory / "fp16" / "tiled.xml"),
        "openvino-int8": open_predictor(directory / "int8" / "tiled.xml"),
    }
    images = [read_image(sample.path) for sample in test]
    windows: list[torch.Tensor] = []

    def record(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows.append(batch.clone())
        return model.strategy.score_windows(batch)  # type: ignore[attr-defined, no-any-return]

    with torch.no_grad():
        for image in images:
            model.strategy.predict(image, score_windows=record)  # type: ignore[call-arg]
        tile_seconds = {name: 0.0 for name in backends}
        for _ in range(repeats):
            for name, predictor in backends.items():
                # the exported predictors take numpy windows (they run without torch)
                score = model.strategy.score_windows if predictor is None else predictor.score_windows  # type: ignore[attr-defined]
                batches = windows if predictor is None else [batch.numpy() for batch in windows]
                start = time.perf_counter()
                for batch in batches:
                    score(batch)
                tile_seconds[name] += time.perf_counter() - start
        predictions = {name: [] for name in backends}  # type: dict[str, list[Any]]
        predict_seconds = {name: 0.0 for name in backends}
        for image in images:
            for name, predictor in backends.items():
                start = time.perf_counter()
                predictions[name].append(model.predict(image) if predictor is None else predictor.predict(image))
                predict_seconds[name] += time.perf_counter() - start
    labels = [sample.label for sample in test]
    masks = [sample.load_mask(image.shape[:2]) for sample, image in zip(test, images, strict=True)]
    truth = np.concatenate([mask.reshape(-1) for mask in masks]).astype(bool)
    reference = predictions["torch"]
    tiles = sum(len(batch) for batch in windows)
    rows = []
    for name in backends:
        ours = predictions[name]
        pixel = np.concatenate([p.anomaly_map.reshape(-1) for p in ours])
        rows.append({
            "backend": name,
            "tiles": tiles,
            "tile_seconds": round(tile_seconds[name] / repeats / tiles, 4),
            "tile_speedup_vs_torch": round(tile_seconds["torch"] / tile_seconds[name], 2),
            "tile_speedup_vs_fp32": round(tile_seconds["openvino-fp32"] / tile_seconds[name], 2),
            "predict_seconds_per_image": round(predict_seconds[name] / len(images), 3),
            "predict_speedup_vs_torch": round(predict_seconds["torch"] / predict_seconds[name], 2),
            "predict_speedup_vs_fp32": round(predict_seconds["openvino-fp32"] / predict_seconds[name], 2),
            "image_auroc": round(float(roc_auc_score(labels, [p.score for p in ours])), 4),
            "pixel_auroc": round(float(roc_auc_score(truth, pixel)), 5),
            "pixel_ap": round(float(average_precision_score(truth, pixel)), 4),
            "max_map_difference": float(max(
                np.abs(a.anomaly_map - b.anomaly_map).max() / np.ptp(b.anomaly_map) for a, b in zip(ours, reference, strict=True)
            )),
            "max_score_difference": float(max(abs(a.score - b.score) / abs(b.score) for a, b in zip(ours, reference, strict=True))),
            "export_check_difference": checks.get(name),
        })  # fmt: skip
    return rows


def ensemble_part(train: Sequence[Path], test: Sequence[Any], repeats: int, directory: Path) -> list[dict[str, Any]]:
    model = fitted({"name": "tiled-ensemble", "tile": 256, "image_size": 512}, train)
    strategy: Any = model.strategy
    export_onnx(model, directory / "ensemble.onnx")
    stacked = onnxruntime_session(directory / "ensemble.onnx")  # the session options users get (threads sleep between ops)
    count = len(strategy.grid)
    side = strategy.tiles.window_input_size[0]
    sessions = []
    for index in range(count):  # the alternative layout: one graph per position, backbone included
        detector = strategy.detector_type(strategy.detector_config)
        detector.load_state_dict(strategy._tile_state(index))
        bank_scoring = scoring_module(detector, "patchcore")
        assert isinstance(bank_scoring, NearestNeighbourScoring)
        scorer = TileScorer(strategy.embedder, bank_scoring, strategy.tiles.crop_cells).eval()
        path = directory / f"position_{index}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                scorer, (torch.rand(1, 3, side, side),), str(path), dynamo=False, opset_version=OPSET,
                input_names=["tiles"], output_names=["maps", "scores"], dynamic_axes={"tiles": {0: "batch"}},
            )  # fmt: skip
        sessions.append(onnxruntime_session(path))
    windows = np.random.default_rng(0).random((len(test), count, 3, side, side), dtype=np.float32)
    seconds = {"one graph, position input": 0.0, "one graph per position": 0.0}
    positions = np.arange(count, dtype=np.int64)
    for _ in range(repeats):
        for image_windows in windows:
            start = time.perf_counter()
            stacked.run(None, {"tiles": image_windows, "positions": positions})
            middle = time.perf_counter()
            for index, session in enumerate(sessions):
                session.run(None, {"tiles": image_windows[index : index + 1]})
            seconds["one graph, position input"] += middle - start
            seconds["one graph per position"] += time.perf_counter() - middle
    sizes = {
        "one graph, position input": (directory / "ensemble.onnx").stat().st_size,
        "one graph per position": sum((directory / f"position_{i}.onnx").stat().st_size for i in range(count)),
    }
    return [
        {"layout": name, "positions": count, "megabytes": round(sizes[name] / 2**20, 2),
         "seconds_per_image": round(seconds[name] / repeats / len(test), 4)}
        for name in seconds
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=5)
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=768, help="long side the tiled model resizes images to")
    parser.add_argument("--skip-ensemble", action="store_true", help="part 1 only (a short run)")
    parser.add_argument("--name", default="openvino_export")
    args = parser.parse_args(argv)
    train, test = subset(capsules(), args.n_train, args.n_test)
    with tempfile.TemporaryDirectory(prefix="hrad-openvino-bench-") as folder:
        tiled = tiled_part(train, test, args.repeats, Path(folder), args.image_size)
        ensemble = [] if args.skip_ensemble else ensemble_part(train, test, args.repeats, Path(folder))
    import nncf
    import openvino

    notes = (
        f"OpenVINO {openvino.__version__}, NNCF {nncf.__version__}. Part 1: PatchCore (coreset 0.1, exact kNN as in the export) on EfficientNet-Lite0, tiled, images resized to a "
        f"{args.image_size} long side, 256 tiles ({tiled[0]['tiles'] // len(test)} per image), fitted on {len(train)} training images; {len(test)} test images "
        "(seeded, label-stratified). INT8: NNCF post-training quantisation of the backbone (the kNN scoring kept in FP32), "
        f"calibrated on the tile windows of the {len(train)} training images. tile_seconds: per tile, every backend on the same recorded windows (mean of "
        f"{args.repeats} interleaved repeats); predict: whole image including resize/merge/smoothing. Differences are "
        "relative to torch (map: to its range); export_check_difference: the export's own check of the IR against "
        f"onnxruntime (random inputs; INT8: its calibration inputs; refused by hrad export above {OPENVINO_TOLERANCE['int8']} "
        "for INT8). With this few test images the AUROCs show agreement, not quality. "
        + ("Part 2 skipped (--skip-ensemble)." if args.skip_ensemble else "Part 2 (table 'ensemble layout'): tiled ensemble at 512, 256 tiles, same training images; one image's tiles "
        "scored by the stacked graph (one call) vs by the per-position graphs (one call each), onnxruntime, random windows.")
    )
    for row in tiled:  # relative differences in scientific notation (the table rounds to 3 decimals)
        row["max_map_difference"] = f"{row['max_map_difference']:.1e}"
        row["max_score_difference"] = f"{row['max_score_difference']:.1e}"
        row["export_check_difference"] = "" if row["export_check_difference"] is None else f"{row['export_check_difference']:.1e}"
    path = write_results(
        args.name, tiled, notes,
        columns=["backend", "tiles", "tile_seconds", "tile_speedup_vs_torch", "tile_speedup_vs_fp32", "predict_seconds_per_image",
                 "predict_speedup_vs_torch", "predict_speedup_vs_fp32", "image_auroc", "pixel_auroc", "pixel_ap",
                 "max_map_difference", "max_score_difference", "export_check_difference"],
    )  # fmt: skip
    if ensemble:
        path.write_text(path.read_text() + "\n## ensemble layout\n\n" + table(ensemble, ["layout", "positions", "megabytes", "seconds_per_image"]))
        record = path.with_suffix(".json")
        record.write_text(json.dumps({**json.loads(record.read_text()), "ensemble_rows": ensemble}, indent=2))
    print(path.read_text())


if __name__ == "__main__":
    main()
