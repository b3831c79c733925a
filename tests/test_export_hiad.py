"""HiAD export: the backbone graph, one scoring graph per pool detector and the low branch; the
torch-free predictor equals hrad predict (fusion, assignment, calibration, branches)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run, write
from export_helpers import (
    TracedSizeSameConv2d,
    make_model,
    recorded_sessions,
    same_padding,
    spinning,
    spotted_image,
    training_images,
)

from hrad.errors import ConfigError, InputError
from hrad.export import export_onnx, export_openvino
from hrad.export_runtime import HiADPredictor, open_predictor
from hrad.prediction import Prediction

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "visa" / "capsules"
#: relative to the map's magnitude (measured: under 2e-5 on these models; numpy/Pillow vs torch
#: resizing and grid sampling, float64 vs float32 merging)
TOLERANCE = 1e-4

HIAD = {"name": "hiad", "patch_size": 32, "low_res_size": 48}
CASES = {
    # two fusion levels, KMeans over positions, low branch
    "sca-levels": ({**HIAD, "assignment": "sca", "num_detectors": 2, "fusion_rates": [0, 1]}, "patchcore"),
    # overlapping patches, three weighted levels, retrieval assignment (nearest centroid), other image sizes
    "ra-overlap-3-levels": (
        {**HIAD, "stride": 24, "assignment": "ra", "num_detectors": 2, "fusion_rates": [0, 1, 2], "fusion_weights": [0.5, 0.3, 0.2]},
        "patchcore",
    ),
    # one detector per position, no low branch, zero-padded edge tiles
    "o2o-no-low-zeros": ({**HIAD, "patch_size": 48, "assignment": "o2o", "low_branch": False, "tile_edge": "zeros"}, "patchcore"),
    # PaDiM's per-position Gaussians in the pool and the low branch
    "padim-na": ({**HIAD, "assignment": "na", "num_detectors": 2}, {"name": "padim", "n_features": 12}),
    # a ViT backbone: windows resized to multiples of 14
    "vit-a2o": ({**HIAD, "patch_size": 28, "low_res_size": 56, "assignment": "a2o"}, "patchcore"),
}
BACKBONES = {"vit-a2o": "tiny-vit"}


def assert_same(got: Prediction, expected: Prediction) -> None:
    scale = float(np.abs(expected.anomaly_map).max())
    assert got.anomaly_map.shape == expected.anomaly_map.shape
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= TOLERANCE * scale
    assert got.score == pytest.approx(expected.score, rel=TOLERANCE, abs=1e-6)
    assert (got.image_threshold, got.is_anomalous) == (expected.image_threshold, expected.is_anomalous)


def detector_options(detector: str | dict) -> dict:
    return {"name": "patchcore", "coreset_ratio": 0.25} if detector == "patchcore" else detector  # type: ignore[return-value]


@pytest.mark.parametrize(("strategy", "detector"), CASES.values(), ids=CASES.keys())
def test_hiad_export_matches_model_predict(strategy: dict, detector: str | dict, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    backbone = BACKBONES.get(request.node.callspec.id, "tiny-cnn")
    model = make_model(strategy, detector_options(detector), backbone=backbone).fit(training_images(5, 4), training_images(9, 2))
    sidecar = json.loads(export_onnx(model, tmp_path / "m.onnx").read_text())
    pool = model.strategy.detector_count
    assert len(sidecar["graphs"]["high"]) == pool and sidecar["assignment"]["count"] == pool
    assert (sidecar["graphs"]["low"] is None) == (strategy.get("low_branch") is False)
    assert sidecar["graphs"]["low_embedder"] is None  # the window graph runs at the low size
    assert sorted(sidecar["calibration"]) == sorted(model.strategy.calibration.names())
    for graph in sidecar["graphs"]["high"]:
        assert (tmp_path / graph["onnx"]).is_file()
    predictor = open_predictor(tmp_path / "m.onnx")
    assert isinstance(predictor, HiADPredictor)
    # a defect, a normal image (its score is not saturated), and for ra another size
    images = [spotted_image(6), training_images(21, 1)[0]]
    if model.strategy.positional:  # other sizes are refused by the pool itself: the graphs never see another low size
        assert sidecar["geometry"]["other_sizes"].startswith(f"not needed: the {strategy['assignment']} pool binds detectors")
    if strategy["assignment"] == "ra":
        assert sidecar["geometry"]["other_sizes_verified"] is True
        images.append(spotted_image(7, 72, 104, 20, 40, 8))
    for image in images:
        assert_same(predictor.predict(image), model.predict(image))


@pytest.mark.parametrize("corners", [False, True])
def test_hiad_export_divides_the_low_branch_by_its_border_ratios(tmp_path: Path, corners: bool) -> None:
    """Images large enough for the low map to have a border profile (16 x 24 cells): the sidecar
    carries the low branch's ratios (a list, or with ``low_border_corners`` a square table) and
    the predictor divides by them as the model does."""
    strategy = {**HIAD, "patch_size": 64, "low_res_size": 192, "assignment": "a2o", "low_border_corners": corners}
    model = make_model(strategy, detector_options("patchcore")).fit(training_images(5, 4, 128, 192), training_images(9, 2, 128, 192))
    ratios = model.strategy.low_border_ratios
    assert ratios is not None
    sidecar = json.loads(export_onnx(model, tmp_path / "m.onnx").read_text())
    np.testing.assert_allclose(sidecar["low_border_ratios"], ratios, rtol=1e-12)  # type: ignore[arg-type]
    assert isinstance(sidecar["low_border_ratios"][0], list) is corners
    predictor = open_predictor(tmp_path / "m.onnx")
    for image in (spotted_image(6, 128, 192, 110, 170, 9), training_images(21, 1, 128, 192)[0]):
        assert_same(predictor.predict(image), model.predict(image))


#: window 72 (layer3's convolution takes 9 x 9: odd) against the low branch's 48 x 64 (6 x 8
#: there: even)
ODD_WINDOW = {**HIAD, "patch_size": 40, "low_res_size": 64, "assignment": "a2o"}


@pytest.mark.parametrize(
    ("strategy", "low_size"),
    [({**HIAD, "low_res_size": 56, "assignment": "a2o"}, [40, 56]), (ODD_WINDOW, [48, 64])],
    ids=["even-window", "odd-window"],
)
def test_hiad_window_graph_pads_inside_its_convolutions_at_every_size(strategy: dict, low_size: list[int], tmp_path: Path) -> None:
    """SAME padding traces to a Pad whose amounts come from the input's shape (onnxruntime cannot
    fuse it into the convolution: a third of EfficientNet-Lite0's window graph time); the export
    makes it the Conv's auto_pad=SAME_UPPER, right at every size: the window graph runs the low
    branch itself, whichever parity each has at layer3's input (64 even at every stage, low
    40 x 56 odd there; window 72 odd, low 48 x 64 even: there the strided convolution's own
    constant pads were traced, a second backbone graph needed), and other image sizes are
    verified (the folded constants were right at the window's parity only: other sizes refused)."""
    onnx = pytest.importorskip("onnx")
    model = make_model(strategy)
    same_padding(model.extractor)
    model.fit(training_images(5, 3), training_images(9, 2))
    sidecar = json.loads(export_onnx(model, tmp_path / "m.onnx").read_text())
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert not [node for node in graph.node if node.op_type == "Pad"]
    assert sum(a.s == b"SAME_UPPER" for node in graph.node if node.op_type == "Conv" for a in node.attribute if a.name == "auto_pad") == 3  # every stage
    assert sidecar["graphs"]["low_embedder"] is None and sidecar["geometry"]["low_size"] == low_size
    assert sidecar["geometry"]["other_sizes_verified"] is True
    predictor = open_predictor(tmp_path / "m.onnx")
    for image in (spotted_image(6), training_images(21, 1)[0], spotted_image(7, 90, 90, 20, 40, 8)):  # the square one: low 56 x 56
        assert_same(predictor.predict(image), model.predict(image))


def test_hiad_export_traces_the_low_branch_backbone_at_its_size(tmp_path: Path) -> None:
    """A backbone whose window graph does not run at the low branch's size (SAME padding traced
    as the window's constants, :data:`ODD_WINDOW`: layer3 odd there, even at the low size) gets
    a second backbone graph traced at that size; that one's constants are wrong at the check's
    low size 56 x 64 (layer3 odd again): other sizes are said not verified and refused."""
    model = make_model(ODD_WINDOW)
    same_padding(model.extractor, TracedSizeSameConv2d)
    model.fit(training_images(5, 3), training_images(9, 2))
    sidecar = json.loads(export_onnx(model, tmp_path / "m.onnx").read_text())
    low_embedder = sidecar["graphs"]["low_embedder"]
    assert low_embedder["inputs"]["images"] == [1, 3, 48, 64] and (tmp_path / low_embedder["onnx"]).is_file()
    assert sidecar["geometry"]["other_sizes_verified"] is False
    assert sidecar["geometry"]["other_sizes"].startswith("not verified: the graph that embeds or scores the low branch differs from torch at a low size of 64x56")
    predictor = open_predictor(tmp_path / "m.onnx")
    for image in (spotted_image(6), training_images(21, 1)[0]):
        assert_same(predictor.predict(image), model.predict(image))
    with pytest.raises(InputError, match="not verified at other sizes"):
        predictor.predict(spotted_image(7, 90, 110, 20, 40, 8))  # low 56 x 64
    if importlib.util.find_spec("openvino") is not None:  # the OpenVINO export converts that graph too
        sidecar = json.loads(export_openvino(model, tmp_path / "v.xml", "fp32").read_text())
        assert sidecar["openvino"]["graphs"]["v.low_embedder.onnx"] == "v.low_embedder.xml"
        assert_same(open_predictor(tmp_path / "v.xml").predict(spotted_image(6)), model.predict(spotted_image(6)))


def test_hiad_int8_quantises_the_low_size_backbone_graph_too(tmp_path: Path) -> None:
    """``--precision int8``: the backbone traced at the low size is quantised like the window graph,
    calibrated on the low branch's images (one per calibration image); the scoring graphs stay float."""
    pytest.importorskip("nncf")
    import openvino

    model = make_model(ODD_WINDOW)
    same_padding(model.extractor, TracedSizeSameConv2d)
    images = training_images(5, 3)
    model.fit(images, training_images(9, 2))
    for index, image in enumerate(images):
        write(tmp_path / "train" / f"{index}.png", image)
    sidecar = json.loads(export_openvino(model, tmp_path / "v.xml", "int8", calibration_images=tmp_path / "train", tolerance=1.0).read_text())

    def fake_quantized(name: str) -> bool:
        return any(op.get_type_name() == "FakeQuantize" for op in openvino.Core().read_model(str(tmp_path / name)).get_ordered_ops())

    assert sidecar["graphs"]["low_embedder"] is not None
    assert fake_quantized("v.xml") and fake_quantized("v.low_embedder.xml")
    assert not fake_quantized("v.low.xml") and not fake_quantized("v.high0.xml")
    quantized = sidecar["openvino"]["quantized"]["graphs"]
    assert quantized["v.low_embedder.xml"] == len(images)
    assert quantized["v.xml"] == sidecar["openvino"]["quantized"]["calibration_inputs"] > len(images)
    assert sidecar["openvino"]["quantized"]["low_size_inputs"] == {"v.low_embedder.xml": len(images)}
    got = open_predictor(tmp_path / "v.xml").predict(spotted_image(6))
    assert got.anomaly_map.shape == (90, 130) and np.isfinite(got.anomaly_map).all()


def test_hiad_int8_calibrates_the_window_graph_on_the_low_branch_too(tmp_path: Path) -> None:
    """Where the window graph runs the low branch too (no low-size graph: a plain-padded backbone),
    INT8 calibrates it on the windows and on the low branch's whole downsampled image (32 x 48,
    one per calibration image), whose activations are not a window's."""
    pytest.importorskip("nncf")
    model = make_model({**HIAD, "assignment": "a2o"})
    images = training_images(5, 3)
    model.fit(images, training_images(9, 2))
    for index, image in enumerate(images):
        write(tmp_path / "train" / f"{index}.png", image)
    sidecar = json.loads(export_openvino(model, tmp_path / "v.xml", "int8", calibration_images=tmp_path / "train", tolerance=1.0).read_text())
    assert sidecar["graphs"]["low_embedder"] is None and sidecar["geometry"]["low_size"] == [32, 48]
    quantized = sidecar["openvino"]["quantized"]
    assert quantized["low_size_inputs"] == {"v.xml": len(images)}  # the old code calibrated on windows only
    assert quantized["graphs"] == {"v.xml": quantized["calibration_inputs"]} and quantized["calibration_inputs"] > len(images)
    got = open_predictor(tmp_path / "v.xml").predict(spotted_image(6))
    assert got.anomaly_map.shape == (90, 130) and np.isfinite(got.anomaly_map).all()


def test_what_hiad_export_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model({**HIAD, "assignment": "sca", "num_detectors": 2}).fit(training_images(5, 3), training_images(9, 1))
    with pytest.raises(ConfigError, match="--tile-size does not apply"):
        export_onnx(model, tmp_path / "m.onnx", tile_size=64)
    # a detector without an exportable scoring (one line, exit 2 in the CLI)
    plain = make_model({**HIAD, "assignment": "a2o"}, "test-gaussian").fit(training_images(5, 2), training_images(9, 1))
    plain.save(tmp_path / "plain")
    assert run(["export", "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "v.onnx")], monkeypatch) == 2
    error = capsys.readouterr().err.strip()
    assert "hiad export: detector 'test-gaussian' has no exportable scoring" in error and "\n" not in error
    assert not list(tmp_path.glob("v*.onnx"))
    # positional pools bind the fitted size: another size is one line, as in hrad predict
    export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(InputError, match="binds detectors to patch positions"), warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not also warned of as scaled unlike the training images
        open_predictor(tmp_path / "m.onnx").predict(spotted_image(7, 72, 104, 20, 40, 8))


def test_every_onnxruntime_session_sleeps_between_ops_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's threads busy-wait between ops by default, taking a loaded CPU's cores from the
    work: every session hrad creates (the export's pad folding and checks, the predictor's window,
    pool and low-branch graphs) has spinning off; ``spinning=True`` turns it on for all the
    predictor's graphs, same maps."""
    model = make_model({**HIAD, "assignment": "sca", "num_detectors": 2, "fusion_rates": [0, 1]})
    same_padding(model.extractor)  # the export's pad-folding probe runs a session too
    model.fit(training_images(5, 3), training_images(9, 1))
    sessions = recorded_sessions(monkeypatch)
    sidecar = json.loads(export_onnx(model, tmp_path / "m.onnx").read_text())
    exported = len(sessions)
    assert exported >= 4  # pad probe, verification of each graph, other sizes
    quiet = open_predictor(tmp_path / "m.onnx")
    graphs = sidecar["graphs"]
    assert len(sessions) - exported == 1 + len(graphs["high"]) + (graphs["low"] is not None) + (graphs["low_embedder"] is not None)
    assert [spinning(session) for session in sessions] == ["0"] * len(sessions)
    del sessions[:]
    spinning_predictor = open_predictor(tmp_path / "m.onnx", spinning=True)
    assert len(sessions) >= 4 and [spinning(session) for session in sessions] == ["1"] * len(sessions)
    image = spotted_image(6)
    expected, got = quiet.predict(image), spinning_predictor.predict(image)
    assert np.array_equal(got.anomaly_map, expected.anomaly_map) and got.score == expected.score


def test_cli_export_and_predict_hiad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hrad export`` then ``hrad predict --model m.onnx`` write what ``hrad predict`` on the model writes."""
    model = make_model({**HIAD, "assignment": "sca", "num_detectors": 2, "fusion_rates": [0, 1]}).fit(training_images(5, 3), training_images(9, 1))
    model.save(tmp_path / "model")
    assert run(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "e" / "m.onnx")], monkeypatch) == 0
    write(tmp_path / "images" / "spot.png", spotted_image(6))
    for name, source in (("torch", tmp_path / "model"), ("onnx", tmp_path / "e" / "m.onnx")):
        args = ["predict", "--model", str(source), str(tmp_path / "images"), "--format", "tiff", "--out", str(tmp_path / name)]
        assert run(args, monkeypatch) == 0
    import tifffile

    ours, reference = (tifffile.imread(next((tmp_path / name).glob("*_map.tiff"))) for name in ("onnx", "torch"))
    assert np.abs(ours - reference).max() <= TOLERANCE * float(np.abs(reference).max())


def test_hiad_openvino_export(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    model = make_model({**HIAD, "assignment": "sca", "num_detectors": 2, "fusion_rates": [0, 1]}).fit(training_images(5, 3), training_images(9, 1))
    sidecar = json.loads(export_openvino(model, tmp_path / "m.xml", "fp32").read_text())
    assert sorted(sidecar["openvino"]["graphs"]) == ["m.high0.onnx", "m.high1.onnx", "m.low.onnx"]
    image = spotted_image(6)
    assert_same(open_predictor(tmp_path / "m.xml").predict(image), model.predict(image))


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/visa/capsules")
def test_hiad_export_matches_on_capsules(tmp_path: Path) -> None:
    """Real images at their own size (1500 x 1000): patches of 256, two fusion levels, a pool of 3
    fitted on 2 training images and calibrated on a third; a good and an anomalous test image."""
    from hrad.data.images import read_image

    train = sorted((SHARED / "train" / "good").iterdir())
    strategy = {"name": "hiad", "patch_size": 256, "low_res_size": 256, "assignment": "sca", "num_detectors": 3, "fusion_rates": [0, 1]}
    model = make_model(strategy, {"name": "patchcore", "coreset_ratio": 0.1}).fit([read_image(p) for p in train[:2]], [read_image(train[2])])
    export_onnx(model, tmp_path / "caps.onnx")
    predictor = open_predictor(tmp_path / "caps.onnx")
    for path in (sorted((SHARED / "test" / "good").iterdir())[0], sorted((SHARED / "test" / "bad").iterdir())[0]):
        assert_same(predictor.predict(path), model.predict(read_image(path)))
