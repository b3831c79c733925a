"""Prediction of a gray image by a model fitted on colour ones (or the reverse): one warning."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image
from export_helpers import PATCHCORE, make_model
from test_export_runtime import predict_without_torch
from test_predict_scale import png_bytes

from hrad.artifact import MANIFEST
from hrad.errors import ArtifactError
from hrad.export import export_onnx
from hrad.export_runtime import open_predictor, saved_model_facts
from hrad.model import load

pytestmark = pytest.mark.usefixtures("one_thread")

DOWNSAMPLE = {"name": "downsample", "image_size": 48}


def _images(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [textured_image(rng, 64, 96) for _ in range(count)]


def _gray(image: np.ndarray) -> np.ndarray:
    """One channel of a float RGB image, as an 8-bit gray camera gives it (``H x W``)."""
    return np.rint(image[..., 0] * 255).astype(np.uint8)


def _warnings(predict: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        predict()
    return [str(warning.message) for warning in record]


def _expected(name: str, kind: str = "gray", training: str = "colour") -> str:
    return (
        f"{name}: a {kind} image, the model's training images are {training}: the model reads a gray image as colour, "
        "its one channel in all three, so the backbone sees it unlike the training ones and its score may not compare "
        f"with the thresholds; another camera, or one set to another colour mode? Predict {training} images, as the "
        "training ones"
    )


def test_hrad_predict_of_gray_images_with_a_colour_model_is_one_warning_for_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A camera switched to mono after the fit: the model read its gray files as colour, one channel
    in all three, and said nothing (hrad calibrate warned of such good images; predict did not).
    One line for the run, naming the first gray file; the colour files say nothing."""
    model = make_model(DOWNSAMPLE, "test-gaussian").fit(_images(3, 6)).save(tmp_path / "m")
    folder = tmp_path / "in"
    colour, *grays = _images(4, 3)
    write(folder / "0_colour.png", colour)
    for index, image in enumerate(grays, start=1):
        cv2.imwrite(str(folder / f"{index}_gray.png"), _gray(image))
    assert run(["predict", "--model", str(model), str(folder), "--out", str(tmp_path / "out")], monkeypatch) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    assert lines == [f"hrad: warning: {_expected(str(folder / '1_gray.png'))}. Said once, for the first such image"]


def test_a_gray_model_warns_once_of_a_colour_image_and_a_model_saved_before_it_kept_its_kind_says_nothing(tmp_path: Path) -> None:
    """The reverse (a colour camera on a line fitted on gray parts): the same line; gray images of a
    gray model say nothing. A model saved before hrad kept ``gray`` in its manifest has nothing to
    compare with: silent, as before."""
    model = make_model(DOWNSAMPLE, "test-gaussian").fit([_gray(image) for image in _images(3, 6)])
    assert model.gray is True
    gray_test, colour = [_gray(image) for image in _images(4, 1)][0], _images(5, 2)
    assert _warnings(lambda: model.predict(gray_test, name="gray.png")) == []
    warned = _warnings(lambda: model.predict_batch(colour, names=["a.png", "b.png"]))
    assert warned == [f"{_expected('a.png', 'colour', 'gray')}. Said once, for the first such image"]
    assert _warnings(lambda: model.predict(colour[1], name="c.png")) == []  # once for the model
    manifest_path = model.save(tmp_path / "m") / MANIFEST
    assert json.loads(manifest_path.read_text())["gray"] is True
    manifest = json.loads(manifest_path.read_text())
    del manifest["gray"]
    manifest_path.write_text(json.dumps(manifest))
    assert _warnings(lambda: load(tmp_path / "m").predict(colour[0], name="a.png")) == []


def test_an_export_records_the_training_images_kind_and_warns_as_the_model_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecar did not keep whether the training images were gray: an export could not tell a
    gray image among colour ones. It now keeps ``gray`` and its predictor gives the model's line,
    once for the predictor, in the API and in a torch-free ``hrad predict``; an older sidecar (no
    ``gray``) predicts as before, silent, and a damaged value is one line."""
    model = make_model(DOWNSAMPLE, {**PATCHCORE, "num_neighbors": 3}).fit(_images(3, 4))
    model.save(tmp_path / "m")
    export_onnx(model, tmp_path / "m.onnx")
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["gray"] is False and saved_model_facts(sidecar, True, "m.json")["gray"] is False
    colour, *grays = _images(4, 3)
    images = [colour, *(_gray(image) for image in grays)]
    names = ["colour.png", "gray.png", "gray2.png"]
    expected = _warnings(lambda: model.predict_batch(images, names=names))
    assert expected == [f"{_expected('gray.png')}. Said once, for the first such image"]
    predictor = open_predictor(tmp_path / "m.onnx")
    assert _warnings(lambda: predictor.predict_batch(images, names=names)) == expected
    assert _warnings(lambda: predictor.predict(images[1], name="again.png")) == []  # once for the predictor

    folder = tmp_path / "in"
    for name, image in zip(names, images, strict=True):
        if image.ndim == 2:
            cv2.imwrite(str(folder / name), image)
        else:
            write(folder / name, image)
    assert run(["predict", "--model", str(tmp_path / "m"), str(folder), "--out", str(tmp_path / "torch")], monkeypatch) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    result = predict_without_torch(["--model", str(tmp_path / "m.onnx"), str(folder), "--out", str(tmp_path / "exported")])
    assert result.returncode == 0, result.stderr
    assert len(lines) == 1 and "gray.png: a gray image" in lines[0]
    assert [line for line in result.stderr.splitlines() if line.startswith("hrad: warning:")] == lines

    del sidecar["gray"]  # exported before hrad kept it
    (tmp_path / "m.json").write_text(json.dumps(sidecar))
    assert _warnings(lambda: open_predictor(tmp_path / "m.onnx").predict_batch(images, names=names)) == []
    sidecar["gray"] = "yes"
    (tmp_path / "m.json").write_text(json.dumps(sidecar))
    with pytest.raises(ArtifactError, match=r"m\.onnx sidecar: gray 'yes' is not true or false; the file is corrupt$"):
        open_predictor(tmp_path / "m.onnx")


@pytest.mark.parametrize("exported", [False, True])
def test_served_predictions_each_carry_the_colour_warning_of_their_own_image(exported: bool, tmp_path: Path) -> None:
    """As the scale warning: every response for a gray upload to a colour model carries the line
    (without "said once"), in /predict and per batch item; the console keeps one line for the model."""
    from fastapi.testclient import TestClient

    from hrad.service import create_app

    model = make_model(DOWNSAMPLE, {**PATCHCORE, "num_neighbors": 3}).fit(_images(3, 4)).save(tmp_path / "m")
    if exported:
        export_onnx(load(model), tmp_path / "m.onnx")
    client = TestClient(create_app(tmp_path / "m.onnx" if exported else model))
    colour, gray_source = _images(4, 2)
    ok, encoded = cv2.imencode(".png", _gray(gray_source))
    assert ok
    gray = encoded.tobytes()
    with pytest.warns(UserWarning) as record:
        for name in ("a.png", "b.png"):
            body = client.post("/predict", files={"image": (name, gray, "image/png")}).json()
            assert body["warnings"] == [_expected(name)]
        assert client.post("/predict", files={"image": ("colour.png", png_bytes(colour), "image/png")}).json()["warnings"] == []
        files = [("images", ("colour.png", png_bytes(colour))), ("images", ("c.png", gray))]
        results = client.post("/predict/batch", files=files).json()["results"]
    assert [result["warnings"] for result in results] == [[], [_expected("c.png")]]
    colour_lines = [str(warning.message) for warning in record if "colour mode" in str(warning.message)]
    assert colour_lines == [f"{_expected('a.png')}. Said once, for the first such image"]
