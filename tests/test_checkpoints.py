"""An interrupted fit resumes from its training checkpoint and ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import textured_image

from hrad.config import load_config
from hrad.detectors import checkpoints
from hrad.detectors.checkpoints import checkpoints_in
from hrad.detectors.neural import NeuralDetector, Stage
from hrad.model import AnomalyModel

#: two or three short epochs each (DeSTSeg: two stages of two), so an interruption falls mid-stage
OPTIONS: dict[str, dict[str, Any]] = {
    "students": {"epochs": 3},
    "varad": {"epochs": 3},
    "fastflow": {"epochs": 3},
    "vitad": {"epochs": 3},
    "rdpp": {"epochs": 3, "bottleneck_stride": 1},
    "destseg": {"student_epochs": 2, "segmentation_epochs": 2, "student_stages": 1},
    "realnet": {"epochs": 3},
}


def fitted(detector: str, images: list[np.ndarray]) -> AnomalyModel:
    config = load_config(
        None,
        {"backbone": {"name": "tiny-vit"}, "detector": {"name": detector, **OPTIONS[detector]},
         "strategy": {"name": "downsample", "image_size": 56}, "device": "cpu"},
    )  # fmt: skip
    return AnomalyModel(config).fit(images)


@pytest.mark.parametrize("detector", sorted(OPTIONS))
def test_a_fit_interrupted_after_two_epochs_resumes_to_the_same_weights(
    detector: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [textured_image(np.random.default_rng(index), 84, 112) for index in range(5)]
    reference = fitted(detector, images)

    monkeypatch.setattr(checkpoints, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every epoch
    original = NeuralDetector.end_epoch
    epochs_seen = []

    def interrupted(self: NeuralDetector, stage: Stage, epoch: int, loss: float) -> bool:
        stop = original(self, stage, epoch, loss)
        epochs_seen.append(epoch)
        if len(epochs_seen) == 2:  # Ctrl-C during the second epoch's end: the first's checkpoint stays
            raise KeyboardInterrupt
        return stop

    folder = tmp_path / "checkpoints"
    with checkpoints_in(folder):
        with monkeypatch.context() as patch:
            patch.setattr(type(reference.strategy.detector), "end_epoch", interrupted)
            with pytest.raises(KeyboardInterrupt):
                fitted(detector, images)
        assert len(list(folder.glob("*.pt"))) == 1
        resumed = fitted(detector, images)

    assert resumed.training_history == reference.training_history
    expected = reference.strategy.detector.state_dict()
    got = resumed.strategy.detector.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    np.testing.assert_array_equal(resumed.predict(images[0]).anomaly_map, reference.predict(images[0]).anomaly_map)


def test_another_config_or_other_embeddings_start_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's name digests the config and the first embedding batch (the whole training
    set is hrad fit's to check: the test below)."""
    images = [textured_image(np.random.default_rng(index), 84, 112) for index in range(5)]
    monkeypatch.setattr(checkpoints, "CHECKPOINT_SECONDS", 0.0)
    with checkpoints_in(tmp_path):
        fitted("fastflow", images)
        fitted("fastflow", images[::-1])
        OPTIONS["fastflow"]["epochs"] = 2
        try:
            fitted("fastflow", images)
        finally:
            OPTIONS["fastflow"]["epochs"] = 3
    assert len(list(tmp_path.glob("FastFlow*.pt"))) == 3


def test_hrad_fit_resumes_after_an_interruption_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in the second epoch: exit 130 and a line saying where the checkpoints are; the same
    command again says it resumes, writes the model and removes the folder."""
    from cli_helpers import run, write

    from hrad.detectors.fastflow import FastFlow

    for index in range(5):
        write(tmp_path / "good" / f"{index}.png", textured_image(np.random.default_rng(index), 84, 112))
    command = ["fit", "--data", str(tmp_path / "good"), "--out", str(tmp_path / "model"), "--backbone", "tiny-cnn",
               "--detector", "fastflow", "--strategy", "downsample", "--image-size", "56", "--set", "detector.epochs=3"]  # fmt: skip
    monkeypatch.setattr(checkpoints, "CHECKPOINT_SECONDS", 0.0)
    original = FastFlow.end_epoch
    calls = []

    def interrupted(self: NeuralDetector, stage: Stage, epoch: int, loss: float) -> bool:
        calls.append(epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, stage, epoch, loss)

    with monkeypatch.context() as patch:
        patch.setattr(FastFlow, "end_epoch", interrupted)
        assert run(command, monkeypatch) == 130
    folder = tmp_path / "model.checkpoints"
    assert f"training checkpoints kept in {folder}: the same command resumes from them" in capsys.readouterr().err
    assert run(command, monkeypatch) == 0
    assert f"resuming from the training checkpoints in {folder}" in capsys.readouterr().err
    assert (tmp_path / "model" / "hrad.json").is_file() and not folder.exists()


def test_hrad_fit_drops_the_checkpoints_of_another_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints left by a fit of other files or another config are not resumed from."""
    from cli_helpers import run, write

    for index in range(4):
        write(tmp_path / "good" / f"{index}.png", textured_image(np.random.default_rng(index), 84, 112))
    folder = tmp_path / "model.checkpoints"
    folder.mkdir()
    (folder / "FastFlow-0123.pt").write_bytes(b"left by another fit")
    (folder / "fit.json").write_text('{"config": {}, "files": [], "roi": null}')
    (folder / "notes.txt").write_text("a user's own file: never removed")
    command = ["fit", "--data", str(tmp_path / "good"), "--out", str(tmp_path / "model"), "--backbone", "tiny-cnn",
               "--strategy", "downsample", "--image-size", "56", "--set", "detector.coreset_ratio=0.5"]  # fmt: skip
    assert run(command, monkeypatch) == 0
    err = capsys.readouterr().err
    assert f"the training checkpoints in {folder} are of another fit (its config or files changed): training from the start" in err
    assert "resuming" not in err and [path.name for path in folder.iterdir()] == ["notes.txt"]


def test_an_unreadable_checkpoint_is_a_warning_and_a_fresh_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A half-copied or damaged checkpoint costs the time it saved, never the fit."""
    from hrad.detectors.checkpoints import TrainingCheckpoint

    damaged = tmp_path / "FastFlow-0123.pt"
    damaged.write_bytes(b"not a torch file")
    with caplog.at_level("WARNING", logger="hrad.detectors.checkpoints"):
        assert TrainingCheckpoint(damaged).load() is None
    assert f"{damaged}: unreadable training checkpoint" in caplog.text and "training from the start" in caplog.text


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A save stopped mid-write keeps the previous checkpoint and leaves no temporary file beside
    it; a folder that cannot be written is one warning, and the fit goes on."""
    from hrad.detectors.checkpoints import TrainingCheckpoint

    checkpoint = TrainingCheckpoint(tmp_path / "checkpoints" / "FastFlow-0123.pt")
    checkpoint.save({"epoch": 1})  # the folder is made on the first save

    class StopsThePickle:  # a Ctrl-C while torch.save writes
        def __reduce__(self) -> Any:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"epoch": 2, "stop": StopsThePickle()})
    assert checkpoint.load() == {"epoch": 1}
    assert [path.name for path in checkpoint.path.parent.iterdir()] == ["FastFlow-0123.pt"]

    (tmp_path / "a-file").write_text("")
    blocked = TrainingCheckpoint(tmp_path / "a-file" / "FastFlow-0123.pt")
    with caplog.at_level("WARNING", logger="hrad.detectors.checkpoints"):
        blocked.save({"epoch": 1})
    assert f"{blocked.path}: cannot write a training checkpoint" in caplog.text and "training goes on without" in caplog.text
