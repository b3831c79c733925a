"""MRF-AD export: one graph with one input per scale; the predictor equals hrad predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from export_helpers import make_model, same_padding, spotted_image, training_images

from hrad.errors import ConfigError, InputError
from hrad.export import export_onnx, export_openvino
from hrad.export_runtime import MRFPredictor, open_predictor
from hrad.prediction import Prediction

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "visa" / "capsules"
#: relative to the map's magnitude (measured: under 3e-6 on these models)
TOLERANCE = 1e-4

CASES = {
    "l2-mean-max": ({"name": "mrf", "pixel_budget": 20_000, "scales": [0.5, 1.0]}, "tiny-cnn"),
    "cosine-max-top-fraction-native": (
        {"name": "mrf", "pixel_budget": None, "scales": [0.5, 0.75], "distance": "cosine", "fusion": "max",
         "score": "top-fraction", "top_fraction": 0.01},
        "tiny-cnn",
    ),
    "vit": ({"name": "mrf", "pixel_budget": 20_000, "scales": [0.5, 1.0]}, "tiny-vit"),
}  # fmt: skip


def assert_same(got: Prediction, expected: Prediction) -> None:
    scale = float(np.abs(expected.anomaly_map).max())
    assert got.anomaly_map.shape == expected.anomaly_map.shape
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= TOLERANCE * scale
    assert got.score == pytest.approx(expected.score, rel=TOLERANCE)


@pytest.mark.parametrize(("strategy", "backbone"), CASES.values(), ids=CASES.keys())
def test_mrf_export_matches_model_predict(strategy: dict, backbone: str, tmp_path: Path) -> None:
    model = make_model(strategy, backbone=backbone).fit(training_images(5, 3), training_images(9, 2))
    sidecar = json.loads(export_onnx(model, tmp_path / "m.onnx").read_text())
    geometry = sidecar["geometry"]
    assert geometry["strategy"] == "mrf" and len(sidecar["outputs"]) == len(strategy["scales"]) * len(model.strategy.layers)
    assert geometry["scale_sizes"] == [list(size) for size in model.strategy.scale_sizes(90, 130).values()]
    predictor = open_predictor(tmp_path / "m.onnx")
    assert isinstance(predictor, MRFPredictor)
    # the fitted size, and another one (dynamic spatial axes, checked at export)
    assert geometry["other_sizes_verified"] is True
    for image in (spotted_image(6), spotted_image(7, 72, 104, 20, 40, 8)):
        expected, got = model.predict(image), predictor.predict(image)
        assert_same(got, expected)
        assert (got.image_threshold, got.is_anomalous) == (expected.image_threshold, expected.is_anomalous)


@pytest.mark.parametrize("fitted", [(96, 128), (90, 130)], ids=["even", "odd"])
def test_mrf_graph_pads_inside_its_convolutions_at_every_size(fitted: tuple[int, int], tmp_path: Path) -> None:
    """SAME padding (EfficientNet-Lite's) traces to Pad nodes computed from each scale's shape,
    which onnxruntime cannot fuse: the export makes them the Conv nodes' auto_pad=SAME_UPPER,
    right at every size, so the graph stays verified at other image sizes. Traced at 48 x 64 and
    96 x 128 (even at every stage) it runs at odd sizes; traced at 45 x 65 and 90 x 130 (odd at
    the first two stages of scale 0.5) at even ones (there a strided convolution's symmetric
    padding was its own constant pads: other sizes not verified)."""
    onnx = pytest.importorskip("onnx")
    model = make_model({"name": "mrf", "pixel_budget": None, "scales": [0.5, 1.0]})
    same_padding(model.extractor)
    model.fit(training_images(5, 3, *fitted))
    sidecar = json.loads(export_onnx(model, tmp_path / "m.onnx").read_text())
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert not [node for node in graph.node if node.op_type == "Pad"]
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == 6 and all({a.name: a.s for a in node.attribute}.get("auto_pad") == b"SAME_UPPER" for node in convs)
    assert sidecar["geometry"]["other_sizes_verified"] is True
    predictor = open_predictor(tmp_path / "m.onnx")
    for image in (spotted_image(6, *fitted), spotted_image(7, 72, 104, 20, 40, 8), spotted_image(8, 120, 90, 50, 40, 8)):
        assert_same(predictor.predict(image), model.predict(image))


def test_unverified_sizes_are_refused_in_one_line(tmp_path: Path) -> None:
    model = make_model({"name": "mrf", "pixel_budget": None, "scales": [0.5]}).fit(training_images(5, 2))
    export_onnx(model, tmp_path / "m.onnx")
    sidecar = json.loads((tmp_path / "m.json").read_text())
    sidecar["geometry"]["other_sizes_verified"] = False  # as for a backbone traced with fixed sizes
    (tmp_path / "m.json").write_text(json.dumps(sidecar))
    predictor = open_predictor(tmp_path / "m.onnx")
    predictor.predict(spotted_image(6))  # the fitted size still runs
    with pytest.raises(InputError, match="not verified at other sizes"):
        predictor.predict(spotted_image(7, 72, 104, 20, 40, 8))


def test_what_mrf_export_refuses(tmp_path: Path) -> None:
    model = make_model({"name": "mrf", "pixel_budget": 20_000, "scales": [0.5], "foreground": True}).fit(training_images(5, 2))
    with pytest.raises(ConfigError, match="^mrf export: foreground masking"):
        export_onnx(model, tmp_path / "m.onnx")
    plain = make_model({"name": "mrf", "pixel_budget": 20_000, "scales": [0.5]}).fit(training_images(5, 2))
    with pytest.raises(ConfigError, match="--tile-size does not apply"):
        export_onnx(plain, tmp_path / "m.onnx", tile_size=64)
    assert not (tmp_path / "m.onnx").exists()


def test_mrf_openvino_export(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    model = make_model({"name": "mrf", "pixel_budget": 20_000, "scales": [0.5, 1.0]}).fit(training_images(5, 3))
    export_openvino(model, tmp_path / "m.xml", "fp32")
    image = spotted_image(6)
    assert_same(open_predictor(tmp_path / "m.xml").predict(image), model.predict(image))


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/visa/capsules")
def test_mrf_export_matches_on_capsules(tmp_path: Path) -> None:
    from hrad.data.images import read_image

    train = sorted((SHARED / "train" / "good").iterdir())[:3]
    tests = sorted((SHARED / "test").glob("*/*.*"))[::40][:3]
    strategy = {"name": "mrf", "pixel_budget": 200_000, "scales": [0.3, 0.5, 0.7]}
    model = make_model(strategy).fit([read_image(p) for p in train])
    export_onnx(model, tmp_path / "caps.onnx")
    predictor = open_predictor(tmp_path / "caps.onnx")
    for path in tests:
        assert_same(predictor.predict(path), model.predict(read_image(path)))
