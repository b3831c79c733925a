"""AnomalyModel end to end on tiny backbones: fit, predict, thresholds, artifact round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import textured_image, with_spot

import hrad
from hrad.artifact import MANIFEST, WEIGHTS
from hrad.config import load_config
from hrad.errors import ArtifactError, ConfigError
from hrad.model import AnomalyModel

STRATEGIES = [
    {"name": "downsample", "image_size": 96},
    {"name": "downsample", "image_size": 96, "pad_to_square": True},
    {"name": "tiled", "tile": 64, "stride": 48},
]


def make_model(strategy: dict, backbone: str = "tiny-cnn") -> AnomalyModel:
    config = load_config(None, {"backbone": {"name": backbone}, "detector": {"name": "test-gaussian"}, "strategy": strategy})
    return AnomalyModel(config)


@pytest.fixture(scope="module")
def train_images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [textured_image(rng, 120, 200) for _ in range(6)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_fit_predict_finds_spot_and_round_trips(strategy: dict, train_images: list[np.ndarray], tmp_path: Path) -> None:
    model = make_model(strategy).fit(train_images)
    image, mask = with_spot(textured_image(np.random.default_rng(7), 120, 200), 50, 140, 14)
    prediction = model.predict(image)
    assert prediction.anomaly_map.shape == (120, 200) and prediction.anomaly_map.dtype == np.float32
    y, x = np.unravel_index(prediction.anomaly_map.argmax(), prediction.anomaly_map.shape)
    assert abs(y - 57) < 20 and abs(x - 147) < 20
    normal = model.predict(textured_image(np.random.default_rng(8), 120, 200))
    assert prediction.score > normal.score
    assert model.thresholds is not None and prediction.is_anomalous is True
    model.save(tmp_path / "model")
    loaded = hrad.load(tmp_path / "model")
    again = loaded.predict(image)
    np.testing.assert_allclose(again.anomaly_map, prediction.anomaly_map, rtol=1e-5, atol=1e-6)
    assert again.score == pytest.approx(prediction.score, rel=1e-5)
    assert loaded.thresholds is not None and loaded.thresholds.image == pytest.approx(model.thresholds.image)


def test_prediction_does_not_depend_on_other_images(train_images: list[np.ndarray]) -> None:
    model = make_model(STRATEGIES[2]).fit(train_images)
    image = textured_image(np.random.default_rng(3), 120, 200)
    first = model.predict(image).anomaly_map
    model.predict(with_spot(image, 10, 10, 30)[0])
    np.testing.assert_array_equal(model.predict(image).anomaly_map, first)


def test_predict_accepts_paths_and_integer_arrays(train_images: list[np.ndarray], tmp_path: Path) -> None:
    import cv2

    model = make_model(STRATEGIES[0]).fit(train_images)
    image = (train_images[0] * 255).round().astype(np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), image[..., ::-1])
    from_path = model.predict(tmp_path / "x.png").anomaly_map
    from_array = model.predict(image).anomaly_map
    from_gray16 = model.predict((train_images[0][..., 0] * 65535).astype(np.uint16)).anomaly_map
    np.testing.assert_allclose(from_path, from_array, atol=1e-5)
    assert from_gray16.shape == (120, 200)


def test_vit_tiles_are_resized_to_patch_multiple(train_images: list[np.ndarray]) -> None:
    model = make_model({"name": "tiled", "tile": 64}, backbone="tiny-vit").fit(train_images[:3])
    assert model.predict(train_images[4]).anomaly_map.shape == (120, 200)


def test_failed_save_keeps_previous_model(train_images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(STRATEGIES[0]).fit(train_images)
    model.save(tmp_path / "model")
    before = (tmp_path / "model" / WEIGHTS).read_bytes()

    def broken_state() -> dict[str, torch.Tensor]:
        raise RuntimeError("disk full")

    monkeypatch.setattr(model.strategy, "state_dict", broken_state)
    with pytest.raises(RuntimeError):
        model.save(tmp_path / "model")
    assert (tmp_path / "model" / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging debris


def test_artifact_from_other_version_is_refused(train_images: list[np.ndarray], tmp_path: Path) -> None:
    make_model(STRATEGIES[0]).fit(train_images).save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / MANIFEST).read_text())
    manifest["artifact_format"] = 999
    manifest["hrad_version"] = "9.9.9"
    (tmp_path / "model" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"saved by hrad 9\.9\.9 \(artifact format 999\).*: upgrade hrad to 9\.9\.9 or later to read it$"):
        hrad.load(tmp_path / "model")
    manifest["artifact_format"], manifest["hrad_version"] = 1, "0.0.1"  # an older format: its geometry changed
    (tmp_path / "model" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"saved by hrad 0\.0\.1 \(artifact format 1\).*: refit it with this version$"):
        hrad.load(tmp_path / "model")


def test_missing_and_incomplete_artifacts(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="model not found"):
        hrad.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="not an hrad model"):
        hrad.load(tmp_path / "empty")


def test_refuses_to_overwrite_a_foreign_directory(train_images: list[np.ndarray], tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        make_model(STRATEGIES[0]).fit(train_images).save(tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown detector 'nope'"):
        load_config(None, {"detector": {"name": "nope"}})
    with pytest.raises(ConfigError, match="strategy.tile"):
        load_config(None, {"strategy": {"name": "downsample", "tile": 5}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("detector: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


@pytest.mark.parametrize("name", ["banana", "cuda:x", "mps", "cuda:64"])
def test_a_device_torch_or_this_machine_lacks_is_a_one_line_config_error(name: str) -> None:
    if name == "cuda:64" and torch.cuda.device_count() > 64:
        pytest.skip("a machine with more than 64 CUDA devices")
    with pytest.raises(ConfigError, match="device") as raised:
        AnomalyModel(load_config(None, {"backbone": {"name": "tiny-cnn"}, "device": name}))
    assert "\n" not in str(raised.value)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            AnomalyModel(load_config(None, {"backbone": {"name": "tiny-cnn"}, "device": "cuda"}))
