"""Prediction of images the model's strategy scales unlike its training images: one warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image
from export_helpers import make_model

from hrad.artifact import MANIFEST
from hrad.model import load

pytestmark = pytest.mark.usefixtures("one_thread")

DOWNSAMPLE = {"name": "downsample", "image_size": 48}


def _images(seed: int, count: int, height: int = 64, width: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [textured_image(rng, height, width) for _ in range(count)]


def test_predict_of_images_resized_unlike_the_training_ones_is_one_warning_for_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A downsample model fitted on 96x64 parts, given 128x96 ones (another camera, another crop),
    resized them to its working size by another factor and said nothing: their defects reached the
    detector at another apparent size than anything it learned. One line for the run, not one a file."""
    model = make_model(DOWNSAMPLE, "test-gaussian").fit(_images(3, 6)).save(tmp_path / "m")
    folder = tmp_path / "in"
    for index, image in enumerate(_images(4, 2)):
        write(folder / f"{index}_same.png", image)
    for index, image in enumerate(_images(5, 3, 96, 128)):
        write(folder / f"{index}_wide.png", image)
    assert run(["predict", "--model", str(model), str(folder), "--out", str(tmp_path / "out")], monkeypatch) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    assert lines == [
        f"hrad: warning: {folder / '0_wide.png'}: a 128x96 image, the model was fitted on 96x64 ones: the downsample strategy "
        "resizes every image to its working size, this one by x0.38 across, x0.5 down, the training images by x0.5 across, "
        "x0.75 down: its defects reach the detector at another apparent size than the training parts did, and its scores may "
        "not compare with the thresholds; predict images of the training size (crop or resize them alike). Said once, for "
        "the first such image"
    ]


def test_images_of_the_training_scale_or_a_native_resolution_strategy_say_nothing(tmp_path: Path) -> None:
    """Strips of another length tiled at native resolution are scaled alike (by 1): no warning;
    a model saved before it kept its fitted size (no ``fitted_size``) loads and predicts without one."""
    tiled = make_model({"name": "tiled", "tile": 32}, "test-gaussian").fit(_images(3, 6))
    downsample = make_model(DOWNSAMPLE, "test-gaussian").fit(_images(3, 6))
    manifest_path = downsample.save(tmp_path / "m") / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["fitted_size"]
    manifest_path.write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiled.predict_batch([*_images(4, 1, 96, 128), *_images(5, 1, 64, 200)])
        downsample.predict(_images(4, 1, 64, 96)[0])
        downsample.predict(_images(4, 1, 65, 97)[0])  # 1.5% and 1% apart: within the 2% of rounding
        load(tmp_path / "m").predict(_images(4, 1, 96, 128)[0])


def test_the_python_api_warns_once_for_the_model_and_names_the_array() -> None:
    model = make_model(DOWNSAMPLE, "test-gaussian").fit(_images(3, 6))
    with pytest.warns(UserWarning) as record:
        model.predict_batch(_images(4, 2, 64, 64), names=["a.png", "b.png"])
        model.predict(_images(5, 1, 128, 96)[0])
    assert [str(warning.message).split(": the downsample")[0] for warning in record] == [
        "a.png: a 64x64 image, the model was fitted on 96x64 ones"
    ]
