"""OpenVINO export (FP32/FP16 IR from the verified ONNX) and the OpenVINO runtime for exported models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run as run_cli
from export_helpers import PATCHCORE, make_model, spotted_image, training_images

from hrad.errors import ConfigError
from hrad.export import export_onnx, export_openvino, open_predictor

pytest.importorskip("openvino")

PATCHCORE_K3 = {**PATCHCORE, "num_neighbors": 3}
#: relative to the map's magnitude; FP16 weights move maps by about 3e-3 on these models
MAP_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return training_images(11, 3)


@pytest.fixture(scope="module")
def test_image() -> np.ndarray:
    return spotted_image(12)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize(
    "strategy",
    [{"name": "tiled", "tile": 48, "stride": 32}, {"name": "tiled-ensemble", "tile": 48}],
    ids=["tiled", "tiled-ensemble"],
)
def test_openvino_export_matches_model_predict(
    strategy: dict, precision: str, images: list[np.ndarray], test_image: np.ndarray, tmp_path: Path
) -> None:
    model = make_model(strategy, PATCHCORE_K3).fit(images)
    sidecar = json.loads(export_openvino(model, tmp_path / "m.xml", precision).read_text())
    assert sidecar["openvino"]["precision"] == precision and (tmp_path / "m.bin").is_file()
    expected = model.predict(test_image)
    got = open_predictor(tmp_path / "m.xml").predict(test_image)
    scale = float(np.abs(expected.anomaly_map).max())
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= MAP_TOLERANCE[precision] * scale
    # PatchCore's reweighted score (topk, gathers, log-sum-exp) survives the conversion
    assert got.score == pytest.approx(expected.score, rel=MAP_TOLERANCE[precision])


def test_openvino_runtime_runs_a_plain_onnx_export(images: list[np.ndarray], test_image: np.ndarray, tmp_path: Path) -> None:
    model = make_model({"name": "downsample", "image_size": 64}, PATCHCORE_K3).fit(images)
    export_onnx(model, tmp_path / "m.onnx")
    with_ort = open_predictor(tmp_path / "m.onnx").predict(test_image)
    with_openvino = open_predictor(tmp_path / "m.onnx", runtime="openvino").predict(test_image)
    scale = float(np.abs(with_ort.anomaly_map).max())
    assert np.abs(with_openvino.anomaly_map - with_ort.anomaly_map).max() <= 1e-4 * scale
    assert with_openvino.score == pytest.approx(with_ort.score, rel=1e-4)
    with pytest.raises(ConfigError, match="^runtime 'tensorrt' is unknown"):
        open_predictor(tmp_path / "m.onnx", runtime="tensorrt")
    with pytest.raises(ConfigError, match="^precision 'int4' is unknown"):
        export_openvino(model, tmp_path / "x.xml", "int4")


def test_cli_export_openvino(
    images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(args: list[str]) -> int:
        return run_cli(args, monkeypatch)

    make_model({"name": "tiled", "tile": 48}, PATCHCORE_K3).fit(images[:2]).save(tmp_path / "model")
    base = ["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out" / "m.xml")]
    assert run([*base, "--format", "openvino", "--precision", "fp16"]) == 0
    assert all((tmp_path / "out" / f"m.{suffix}").is_file() for suffix in ("xml", "bin", "onnx", "json"))
    assert json.loads((tmp_path / "out" / "m.json").read_text())["openvino"]["precision"] == "fp16"
    capsys.readouterr()
    assert run([*base, "--format", "tflite"]) == 2
    assert capsys.readouterr().err.strip().endswith("export format 'tflite' is unknown; choose onnx or openvino")
