"""ONNX export: the graph equals the PyTorch detector, and OnnxPredictor equals AnomalyModel.predict."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from cli_helpers import run as run_cli
from cli_helpers import write
from conftest import GaussianTestConfig, GaussianTestDetector, textured_image, with_spot
from export_helpers import make_model, same_padding, spotted_image, training_images
from torch import Tensor, nn

from hrad.detectors.base import DETECTORS, register_detector
from hrad.errors import ArtifactError, ConfigError
from hrad.export import OnnxPredictor, export_onnx
from hrad.export_graph import MahalanobisScoring, NearestNeighbourScoring
from hrad.strategies.base import DictStateReader

EXPORTABLE = "test-gaussian-onnx"


class GaussianScoring(nn.Module):
    """The test detector's formula in plain torch ops."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean[None, :, None, None].clone())
        self.register_buffer("std", std[None, :, None, None].clone())

    def forward(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        maps = ((embeddings - self.mean) / (self.std + 1e-6)).pow(2).mean(1).sqrt()
        return maps, maps.flatten(1).max(1).values


class ExportableGaussian(GaussianTestDetector):
    def scoring_module(self) -> nn.Module:
        return GaussianScoring(self.mean, self.std)


@pytest.fixture(scope="module", autouse=True)
def exportable_detector() -> None:
    if EXPORTABLE not in DETECTORS:
        register_detector(EXPORTABLE, GaussianTestConfig, ExportableGaussian)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return training_images(5, 5)


@pytest.fixture(scope="module")
def test_image() -> np.ndarray:
    return spotted_image(6)


PATCHCORE = {"name": "patchcore", "coreset_ratio": 0.25}
CASES = {
    "downsample": ({"name": "downsample", "image_size": 80}, "tiny-cnn", EXPORTABLE),
    "pad-square": ({"name": "downsample", "image_size": 80, "pad_to_square": True, "score": "max"}, "tiny-cnn", EXPORTABLE),
    "tiled": ({"name": "tiled", "tile": 48, "stride": 32, "image_size": 120}, "tiny-cnn", EXPORTABLE),
    # tiles resized to 70 for the 14-pixel patches
    "tiled-vit": ({"name": "tiled", "tile": 64, "stride": 40}, "tiny-vit", EXPORTABLE),
    "patchcore-tiled": ({"name": "tiled", "tile": 48, "stride": 40}, "tiny-cnn", PATCHCORE),
    # the real Lite0: its stride-2 depthwise convolutions pad by a computed zero tap, except in export
    "patchcore-lite0-tiled": ({"name": "tiled", "tile": 64}, "efficientnet-lite0", PATCHCORE),
    "patchcore-k3-downsample": ({"name": "downsample", "image_size": 64}, "tiny-cnn", {**PATCHCORE, "num_neighbors": 3}),
    "patchcore-no-reweight": ({"name": "tiled", "tile": 64}, "tiny-cnn", {**PATCHCORE, "reweight": False}),
    "padim-tiled": ({"name": "tiled", "tile": 48, "stride": 32}, "tiny-cnn", {"name": "padim", "n_features": 12}),
    "padim-downsample": ({"name": "downsample", "image_size": 64}, "tiny-cnn", {"name": "padim", "n_features": 24}),
    # neural detectors export their predict as traced (one short epoch: the graph, not the quality, is tested)
    "fastflow-tiled": ({"name": "tiled", "tile": 48, "stride": 32}, "tiny-cnn", {"name": "fastflow", "epochs": 1}),
    "rdpp-downsample": ({"name": "downsample", "image_size": 64}, "tiny-cnn", {"name": "rdpp", "epochs": 1}),
    "destseg-tiled": (
        {"name": "tiled", "tile": 48, "stride": 32},
        "tiny-cnn",
        {"name": "destseg", "student_epochs": 1, "segmentation_epochs": 1, "student_stages": 1},
    ),
    "vitad-downsample": ({"name": "downsample", "image_size": 70}, "tiny-vit", {"name": "vitad", "epochs": 1}),
    "realnet-downsample": ({"name": "downsample", "image_size": 64}, "tiny-cnn", {"name": "realnet", "epochs": 1}),
}


@pytest.mark.parametrize(("strategy", "backbone", "detector"), CASES.values(), ids=CASES.keys())
def test_onnx_predictor_matches_model_predict(
    strategy: dict, backbone: str, detector: str | dict, images: list[np.ndarray], test_image: np.ndarray, tmp_path: Path
) -> None:
    model = make_model(strategy, detector, backbone=backbone).fit(images)
    sidecar_path = export_onnx(model, tmp_path / "model.onnx")
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar_path == tmp_path / "model.json" and sidecar["thresholds"]["image"] == model.thresholds.image

    # the graph alone equals the detector's own predict (not only its scoring module)
    side = sidecar["input"]["shape"][-1]
    tiles = torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_maps, onnx_scores = session.run(None, {"tiles": tiles.numpy()})
    with torch.no_grad():
        reference = model.strategy.detector.predict(model.strategy.tiles(tiles))  # windows in, the tile's cells out
    assert list(onnx_maps.shape) == [3, *sidecar["outputs"]["maps"][1:]]
    np.testing.assert_allclose(onnx_maps, reference.maps.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_scores, reference.scores.numpy(), rtol=1e-4, atol=1e-4)

    expected = model.predict(test_image)
    got = OnnxPredictor(tmp_path / "model.onnx").predict(test_image)
    assert got.anomaly_map.shape == expected.anomaly_map.shape == test_image.shape[:2]
    scale = float(np.abs(expected.anomaly_map).max())
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4 * scale
    assert got.score == pytest.approx(expected.score, rel=1e-4)
    assert (got.image_threshold, got.pixel_threshold) == (expected.image_threshold, expected.pixel_threshold)
    assert got.is_anomalous == expected.is_anomalous


def test_tiled_graph_pads_inside_its_convolutions(images: list[np.ndarray], test_image: np.ndarray, tmp_path: Path) -> None:
    """SAME padding (EfficientNet-Lite's) traces to Pad nodes computed from the input's shape: the
    export moves them into the Conv nodes (onnxruntime cannot fuse them), same predictions."""
    onnx = pytest.importorskip("onnx")
    model = make_model({"name": "tiled", "tile": 64, "stride": 48})
    same_padding(model.extractor)
    model.fit(images)
    export_onnx(model, tmp_path / "model.onnx")
    graph = onnx.load(tmp_path / "model.onnx").graph
    assert not [node for node in graph.node if node.op_type == "Pad"]
    expected, got = model.predict(test_image), OnnxPredictor(tmp_path / "model.onnx").predict(test_image)
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4 * float(np.abs(expected.anomaly_map).max())
    assert got.score == pytest.approx(expected.score, rel=1e-4)


def test_tile_size_override_equals_a_model_with_that_tile(images: list[np.ndarray], test_image: np.ndarray, tmp_path: Path) -> None:
    model = make_model({"name": "tiled", "tile": 64, "stride": 32}, EXPORTABLE).fit(images)
    export_onnx(model, tmp_path / "m.onnx", tile_size=48)
    assert json.loads((tmp_path / "m.json").read_text())["geometry"]["stride"] == 24
    same_state = make_model({"name": "tiled", "tile": 48, "stride": 24}, EXPORTABLE)
    same_state.strategy.load_state(DictStateReader(model.strategy.state_dict()))
    same_state.thresholds = model.thresholds  # the export keeps them, border ratios included
    expected = same_state.predict(test_image).anomaly_map
    got = OnnxPredictor(tmp_path / "m.onnx").predict(test_image).anomaly_map
    assert np.abs(got - expected).max() <= 1e-4 * float(np.abs(expected).max())


def test_unexportable_detectors_and_strategies_are_one_line_config_errors(images: list[np.ndarray], tmp_path: Path) -> None:
    plain = make_model({"name": "downsample", "image_size": 64}, detector="test-gaussian").fit(images[:2])
    with pytest.raises(ConfigError, match="^detector 'test-gaussian' cannot be exported to ONNX$"):
        export_onnx(plain, tmp_path / "x.onnx")
    ensemble = make_model({"name": "tiled-ensemble", "tile": 48}, EXPORTABLE).fit(images[:2])
    with pytest.raises(ConfigError, match="tiled-ensemble export supports the patchcore detector"):
        export_onnx(ensemble, tmp_path / "x.onnx")
    vit = make_model({"name": "downsample", "image_size": 70}, EXPORTABLE, backbone="tiny-vit")
    with pytest.raises(ConfigError, match="not a multiple of 14"):
        export_onnx(vit, tmp_path / "x.onnx", tile_size=64)
    padim = make_model({"name": "tiled", "tile": 48}, {"name": "padim", "n_features": 8}).fit(images[:2])
    with pytest.raises(ConfigError, match="^padim cannot score 64x64 inputs"):
        export_onnx(padim, tmp_path / "x.onnx", tile_size=64)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.json").exists()


def test_predictor_needs_its_sidecar(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match="sidecar not found"):
        OnnxPredictor(tmp_path / "m.onnx")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not an hrad ONNX sidecar"):
        OnnxPredictor(tmp_path / "m.onnx")


def test_cli_export(images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make_model({"name": "tiled", "tile": 48}, EXPORTABLE).fit(images[:3]).save(tmp_path / "model")
    assert run_cli(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out" / "m.onnx")], monkeypatch) == 0
    assert (tmp_path / "out" / "m.onnx").is_file() and (tmp_path / "out" / "m.json").is_file()
    make_model({"name": "tiled", "tile": 48}, detector="test-gaussian").fit(images[:3]).save(tmp_path / "plain")
    capsys.readouterr()
    assert run_cli(["export", "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "p.onnx")], monkeypatch) == 2
    assert capsys.readouterr().err.strip().endswith("detector 'test-gaussian' cannot be exported to ONNX")


def test_exported_files_get_the_umask(images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph and sidecar are read by whoever serves them (a container's user, a service
    account): mkstemp's 0600 made them unreadable there, while the model directory beside them
    followed the umask."""
    make_model({"name": "tiled", "tile": 48}, EXPORTABLE).fit(images[:3]).save(tmp_path / "model")
    previous = os.umask(0o027)
    try:
        assert run_cli(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx")], monkeypatch) == 0
    finally:
        os.umask(previous)
    for name in ("m.onnx", "m.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def brute_force_knn(embeddings: Tensor, bank: Tensor, k: int, reweight: int | None) -> tuple[np.ndarray, np.ndarray]:
    """PatchCore scoring one vector at a time in float64 (the paper's definitions)."""
    emb, bank64 = embeddings.double().numpy(), bank.double().numpy()
    batch, _, height, width = emb.shape
    maps = np.zeros((batch, height, width))
    scores = np.zeros(batch)
    for b in range(batch):
        worst, worst_vector, worst_anchor = -1.0, None, -1
        for y in range(height):
            for x in range(width):
                vector = emb[b, :, y, x]
                distances = np.sqrt(((bank64 - vector) ** 2).sum(1))
                order = np.argsort(distances)
                maps[b, y, x] = distances[order[:k]].mean()
                if maps[b, y, x] > worst:
                    worst, worst_vector, worst_anchor = maps[b, y, x], vector, order[0]
        if reweight is None:
            scores[b] = worst
            continue
        support = np.argsort(np.sqrt(((bank64 - bank64[worst_anchor]) ** 2).sum(1)))[:reweight]
        distances = np.sqrt(((bank64[support] - worst_vector) ** 2).sum(1))
        nearest = np.sqrt(((bank64[worst_anchor] - worst_vector) ** 2).sum())
        scores[b] = (1 - np.exp(nearest) / np.exp(distances).sum()) * worst
    return maps, scores


def export_and_run(module: nn.Module, inputs: Tensor, path: Path) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and advanced-indexing notes
        torch.onnx.export(module, (inputs[:1],), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["maps", "scores"], dynamic_axes={"x": {0: "b"}, "maps": {0: "b"}, "scores": {0: "b"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {"x": inputs.numpy()})
    return maps, scores


@pytest.mark.parametrize(("k", "reweight"), [(1, None), (3, None), (1, 4), (2, 50)])
def test_nearest_neighbour_scoring_is_exact(k: int, reweight: int | None, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(k)
    bank = torch.randn(40, 6, generator=generator)
    embeddings = torch.randn(2, 6, 3, 4, generator=generator) * 1.5
    module = NearestNeighbourScoring(bank, k=k, reweight_neighbours=reweight).eval()
    maps, scores = module(embeddings)
    expected_maps, expected_scores = brute_force_knn(embeddings, bank, k, min(reweight, 40) if reweight else None)
    np.testing.assert_allclose(maps.numpy(), expected_maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-5)
    onnx_maps, onnx_scores = export_and_run(module, embeddings, tmp_path / "knn.onnx")
    np.testing.assert_allclose(onnx_maps, maps.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_scores, scores.numpy(), rtol=1e-4, atol=1e-4)
    # the patches x bank matrix is one Gemm (norms as its bias) and one reduction: a ReduceMin for one
    # neighbour; norms, clamp and sqrt on the k kept only (full-matrix passes made the graph slower than its matmul)
    import onnx

    ops = [node.op_type for node in onnx.load(str(tmp_path / "knn.onnx")).graph.node]
    assert "Gemm" in ops and "MatMul" not in ops
    if k == 1:
        assert "ReduceMin" in ops and ("TopK" not in ops if reweight is None else ops.count("TopK") == 1)


@pytest.mark.parametrize("subset", [False, True])
def test_mahalanobis_scoring_is_exact(subset: bool, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    positions, dims = 6, 4
    channels = np.array([5, 0, 3, 2]) if subset else None
    mean = rng.normal(size=(positions, dims))
    factors = rng.normal(size=(positions, dims, dims))
    inverse = factors @ factors.transpose(0, 2, 1) + 0.01 * np.eye(dims)
    embeddings = rng.normal(size=(2, 6 if subset else dims, 2, 3))
    module = MahalanobisScoring(torch.tensor(mean), torch.tensor(inverse), None if channels is None else torch.tensor(channels))
    maps, scores = module(torch.tensor(embeddings, dtype=torch.float32))
    selected = embeddings[:, channels] if subset else embeddings
    expected = np.zeros((2, 2, 3))
    for b in range(2):
        for p in range(positions):
            delta = selected[b, :, p // 3, p % 3] - mean[p]
            expected[b, p // 3, p % 3] = np.sqrt(delta @ inverse[p] @ delta)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(scores.numpy(), expected.reshape(2, -1).max(1), rtol=1e-4)
    onnx_maps, onnx_scores = export_and_run(module, torch.tensor(embeddings, dtype=torch.float32), tmp_path / "m.onnx")
    np.testing.assert_allclose(onnx_maps, maps.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_scores, scores.numpy(), rtol=1e-4, atol=1e-4)


def test_exported_models_apply_the_border_calibration(images: list[np.ndarray], test_image: np.ndarray, tmp_path: Path) -> None:
    """An export carries the model's border ratios in its sidecar and its predictor divides them
    out as the model does (maps and scores equal); with the calibration off neither applies them."""
    model = make_model({"name": "tiled", "tile": 64, "stride": 32}, EXPORTABLE).fit(images)
    assert model.thresholds is not None
    model.thresholds.border_ratios = [1.6, 1.4, 1.2, 1.1]  # as if learned: the tiny model's maps have no frame
    export_onnx(model, tmp_path / "m.onnx")
    assert json.loads((tmp_path / "m.json").read_text())["thresholds"]["border_ratios"] == [1.6, 1.4, 1.2, 1.1]
    expected = model.predict(test_image)
    got = OnnxPredictor(tmp_path / "m.onnx").predict(test_image)
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4 * float(np.abs(expected.anomaly_map).max())
    assert got.score == pytest.approx(expected.score, rel=1e-4)
    plain = model.config.model_copy(deep=True)
    plain.postprocess.border_calibration = False
    model.config = plain
    uncalibrated = model.predict(test_image)
    assert np.abs(uncalibrated.anomaly_map - expected.anomaly_map).max() > 1e-3  # the ratios did change the map
    export_onnx(model, tmp_path / "off.onnx")
    off = OnnxPredictor(tmp_path / "off.onnx").predict(test_image)
    assert np.abs(off.anomaly_map - uncalibrated.anomaly_map).max() <= 1e-4 * float(np.abs(uncalibrated.anomaly_map).max())


def labelled_folder(root: Path) -> Path:
    """An MVTec-style test set of 90x130 images: 3 good, 3 with a spot and its mask."""
    rng = np.random.default_rng(7)
    for index in range(3):
        write(root / "test" / "good" / f"{index:03d}.png", textured_image(rng, 90, 130))
        image, mask = with_spot(textured_image(rng, 90, 130), 20 + 15 * index, 30 + 25 * index, 9)
        write(root / "test" / "spot" / f"{index:03d}.png", image)
        write(root / "ground_truth" / "spot" / f"{index:03d}_mask.png", np.repeat(mask[..., None], 3, axis=2).astype(np.float32))
    return root


def assert_close(got: object, expected: object, where: str) -> None:
    """Numbers within 1e-4 (relative), anything else equal, through nested lists and dicts."""
    if isinstance(expected, dict) and isinstance(got, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list) and isinstance(got, list):
        assert len(got) == len(expected), where
        for index, (one, other) in enumerate(zip(got, expected, strict=True)):
            assert_close(one, other, f"{where}[{index}]")
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6, nan_ok=True), where
    else:
        assert got == expected, where


def test_evaluate_measures_an_export_as_its_model(images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hrad evaluate --model m.onnx`` was refused (the file was read as a model directory). It
    now runs the export through the code that evaluates the model directory: same metrics to
    float tolerance, same report files, and a note where the sidecar lacks the fit config and losses."""
    for figure in ("roc_figure", "pro_figure", "quartile_figure", "loss_figure", "score_figure", "case_figure"):
        monkeypatch.setattr(f"hrad.reports.html.{figure}", lambda *_: "")  # matplotlib: most of the time, drawn alike for both
    monkeypatch.setattr("hrad.evaluation.case_grid", lambda cases, path, **_: path.touch())
    data = labelled_folder(tmp_path / "data")
    make_model({"name": "tiled", "tile": 48, "stride": 32}, EXPORTABLE).fit(images[:3]).save(tmp_path / "model")
    assert run_cli(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx")], monkeypatch) == 0
    for model, report in ((tmp_path / "model", "native"), (tmp_path / "m.onnx", "exported")):
        assert run_cli(["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / report)], monkeypatch) == 0
    native, exported = (json.loads((tmp_path / report / "metrics.json").read_text()) for report in ("native", "exported"))
    timings = {"seconds_per_image", "peak_rss_mb", "peak_gpu_mb", "environment", "config"}
    assert set(native) == set(exported) and native["images"] == exported["images"] == 6
    for key in sorted(set(native) - timings):
        assert_close(exported[key], native[key], key)
    assert 0.5 < native["image_auroc"] <= 1 and native["thresholds_from"] == "model"  # the model's thresholds decided
    assert exported["config"]["export"]["runtime"] == "onnxruntime" and exported["config"]["model"]["strategy"] == "tiled"
    assert sorted(path.name for path in (tmp_path / "exported").iterdir()) == sorted(path.name for path in (tmp_path / "native").iterdir())
    note = "Exported model (m.json, run by onnxruntime): its sidecar keeps no fit config and no training losses"
    assert note in (tmp_path / "exported" / "metrics.md").read_text() and note in (tmp_path / "exported" / "report.html").read_text()
    assert note not in (tmp_path / "native" / "metrics.md").read_text()
