"""``hrad calibrate`` / ``AnomalyModel.calibrate``: a fitted model's thresholds, border profile and
strategy calibration again from new good images, without training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image

from hrad.artifact import MANIFEST
from hrad.config import load_config
from hrad.data.images import ImageList
from hrad.errors import ArtifactError, InputError
from hrad.model import AnomalyModel, load

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(strategy: dict[str, object]) -> object:
    return load_config(None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "test-gaussian"}, "strategy": strategy})


def _drifted(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Good parts under a new lamp: the same texture, brighter and with more contrast."""
    return [np.clip(0.15 + 1.2 * textured_image(rng, 64, 80), 0, 1).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("strategy", [{"name": "downsample", "image_size": 64}, {"name": "tiled-ensemble", "tile": 32}])
def test_calibrated_thresholds_are_mean_plus_k_std_of_the_new_images_as_predicted_after(strategy: dict[str, object]) -> None:
    rng = np.random.default_rng(0)
    model = AnomalyModel(_config(strategy)).fit([textured_image(rng, 64, 80) for _ in range(8)])  # type: ignore[arg-type]
    old = model.thresholds
    assert old is not None
    new = _drifted(rng, 6)
    flagged_before = sum(bool(model.predict(image).is_anomalous) for image in new)
    returned = model.calibrate(new, sigmas=2.0)
    assert returned is old and model.thresholds is not None and model.thresholds is not old
    # the brute-force reference: the calibrated model's own predictions of the same images
    predictions = [model.predict(image) for image in new]
    scores = np.array([prediction.score for prediction in predictions])
    pixels = np.concatenate([prediction.anomaly_map.ravel() for prediction in predictions]).astype(np.float64)
    thresholds = model.thresholds
    assert thresholds.sigmas == 2.0 and model.config.threshold.sigmas == 2.0
    np.testing.assert_allclose(thresholds.image_scores, scores, rtol=1e-6)
    np.testing.assert_allclose(thresholds.image, scores.mean() + 2.0 * scores.std(), rtol=1e-6)
    np.testing.assert_allclose(thresholds.pixel, pixels.mean() + 2.0 * pixels.std(), rtol=1e-5)
    if strategy["name"] == "downsample":  # no strategy calibration: the old threshold's verdicts compare
        assert flagged_before == len(new)  # the drift flags every new good part under the old thresholds
    assert sum(bool(prediction.is_anomalous) for prediction in predictions) <= 1  # mean + 2 std of six


def test_calibrate_refuses_nothing_and_names_an_image_of_another_size() -> None:
    rng = np.random.default_rng(1)
    model = AnomalyModel(_config({"name": "tiled-ensemble", "tile": 32})).fit([textured_image(rng, 64, 80) for _ in range(6)])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no good images to calibrate on"):
        model.calibrate([])
    with pytest.raises(InputError, match=r"^good image 1: image 96x64 differs from the fitted size 80x64"):
        model.calibrate([textured_image(rng, 64, 80), textured_image(rng, 64, 96)])


def test_hrad_calibrate_writes_the_recalibrated_model_and_says_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(2)
    for index in range(8):
        write(tmp_path / "good" / f"{index}.png", textured_image(rng, 64, 80))
    for index, image in enumerate(_drifted(rng, 4)):
        write(tmp_path / "new" / f"{index}.png", image)
    model = tmp_path / "model"
    fit = ["fit", "--data", str(tmp_path / "good"), "--out", str(model), "--backbone", "tiny-cnn", "--detector", "test-gaussian",
           "--strategy", "downsample", "--image-size", "64"]
    assert run(fit, monkeypatch) == 0
    before = (model / MANIFEST).read_bytes()
    capsys.readouterr()

    calibrated = tmp_path / "calibrated"
    assert run(["calibrate", "--model", str(model), "--out", str(calibrated), str(tmp_path / "new")], monkeypatch) == 0
    err = capsys.readouterr().err
    assert "hrad: warning: 4 good images give rough thresholds" in err
    assert "thresholds from good images: 4/4" in err and "held-out normal images:" not in err  # the progress says which
    assert "thresholds from 4 good images at 3 sigmas: image " in err and "from 2 held-out images)" in err
    assert "4 of the 4 good images scored above the old image threshold" in err
    assert f"model written to {calibrated}" in err
    # one image: counted as one ('1 good images give ... of 1 scores' once)
    one = tmp_path / "one"
    write(one / "0.png", _drifted(rng, 1)[0])
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "c1"), str(one)], monkeypatch) == 0
    err = capsys.readouterr().err
    assert "hrad: warning: 1 good image gives rough thresholds (a mean and std of 1 score); give 10 or more" in err
    assert "thresholds from 1 good image at 3 sigmas" in err and "of the 1 good image scored above" in err
    # a broken file is found from the headers before the model loads, as fit finds it, not after the others were read
    (one / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "c2"), str(one)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hrad: error: {one / '1.png'}: ") and "calibrating" not in err and len(err.splitlines()) == 1
    assert (model / MANIFEST).read_bytes() == before  # the original stays as it was
    reloaded = load(calibrated)
    assert reloaded.thresholds is not None and len(reloaded.thresholds.image_scores) == 4
    assert sum(bool(reloaded.predict(path).is_anomalous) for path in ImageList(sorted((tmp_path / "new").iterdir()))) <= 1
    # the training stays: the weights file is the same
    manifest, new_manifest = json.loads(before), json.loads((calibrated / MANIFEST).read_text())
    assert manifest["weights"]["sha256"] == new_manifest["weights"]["sha256"]
    assert manifest["training_history"] == new_manifest["training_history"]

    # hrad info says where the thresholds come from
    assert run(["info", str(calibrated), "--json"], monkeypatch) == 0
    facts = json.loads(capsys.readouterr().out)["thresholds"]
    assert facts["calibrated"] is True and facts["held_out_images"] == 4
    assert run(["info", str(calibrated)], monkeypatch) == 0
    assert "(mean + 3 std of 4 good images given to hrad calibrate)" in capsys.readouterr().out
    assert run(["info", str(model)], monkeypatch) == 0
    assert "(mean + 3 std of 2 held-out normal images)" in capsys.readouterr().out

    # in place, at another k: the same path is replaced (atomically), the threshold moves down
    assert run(["calibrate", "--model", str(calibrated), "--out", str(calibrated), "--sigmas", "1", str(tmp_path / "new")], monkeypatch) == 0
    assert load(calibrated).thresholds.image < reloaded.thresholds.image  # type: ignore[union-attr]
    assert "(was " in (err := capsys.readouterr().err) and "from 4 good images given to hrad calibrate)" in err
    capsys.readouterr()

    # user mistakes: one line, status 2, nothing written
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "x"), str(tmp_path / "missing")], monkeypatch) == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "x").exists()
    exported = tmp_path / "m.onnx"
    exported.write_bytes(b"")
    assert run(["calibrate", "--model", str(exported), "--out", str(tmp_path / "x"), str(tmp_path / "new")], monkeypatch) == 2
    assert "an exported model cannot be calibrated; calibrate the model directory" in capsys.readouterr().err
    (tmp_path / "taken").write_text("mine")
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "taken"), str(tmp_path / "new")], monkeypatch) == 2
    assert "exists and is not an hrad model" in capsys.readouterr().err
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "x"), "--sigmas", "nan", str(tmp_path / "new")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "sigmas must be a finite number" in err and "calibrating" not in err and not (tmp_path / "x").exists()  # before loading


def _eight_bit(images: list[np.ndarray]) -> list[np.ndarray]:
    return [np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8) for image in images]


def test_calibrating_on_good_images_of_another_pixel_type_than_the_training_ones_is_told(tmp_path: Path) -> None:
    """12-bit files for a model fitted on 8-bit ones: the thresholds would come from images read
    unlike the training images. One line (the fit's validation wording), naming the first; also
    after a save and load (the model records its training images' type); images of the training
    type say nothing."""
    rng = np.random.default_rng(4)
    model = AnomalyModel(_config({"name": "downsample", "image_size": 64})).fit(_eight_bit([textured_image(rng, 64, 80) for _ in range(6)]))  # type: ignore[arg-type]
    assert model.pixel_type == "8-bit"
    good = [textured_image(rng, 64, 80) for _ in range(3)]
    twelve = [np.rint(good[0] * 4095).astype(np.uint16), *_eight_bit(good[1:2]), np.rint(good[2] * 4095).astype(np.uint16)]
    expected = (
        "good image 0: a 16-bit good image among 8-bit training ones (2 of 3 good images are not 8-bit, this the first; "
        "the model's training images are 8-bit): the model reads 16-bit ones as stored (0..65535), 8-bit ones as "
        "0..255; the thresholds come from images read unlike the training ones; another camera, or converted files? "
        "Calibrate on 8-bit images, as the training ones"
    )
    with pytest.warns(UserWarning) as record:
        model.calibrate(twelve)
    assert [str(warning.message) for warning in record] == [expected]
    model.save(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert loaded.pixel_type == "8-bit"
    with pytest.warns(UserWarning) as record:
        loaded.calibrate(twelve)
    assert [str(warning.message) for warning in record] == [expected]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.calibrate(_eight_bit(good))


def test_a_model_saved_before_it_kept_its_pixel_type_calibrates_without_a_word_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    AnomalyModel(_config({"name": "downsample", "image_size": 64})).fit(_eight_bit([textured_image(rng, 64, 80) for _ in range(6)])).save(tmp_path / "m")  # type: ignore[arg-type]
    manifest_path = tmp_path / "m" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["pixel_type"] == "8-bit"
    del manifest["pixel_type"]
    manifest_path.write_text(json.dumps(manifest))
    assert load(tmp_path / "m").pixel_type is None  # unknown: 8-bit, float or 16-bit as stored
    manifest["bit_depth"] = 12
    manifest_path.write_text(json.dumps(manifest))
    assert load(tmp_path / "m").pixel_type == "16-bit"  # only 16-bit training images give a depth
    manifest["pixel_type"] = "24-bit"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest: pixel_type '24-bit' is not 8-bit, 16-bit or float; the file is corrupt$"):
        load(tmp_path / "m")


def test_hrad_calibrate_tells_sixteen_bit_files_for_a_model_fitted_on_eight_bit_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(6)
    for index in range(8):
        write(tmp_path / "good" / f"{index}.png", textured_image(rng, 64, 80))
    new = tmp_path / "new"
    new.mkdir()
    for index in range(3):
        cv2.imwrite(str(new / f"{index}.png"), np.rint(textured_image(rng, 64, 80) * 65535).astype(np.uint16))
    model = tmp_path / "model"
    fit = ["fit", "--data", str(tmp_path / "good"), "--out", str(model), "--backbone", "tiny-cnn", "--detector", "test-gaussian",
           "--strategy", "downsample", "--image-size", "64"]
    assert run(fit, monkeypatch) == 0
    capfd.readouterr()
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "calibrated"), str(new)], monkeypatch) == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hrad: warning:") and "good image among" in line]
    assert lines == [
        f"hrad: warning: {new / '0.png'}: a 16-bit good image among 8-bit training ones (3 of 3 good images are not "
        "8-bit, this the first; the model's training images are 8-bit): the model reads 16-bit ones as stored "
        "(0..65535), 8-bit ones as 0..255; the thresholds come from images read unlike the training ones; another "
        "camera, or converted files? Calibrate on 8-bit images, as the training ones"
    ]


def test_hrad_calibrate_tells_gray_and_rescaled_good_images_once_each_naming_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The line drifted, and the new good images came from another camera: gray files, or larger
    ones the downsample strategy resizes by another factor. The thresholds would be learned on
    input unlike the training images': one line for each, naming the first such file; the model
    keeps its training images' kind (gray) through a save, and one saved before it kept it says
    nothing of gray but still of scale."""
    rng = np.random.default_rng(7)
    for index in range(8):
        write(tmp_path / "good" / f"{index}.png", textured_image(rng, 64, 80))
    new = tmp_path / "new"
    write(new / "0_same.png", textured_image(rng, 64, 80))
    cv2.imwrite(str(new / "1_gray.png"), np.rint(textured_image(rng, 64, 80)[..., 0] * 255).astype(np.uint8))
    cv2.imwrite(str(new / "2_gray.png"), np.rint(textured_image(rng, 64, 80)[..., 0] * 255).astype(np.uint8))
    write(new / "3_large.png", textured_image(rng, 128, 160))
    model = tmp_path / "model"
    fit = ["fit", "--data", str(tmp_path / "good"), "--out", str(model), "--backbone", "tiny-cnn", "--detector", "test-gaussian",
           "--strategy", "downsample", "--image-size", "64"]
    assert run(fit, monkeypatch) == 0
    assert json.loads((model / MANIFEST).read_text())["gray"] is False
    capfd.readouterr()
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "calibrated"), str(new)], monkeypatch) == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hrad: warning:") and "rough" not in line]
    gray = (
        f"hrad: warning: {new / '1_gray.png'}: a gray good image, the model's training images are colour (2 of 4 good "
        "images are not colour, this the first): the model reads a gray image as colour, its one channel in all three, so "
        "the thresholds come from images the backbone sees unlike the training ones; another camera, or converted files? "
        "Calibrate on colour images, as the training ones"
    )
    scale = (
        f"hrad: warning: {new / '3_large.png'}: a 160x128 image, the model was fitted on 80x64 ones: the downsample "
        "strategy resizes every image to its working size, this one by x0.4 across, x0.5 down, the training images by x0.8 "
        "across, x1 down: its defects "
        "reach the detector at another apparent size than the training parts did, and thresholds learned from its scores "
        "may not fit the training-size images; calibrate on images of the training size (crop or resize them alike). "
        "Said once, for the first such image"
    )
    assert lines == [gray, scale]
    assert json.loads((tmp_path / "calibrated" / MANIFEST).read_text())["gray"] is False
    manifest = json.loads((model / MANIFEST).read_text())
    del manifest["gray"]  # saved before hrad kept it
    (model / MANIFEST).write_text(json.dumps(manifest))
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "older"), str(new)], monkeypatch) == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hrad: warning:") and "rough" not in line]
    assert lines == [scale]
    assert json.loads((tmp_path / "older" / MANIFEST).read_text())["gray"] is None
    manifest["gray"] = "yes"
    (model / MANIFEST).write_text(json.dumps(manifest))
    assert run(["calibrate", "--model", str(model), "--out", str(tmp_path / "bad"), str(new)], monkeypatch) == 2
    assert capfd.readouterr().err.strip().endswith("manifest: gray 'yes' is not true or false; the file is corrupt")


def test_a_failed_hrad_calibrate_leaves_no_folder_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a failed fit: --out's parents made to check it go again when the run fails."""
    good = tmp_path / "good"
    good.mkdir()
    cv2.imwrite(str(good / "a.png"), (textured_image(np.random.default_rng(1), 32, 32) * 255).astype(np.uint8))
    out = tmp_path / "a" / "b" / "model"
    assert run(["calibrate", "--model", str(tmp_path / "no_model"), str(good), "--out", str(out)], monkeypatch) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["good"]
