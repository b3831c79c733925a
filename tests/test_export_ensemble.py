"""Tiled-ensemble ONNX export: one graph with the tile position as input equals hrad predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from export_helpers import PATCHCORE, make_model, same_padding, spotted_image, training_images

from hrad.errors import ConfigError
from hrad.export import export_onnx, open_predictor
from hrad.export_runtime import OnnxEnsemblePredictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "visa" / "capsules"


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return training_images(7, 4, 96, 128)


CASES = {
    "native-overlap": {"name": "tiled-ensemble", "tile": 48, "stride": 40},
    "resized-max-no-seams": {"name": "tiled-ensemble", "tile": 64, "image_size": 128, "score_merge": "max", "seam_smoothing": False},
    "tile-normalized": {"name": "tiled-ensemble", "tile": 48, "normalization": "tile"},
    "image-normalized-zscore": {"name": "tiled-ensemble", "tile": 64, "stride": 32, "normalization": "image", "normalization_stat": "zscore"},
}


@pytest.mark.parametrize("strategy", CASES.values(), ids=CASES.keys())
def test_ensemble_export_matches_model_predict(strategy: dict, images: list[np.ndarray], tmp_path: Path) -> None:
    model = make_model(strategy).fit(images[:3])
    if strategy.get("normalization", "none") != "none":
        model.strategy.calibrate(images[3:])
    sidecar = json.loads(export_onnx(model, tmp_path / "ens.onnx").read_text())
    count = len(model.strategy.grid)
    assert sidecar["geometry"]["strategy"] == "tiled-ensemble" and count > 1

    # the graph picks each position's own bank: the same window scores differently per position
    side = sidecar["input"]["tiles"][-1]
    window = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(3)).repeat(count, 1, 1, 1)
    session = onnxruntime.InferenceSession(str(tmp_path / "ens.onnx"), providers=["CPUExecutionProvider"])
    _, scores = session.run(None, {"tiles": window.numpy(), "positions": np.arange(count, dtype=np.int64)})
    for index in range(count):
        detector = model.strategy.detector_type(model.strategy.detector_config)
        detector.load_state_dict(model.strategy._tile_state(index))
        with torch.no_grad():
            own = detector.predict(model.strategy.tiles(window[:1]))
        assert scores[index] == pytest.approx(float(own.scores[0]), rel=1e-4)
    assert len(set(np.round(scores, 5))) > 1

    predictor = open_predictor(tmp_path / "ens.onnx")
    assert isinstance(predictor, OnnxEnsemblePredictor)
    test_image = spotted_image(8, 96, 128, 40, 60, 8)
    expected = model.predict(test_image)
    got = predictor.predict(test_image)
    scale = float(np.abs(expected.anomaly_map).max())
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4 * scale
    assert got.score == pytest.approx(expected.score, rel=1e-4, abs=1e-5)
    assert got.is_anomalous == expected.is_anomalous
    if strategy.get("normalization") == "tile":
        with pytest.raises(ConfigError, match="--tile-size does not apply"):
            export_onnx(model, tmp_path / "other.onnx", tile_size=32)


def test_ensemble_graph_pads_inside_its_convolutions(images: list[np.ndarray], tmp_path: Path) -> None:
    """SAME padding (EfficientNet-Lite's) traces to Pad nodes computed from the input's shape,
    which onnxruntime cannot fuse: the export moves them into the Conv nodes, same predictions."""
    onnx = pytest.importorskip("onnx")
    model = make_model({"name": "tiled-ensemble", "tile": 48, "stride": 40})
    same_padding(model.extractor)
    model.fit(images[:3])
    export_onnx(model, tmp_path / "ens.onnx")
    graph = onnx.load(tmp_path / "ens.onnx").graph
    assert not [node for node in graph.node if node.op_type == "Pad"]
    test_image = spotted_image(8, 96, 128, 40, 60, 8)
    expected, got = model.predict(test_image), open_predictor(tmp_path / "ens.onnx").predict(test_image)
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4 * float(np.abs(expected.anomaly_map).max())
    assert got.score == pytest.approx(expected.score, rel=1e-4)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/visa/capsules")
def test_ensemble_export_matches_on_capsules(tmp_path: Path) -> None:
    from hrad.data.images import read_image as load_image

    train = sorted((SHARED / "train" / "good").iterdir())[:3]
    tests = sorted((SHARED / "test").glob("*/*.*"))[::40][:3]
    strategy = {"name": "tiled-ensemble", "tile": 128, "stride": 128, "image_size": 256}
    model = make_model(strategy, {**PATCHCORE, "coreset_ratio": 0.1}).fit([load_image(p) for p in train])
    export_onnx(model, tmp_path / "caps.onnx")
    predictor = open_predictor(tmp_path / "caps.onnx")
    for path in tests:
        expected, got = model.predict(load_image(path)), predictor.predict(path)
        assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4 * float(np.abs(expected.anomaly_map).max())
        assert got.score == pytest.approx(expected.score, rel=1e-4)
