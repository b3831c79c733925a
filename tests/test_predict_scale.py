"""Prediction of images the model's strategy scales unlike its training images: one warning."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image
from export_helpers import PATCHCORE, make_model
from test_export_runtime import predict_without_torch

from hrad.artifact import MANIFEST
from hrad.export import export_onnx
from hrad.export_runtime import open_predictor
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


#: a strategy of each exported kind that resizes images by their size (hiad: its low branch;
#: a2o, whose pool is not bound to patch positions, so other sizes are predicted)
RESIZING_EXPORTS = {
    "downsample": DOWNSAMPLE,
    "tiled": {"name": "tiled", "tile": 32, "image_size": 80},
    "tiled-ensemble": {"name": "tiled-ensemble", "tile": 32, "image_size": 64},
    "tiled-ensemble-keep-aspect": {"name": "tiled-ensemble", "tile": 32, "image_size": 64, "keep_aspect": True},
    "mrf": {"name": "mrf", "pixel_budget": 4_000, "scales": [0.5, 1.0]},
    "hiad": {"name": "hiad", "patch_size": 32, "low_res_size": 48, "assignment": "a2o", "fusion_rates": [0]},
}


def _warnings(predict: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        predict()
    return [str(warning.message) for warning in record]


@pytest.mark.parametrize("strategy", RESIZING_EXPORTS.values(), ids=RESIZING_EXPORTS.keys())
def test_an_export_warns_once_as_the_model_does(strategy: dict[str, Any], tmp_path: Path) -> None:
    """The exported predictor scaled an image unlike the training images and said nothing, where
    the model warns: the same line, once for the predictor; an older export (no ``resizing`` in
    its sidecar) predicts as before, silent."""
    model = make_model(strategy, {**PATCHCORE, "num_neighbors": 3}).fit(_images(3, 4))
    export_onnx(model, tmp_path / "m.onnx")
    images = [*_images(4, 1), *_images(5, 2, 96, 128)]
    names = ["same.png", "odd.png", "odd2.png"]
    expected = _warnings(lambda: model.predict_batch(images, names=names))
    assert len(expected) == 1 and expected[0].startswith("odd.png: a 128x96 image, the model was fitted on 96x64 ones: ")
    predictor = open_predictor(tmp_path / "m.onnx")
    assert _warnings(lambda: predictor.predict_batch(images, names=names)) == expected
    assert _warnings(lambda: predictor.predict(images[1], name="again.png")) == []  # once for the predictor
    sidecar = json.loads((tmp_path / "m.json").read_text())
    del sidecar["resizing"]
    (tmp_path / "m.json").write_text(json.dumps(sidecar))
    assert _warnings(lambda: open_predictor(tmp_path / "m.onnx").predict_batch(images, names=names)) == []


def test_a_torch_free_predict_of_an_export_warns_as_the_model_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``hrad predict --model m.onnx`` where torch cannot be imported: the model's warning line, once."""
    model = make_model(DOWNSAMPLE, {**PATCHCORE, "num_neighbors": 3}).fit(_images(3, 4))
    model.save(tmp_path / "m")
    export_onnx(model, tmp_path / "m.onnx")
    folder = tmp_path / "in"
    write(folder / "0_same.png", _images(4, 1)[0])
    for index, image in enumerate(_images(5, 2, 96, 128)):
        write(folder / f"{index}_wide.png", image)
    assert run(["predict", "--model", str(tmp_path / "m"), str(folder), "--out", str(tmp_path / "torch")], monkeypatch) == 0
    expected = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    result = predict_without_torch(["--model", str(tmp_path / "m.onnx"), str(folder), "--out", str(tmp_path / "exported")])
    assert result.returncode == 0, result.stderr
    assert len(expected) == 1 and [line for line in result.stderr.splitlines() if line.startswith("hrad: warning:")] == expected


def test_a_tiled_ensemble_keeping_its_aspect_warns_of_an_image_it_stretches() -> None:
    """With keep_aspect the ensemble resizes every image to its fitted working size (96x64 -> 64x43),
    so a 96x96 image is stretched (x0.67 across, x0.45 down); the warning took the working size a
    96x96 image alone would get (64x64, x0.67 like the training images) and said nothing."""
    model = make_model({"name": "tiled-ensemble", "tile": 32, "image_size": 64, "keep_aspect": True}, "test-gaussian").fit(_images(3, 6))
    assert model.strategy.working_size == (43, 64)
    with pytest.warns(UserWarning) as record:
        model.predict(_images(4, 1, 96, 96)[0], name="square.png")
    assert [str(warning.message).split(": its defects")[0] for warning in record] == [
        "square.png: a 96x96 image, the model was fitted on 96x64 ones: the tiled-ensemble strategy resizes every image to "
        "its working size, this one by x0.67 across, x0.45 down, the training images by x0.67"
    ]


@pytest.mark.parametrize("exported", [False, True])
def test_served_predictions_each_carry_the_scale_warning_of_their_own_image(exported: bool, tmp_path: Path) -> None:
    """hrad serve warned "once per model": only the first rescaled upload's response said so, and a
    client sending another one later got [] for an image just as far from the training scale. Each
    response now carries the line for its own image (without "said once"), in /predict and per batch
    item; the server's console keeps its one line for the model; an upload of the training size gets []."""
    from fastapi.testclient import TestClient

    from hrad.service import create_app

    model = make_model(DOWNSAMPLE, {**PATCHCORE, "num_neighbors": 3}).fit(_images(3, 4)).save(tmp_path / "m")
    if exported:
        export_onnx(load(model), tmp_path / "m.onnx")
    client = TestClient(create_app(tmp_path / "m.onnx" if exported else model))
    wide, same = _images(5, 1, 96, 128)[0], _images(4, 1)[0]

    def expected(name: str) -> str:
        return (
            f"{name}: a 128x96 image, the model was fitted on 96x64 ones: the downsample strategy resizes every image to its "
            "working size, this one by x0.38 across, x0.5 down, the training images by x0.5 across, x0.75 down: its defects "
            "reach the detector at another apparent size than the training parts did, and its scores may not compare with the "
            "thresholds; predict images of the training size (crop or resize them alike)"
        )

    with pytest.warns(UserWarning) as record:
        for name in ("a.png", "b.png"):
            body = client.post("/predict", files={"image": (name, png_bytes(wide), "image/png")}).json()
            assert body["warnings"] == [expected(name)]
        assert client.post("/predict", files={"image": ("same.png", png_bytes(same), "image/png")}).json()["warnings"] == []
        files = [("images", ("same.png", png_bytes(same))), ("images", ("c.png", png_bytes(wide)))]
        results = client.post("/predict/batch", files=files).json()["results"]
    assert [result["warnings"] for result in results] == [[], [expected("c.png")]]
    scale_lines = [str(warning.message) for warning in record if "apparent size" in str(warning.message)]
    assert scale_lines == [f"{expected('a.png')}. Said once, for the first such image"]


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB float image in [0, 1] as 8-bit PNG bytes, an upload's."""
    ok, buffer = cv2.imencode(".png", np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)[..., ::-1])
    assert ok
    return buffer.tobytes()
