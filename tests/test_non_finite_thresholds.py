"""A fit or calibration whose threshold images come out NaN / inf stops with one line naming the
stage (status 1 when the model diverged, 2 when the images are flat) and writes no model: NaN
thresholds were saved as null, and that model then failed every load as a corrupt manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run, write
from conftest import GaussianTestDetector, textured_image
from torch import Tensor

from hrad.artifact import MANIFEST
from hrad.detectors.base import DetectorOutput

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--backbone", "tiny-cnn", "--detector", "test-gaussian", "--strategy", "downsample", "--image-size", "64"]


def _nan_predict(self: GaussianTestDetector, embeddings: Tensor) -> DetectorOutput:
    """A detector gone degenerate: every map value and score NaN."""
    maps = torch.full((embeddings.shape[0], *embeddings.shape[2:]), float("nan"))
    return DetectorOutput(maps=maps, scores=maps.flatten(1).max(1).values)


def _good_folder(folder: Path, count: int = 6, flat: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        image = np.full((64, 80, 3), 0.5, np.float32) if flat else textured_image(rng, 64, 80)
        write(folder / f"{index}.png", image)
    return folder


def test_a_fit_whose_held_out_maps_are_nan_exits_1_naming_the_image_and_writes_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _good_folder(tmp_path / "good")
    monkeypatch.setattr(GaussianTestDetector, "predict", _nan_predict)
    out = tmp_path / "models" / "model"
    assert run(["fit", "--data", str(data), "--out", str(out), *TINY], monkeypatch) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hrad: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"hrad: error: {data}" in errors[0]  # the held-out image, by its file
    assert "the anomaly map of this held-out image is NaN or inf, so no thresholds can come from it" in errors[0]
    assert "the backbone or detector gives NaN or inf" in errors[0]
    assert not (tmp_path / "models").exists() and "model written" not in err


def test_a_fit_on_flat_images_whose_maps_are_nan_is_the_datas_fault_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _good_folder(tmp_path / "good", flat=True)
    monkeypatch.setattr(GaussianTestDetector, "predict", _nan_predict)
    out = tmp_path / "model"
    assert run(["fit", "--data", str(data), "--out", str(out), *TINY], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"hrad: error: {data}" in err and "the image is one flat value (128 everywhere)" in err
    assert not out.exists()


def test_hrad_calibrate_on_images_the_model_maps_to_nan_exits_1_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _good_folder(tmp_path / "good")
    model = tmp_path / "model"
    assert run(["fit", "--data", str(data), "--out", str(model), *TINY], monkeypatch) == 0
    before = (model / MANIFEST).read_bytes()
    monkeypatch.setattr(GaussianTestDetector, "predict", _nan_predict)
    capsys.readouterr()
    calibrated = tmp_path / "calibrated"
    assert run(["calibrate", "--model", str(model), "--out", str(calibrated), str(data)], monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"hrad: error: {data}" in err and "the anomaly map of this good image is NaN or inf" in err
    assert not calibrated.exists()
    # in place: the model stays as it was
    assert run(["calibrate", "--model", str(model), "--out", str(model), str(data)], monkeypatch) == 1
    assert (model / MANIFEST).read_bytes() == before


def test_a_fit_whose_training_loss_diverges_exits_1_and_keeps_no_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints of a diverged training are not kept to resume from: resumed, it diverges again."""
    from hrad.detectors import checkpoints
    from hrad.detectors.fastflow import FastFlow
    from hrad.detectors.neural import Stage

    data = _good_folder(tmp_path / "good", count=4)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_SECONDS", 0.0)
    ended: list[int] = []
    original_step, original_end = FastFlow.training_step, FastFlow.end_epoch

    def diverging_step(self: FastFlow, embeddings: Tensor) -> Tensor:
        loss = original_step(self, embeddings)
        return loss * float("inf") if ended else loss  # finite in epoch 1, inf from epoch 2

    def end_epoch(self: FastFlow, stage: Stage, epoch: int, loss: float) -> bool:
        ended.append(epoch)
        return original_end(self, stage, epoch, loss)

    monkeypatch.setattr(FastFlow, "training_step", diverging_step)
    monkeypatch.setattr(FastFlow, "end_epoch", end_epoch)
    out = tmp_path / "model"
    command = ["fit", "--data", str(data), "--out", str(out), "--backbone", "tiny-cnn", "--detector", "fastflow",
               "--strategy", "downsample", "--image-size", "56", "--set", "detector.epochs=2"]  # fmt: skip
    assert run(command, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "hrad: error: fastflow: the training loss is not finite in epoch 2 of train: the training diverged; lower its learning rate" in err
    assert "checkpoints kept" not in err and not (tmp_path / "model.checkpoints").exists() and not out.exists()
