"""A fit whose threshold maps are all one value (a training collapsed to a constant output, an
all-zero map) is refused with one line naming the detector and what to do, and writes no model:
its thresholds had zero spread and flagged everything or nothing. A fit without threshold images
(``threshold.validation_fraction`` 0) predicts one training image, so NaN maps are refused there
too. A real model on varied images is never refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run, write
from conftest import GaussianTestDetector, textured_image
from torch import Tensor

from hrad.artifact import MANIFEST
from hrad.config import ModelConfig, load_config
from hrad.detectors.base import DetectorOutput
from hrad.errors import DivergedError, InputError
from hrad.model import AnomalyModel

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--backbone", "tiny-cnn", "--detector", "test-gaussian", "--strategy", "downsample", "--image-size", "64"]
FASTFLOW = ["--backbone", "tiny-cnn", "--detector", "fastflow", "--strategy", "downsample", "--image-size", "56",
            "--set", "detector.epochs=1"]  # fmt: skip


def _config(detector: str = "test-gaussian", validation_fraction: float = 0.2) -> ModelConfig:
    return load_config(None, {
        "backbone": {"name": "tiny-cnn"}, "detector": {"name": detector},
        "strategy": {"name": "downsample", "image_size": 64}, "threshold": {"validation_fraction": validation_fraction},
    })  # fmt: skip


def _constant_predict(value: float) -> Callable[[object, Tensor], DetectorOutput]:
    """A detector whose output collapsed: every map value and score ``value``, whatever the image."""

    def predict(self: object, embeddings: Tensor) -> DetectorOutput:
        maps = torch.full((embeddings.shape[0], *embeddings.shape[2:]), value)
        return DetectorOutput(maps=maps, scores=maps.flatten(1).max(1).values)

    return predict


def _nan_predict(self: object, embeddings: Tensor) -> DetectorOutput:
    maps = torch.full((embeddings.shape[0], *embeddings.shape[2:]), float("nan"))
    return DetectorOutput(maps=maps, scores=maps.flatten(1).max(1).values)


def _images(count: int, flat: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.full((64, 80, 3), 0.5, np.float32) if flat else textured_image(rng, 64, 80) for _ in range(count)]


def _folder(folder: Path, count: int = 6) -> Path:
    for index, image in enumerate(_images(count)):
        write(folder / f"{index}.png", image)
    return folder


# 0: an all-zero map; 1234.5678: the border calibration and blur round it a float32 ulp apart
@pytest.mark.parametrize("value", [0.0, 0.37, 1234.5678])
def test_a_fit_whose_held_out_maps_are_all_one_value_is_refused_naming_the_detector(
    value: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GaussianTestDetector, "predict", _constant_predict(value))
    with pytest.raises(DivergedError) as caught:
        AnomalyModel(_config()).fit(_images(10))  # 2 held out
    line = str(caught.value)
    assert line.startswith(
        f"test-gaussian: every anomaly map of all 2 held-out images is one value ({value:.6g} everywhere), "
        "so thresholds from them would flag everything or nothing: "
    ), line
    assert "degenerate backbone weights? check --weights" in line and "identical to the training ones" in line
    assert "\n" not in line


def test_a_collapsed_trained_detector_is_told_to_lower_its_learning_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    from hrad.detectors.fastflow import FastFlow

    monkeypatch.setattr(FastFlow, "predict", _constant_predict(0.0))
    config = _config("fastflow")
    config.detector = config.detector.model_copy(update={"epochs": 1})
    with pytest.raises(DivergedError, match=r"^fastflow: every anomaly map of this held-out image is one value \(0 everywhere\)") as caught:
        AnomalyModel(config).fit(_images(4))
    assert "the training collapsed to a constant output (last train epoch's mean loss " in str(caught.value)
    assert "fit again with a lower learning rate or more epochs (hrad options detector fastflow)" in str(caught.value)


def test_constant_maps_of_images_that_are_each_one_flat_value_are_the_datas_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GaussianTestDetector, "predict", _constant_predict(0.0))
    with pytest.raises(InputError, match=r"^image \d+: every anomaly map of all 2 held-out images is one value \(0 everywhere\), .*: the held-out images are each one flat value \(0\.5 everywhere in this one\)"):
        AnomalyModel(_config()).fit(_images(10, flat=True))


def test_maps_constant_per_image_but_not_equal_across_images_are_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """One value in each map but not the same in all: the scores still tell images apart."""

    def per_image(self: object, embeddings: Tensor) -> DetectorOutput:
        level = embeddings.float().mean((1, 2, 3))  # one value per image, the image's own
        maps = level[:, None, None].expand(-1, *embeddings.shape[2:]).contiguous()
        return DetectorOutput(maps=maps, scores=level)

    monkeypatch.setattr(GaussianTestDetector, "predict", per_image)
    model = AnomalyModel(_config()).fit(_images(10))
    assert model.thresholds is not None and model.thresholds.pixel_std is not None
    assert model.thresholds.pixel_std > 0


@pytest.mark.parametrize("detector", ["test-gaussian", "patchcore"])
def test_a_real_tiny_model_on_varied_images_is_not_refused_and_far_from_the_limit(detector: str) -> None:
    model = AnomalyModel(_config(detector)).fit(_images(10))
    thresholds = model.thresholds
    assert thresholds is not None and thresholds.pixel_std is not None and thresholds.pixel_mean is not None
    # the refusal needs a spread under 1e-6 of the mean: real maps are thousands of times above it
    assert thresholds.pixel_std > 1e-3 * abs(thresholds.pixel_mean)
    assert max(thresholds.image_scores) - min(thresholds.image_scores) > 1e-3 * max(thresholds.image_scores)


def test_calibrate_on_good_images_mapped_to_one_value_is_refused_and_keeps_the_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    model = AnomalyModel(_config()).fit(_images(10))
    before = model.thresholds
    monkeypatch.setattr(GaussianTestDetector, "predict", _constant_predict(0.0))
    with pytest.raises(DivergedError, match=r"^test-gaussian: every anomaly map of all 4 good images is one value \(0 everywhere\)") as caught:
        model.calibrate(_images(4))
    assert "give varied good images" in str(caught.value)
    assert model.thresholds is before


def test_hrad_fit_whose_held_out_maps_are_one_value_exits_1_with_one_line_and_writes_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hrad.detectors.fastflow import FastFlow

    data = _folder(tmp_path / "good")
    monkeypatch.setattr(FastFlow, "predict", _constant_predict(0.0))
    out = tmp_path / "models" / "model"
    assert run(["fit", "--data", str(data), "--out", str(out), *FASTFLOW], monkeypatch) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hrad: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("hrad: error: fastflow: every anomaly map of this held-out image is one value (0 everywhere)")
    assert "the training collapsed to a constant output" in errors[0]
    assert not (tmp_path / "models").exists() and "model written" not in err  # no model, no checkpoints folder


def test_hrad_calibrate_on_good_images_mapped_to_one_value_exits_1_and_leaves_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _folder(tmp_path / "good")
    model = tmp_path / "model"
    assert run(["fit", "--data", str(data), "--out", str(model), *TINY], monkeypatch) == 0
    before = (model / MANIFEST).read_bytes()
    monkeypatch.setattr(GaussianTestDetector, "predict", _constant_predict(0.0))
    capsys.readouterr()
    assert run(["calibrate", "--model", str(model), "--out", str(model), str(data)], monkeypatch) == 1
    err = capsys.readouterr().err
    assert "hrad: error: test-gaussian: every anomaly map of all 6 good images is one value (0 everywhere)" in err
    assert (model / MANIFEST).read_bytes() == before


def test_a_fit_without_threshold_images_refuses_a_model_that_maps_a_training_image_to_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(GaussianTestDetector, "predict", _nan_predict)
    with pytest.raises(DivergedError, match=r"^image 0: the anomaly map of this training image is NaN or inf, so the model would map and score images as NaN: "):
        AnomalyModel(_config(validation_fraction=0)).fit(_images(3))
    data = _folder(tmp_path / "good", count=3)
    out = tmp_path / "model"
    assert run(["fit", "--data", str(data), "--out", str(out), *TINY, "--set", "threshold.validation_fraction=0"], monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"hrad: error: {data / '0.png'}: the anomaly map of this training image is NaN or inf" in err
    assert not out.exists()


def test_a_fit_without_threshold_images_keeps_a_model_whose_training_map_is_rightly_one_value() -> None:
    """Not refused: PatchCore whose bank keeps every patch maps a training image to 0 everywhere,
    rightly, so only NaN / inf is checked on the training image; the model has no thresholds."""
    config = _config("patchcore", validation_fraction=0)
    config.detector = config.detector.model_copy(update={"coreset_ratio": 1.0})
    images = _images(3)
    model = AnomalyModel(config).fit(images)
    assert model.thresholds is None
    assert not model.predict(images[0]).anomaly_map.any()  # the map the check saw: one value, 0
