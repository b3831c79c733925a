"""``hrad info`` on damaged and older models: one line naming the file, exit 2, never a crash;
fields an older model lacks read as not recorded, not as Python's None. And the help pages of
the commands these features grew (fit --roi, predict --no-regions, info) read whole at 80 columns."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import run as run_cli
from export_helpers import make_model, training_images

import hrad
from hrad.artifact import MANIFEST
from hrad.errors import ArtifactError
from hrad.export import export_onnx, open_predictor


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small artifact (16-bit, 12 significant bits) and its ONNX export, made once."""
    folder = tmp_path_factory.mktemp("info")
    images = [np.rint(image * 4095).astype(np.uint16) for image in training_images(3, 6, 64, 96)]
    model = make_model({"name": "tiled", "tile": 48, "stride": 48}, {"name": "patchcore", "coreset_ratio": 0.25}).fit(images)
    model.save(folder / "model")
    export_onnx(model, folder / "model.onnx")
    return folder


def edited(source: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """``source`` (a JSON file) copied to ``target`` after ``change`` edited its content."""
    content = json.loads(source.read_text())
    change(content)
    target.write_text(json.dumps(content))


def info(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    status = run_cli(["info", str(path)], monkeypatch)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def copy_model(saved: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    target = tmp_path / "model"
    shutil.copytree(saved / "model", target)
    edited(saved / "model" / MANIFEST, target / MANIFEST, change)
    return target


def copy_export(saved: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copy(saved / "model.onnx", tmp_path / "model.onnx")
    edited(saved / "model.json", tmp_path / "model.json", change)
    return tmp_path / "model.onnx"


def test_a_bit_depth_loading_refuses_is_refused_by_info_too(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = copy_model(saved, tmp_path, lambda manifest: manifest.update(bit_depth=7))
    status, out, err = info(model, monkeypatch, capsys)
    assert status == 2 and out == ""
    assert err.strip() == f"hrad: error: {model / MANIFEST}: bit_depth 7 is not a number of bits from 9 to 16; the file is corrupt"
    export = copy_export(saved, tmp_path, lambda sidecar: sidecar.update(bit_depth="12"))
    status, _, err = info(export, monkeypatch, capsys)
    assert status == 2 and "model.json: bit_depth '12' is not a number of bits" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda sidecar: sidecar.update(thresholds={"image": 1.0}),
        lambda sidecar: sidecar.update(model=3),
        lambda sidecar: sidecar["model"].update(fitted_size=[5]),
    ],
)
def test_a_damaged_sidecar_is_one_line(
    change: Callable[[dict[str, Any]], None], saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = info(copy_export(saved, tmp_path, change), monkeypatch, capsys)
    assert status == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"hrad: error: {tmp_path / 'model.json'}: corrupt ONNX sidecar ("), err


def test_a_damaged_training_history_is_one_line_for_info_and_load(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = copy_model(saved, tmp_path, lambda manifest: manifest.update(training_history={"segmentation": "x"}))
    expected = f"{model / MANIFEST}: corrupt model manifest (training_history must be null or an object of lists of numbers)"
    status, _, err = info(model, monkeypatch, capsys)
    assert status == 2 and err.strip() == f"hrad: error: {expected}"
    with pytest.raises(ArtifactError, match=r"training_history must be"):
        hrad.load(model)


def test_fields_an_older_model_lacks_read_as_not_recorded(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def older(manifest: dict[str, Any]) -> None:
        for key in ("backbone_weights", "fitted_size", "bit_depth", "roi"):
            manifest.pop(key)
        manifest["training_history"] = {"segmentation": []}

    status, out, _ = info(copy_model(saved, tmp_path, older), monkeypatch, capsys)
    assert status == 0 and "None" not in out and "training" not in out
    assert "backbone_weights: not recorded (saved before hrad kept it)\n" in out
    assert "fitted_size: not recorded (saved before hrad kept it)\n" in out
    assert "bit_depth: 16-bit images as stored\n" in out
    status, out, _ = info(saved / "model", monkeypatch, capsys)
    assert status == 0 and "bit_depth: 12 (16-bit images scaled to the full range)\n" in out and "fitted_size: 96x64\n" in out


@pytest.mark.parametrize("kind", ["8-bit", "float"])
def test_a_model_fitted_on_8_bit_or_float_images_learned_no_bit_depth_and_says_so(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its bit_depth line said "16-bit images as stored", as if it had been fitted on 16-bit ones."""
    images = training_images(3, 6, 64, 96)
    images = [np.rint(image * 255).astype(np.uint8) for image in images] if kind == "8-bit" else images
    model = make_model({"name": "tiled", "tile": 48, "stride": 48}, {"name": "patchcore", "coreset_ratio": 0.25}).fit(images)
    model.save(tmp_path / "model")
    status, out, _ = info(tmp_path / "model", monkeypatch, capsys)
    assert status == 0 and "as stored\n" not in out
    assert f"bit_depth: none learned (fitted on {kind} images; a 16-bit image would be read as stored, 0..65535)\n" in out
    assert f"pixel_type: {kind} colour, as the images" in out


def test_a_model_path_that_is_a_link_loop_or_a_dangling_link_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """'model not found' of a link that is there, where an image's link says what is wrong with it."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "gone").symlink_to("nowhere")
    status, out, err = info(tmp_path / "a", monkeypatch, capsys)
    assert status == 2 and out == "" and err.strip() == f"hrad: error: {tmp_path / 'a'}: symbolic link loop (it points to b, which leads back to it)"
    status, _, err = info(tmp_path / "gone", monkeypatch, capsys)
    assert status == 2 and err.strip() == f"hrad: error: {tmp_path / 'gone'}: broken symbolic link (its target nowhere does not exist)"
    with pytest.raises(ArtifactError, match="symbolic link loop"):
        hrad.load(tmp_path / "a")


def test_the_manifest_given_for_the_model_is_named_as_a_file(
    saved: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """'model/hrad.json: not an hrad model (no hrad.json)' contradicted itself."""
    status, out, err = info(saved / "model" / MANIFEST, monkeypatch, capsys)
    assert status == 2 and out == ""
    assert err.strip() == (
        f"hrad: error: {saved / 'model' / MANIFEST}: not an hrad model (a file; a model is the folder hrad fit writes, holding hrad.json)"
        f": give its folder, {saved / 'model'}"
    )


def test_what_was_given_for_a_model_folder_is_said_with_what_to_give(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export's sidecar, a folder of models or of an export, an export given to a command that
    takes the model folder: each read only 'not an hrad model', leaving the user to guess."""
    a_file = "not an hrad model (a file; a model is the folder hrad fit writes, holding hrad.json)"
    status, _, err = info(saved / "model.json", monkeypatch, capsys)
    assert status == 2 and err.strip() == f"hrad: error: {saved / 'model.json'}: {a_file}: the sidecar of the exported model model.onnx; give that"
    status, _, err = info(saved, monkeypatch, capsys)
    assert status == 2 and err.strip() == f"hrad: error: {saved}: not an hrad model (no hrad.json): it holds model folders (model); give one"
    exports = tmp_path / "exports"
    exports.mkdir()
    for name in ("model.onnx", "model.json"):
        shutil.copy(saved / name, exports / name)
    status, _, err = info(exports, monkeypatch, capsys)
    assert status == 2 and err.strip() == f"hrad: error: {exports}: not an hrad model (no hrad.json): it holds the exported model model.onnx; give that file"
    assert run_cli(["export", "--model", str(exports / "model.onnx"), "--out", str(tmp_path / "again.onnx")], monkeypatch) == 2
    assert capsys.readouterr().err.strip() == (
        f"hrad: error: {exports / 'model.onnx'}: {a_file}: an exported model (its sidecar model.json beside it); "
        "this command takes the model folder it was exported from"
    )


@pytest.mark.parametrize("served", ["model", "model.onnx"])
def test_health_and_info_json_agree_on_the_model(
    served: str, saved: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hrad serve's /health and hrad info --json read a model (and its ONNX export) through one
    function, so what both show of it is the same: versions, parts, size, depth, region, thresholds."""
    from fastapi.testclient import TestClient

    from hrad.service import create_app

    capsys.readouterr()
    assert run_cli(["info", "--json", str(saved / served)], monkeypatch) == 0
    facts = json.loads(capsys.readouterr().out)
    health = TestClient(create_app(saved / served)).get("/health").json()
    size, thresholds = facts["fitted_size"], facts["thresholds"]
    assert {
        "model_hrad_version": facts["saved_by"],
        "backbone": facts["backbone"],
        "detector": facts["detector"],
        "strategy": facts["strategy"],
        "fitted_size": [size["height"], size["width"]],
        "thresholds": {"image": thresholds["image"], "pixel": thresholds["pixel"]},
        "bit_depth": facts["bit_depth"],
        "region_of_interest": facts["region_of_interest"],
    } == {key: health[key] for key in ("model_hrad_version", "backbone", "detector", "strategy", "fitted_size", "thresholds", "bit_depth", "region_of_interest")}
    assert (health["bit_depth"], health["fitted_size"], health["backbone"]) == (12, [64, 96], "tiny-cnn")


EXPORT_KINDS = {
    "tiled": {"name": "tiled", "tile": 48, "stride": 48},
    "tiled-ensemble": {"name": "tiled-ensemble", "tile": 48},
    "mrf": {"name": "mrf", "pixel_budget": None, "scales": [0.5]},
    "hiad": {"name": "hiad", "patch_size": 32, "low_res_size": 48, "assignment": "a2o"},
}


@pytest.mark.parametrize("strategy", EXPORT_KINDS.values(), ids=EXPORT_KINDS.keys())
def test_every_export_kind_records_its_backbone_weights(
    strategy: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hrad info --json and /health (with details) of every kind of ONNX export say where the
    backbone's weights came from, as for the model itself; a tiled ensemble's export said 'not
    recorded (saved before hrad kept it)'."""
    from fastapi.testclient import TestClient

    from hrad.service import create_app

    model = make_model(strategy).fit(training_images(5, 3, 64, 96), training_images(9, 2, 64, 96))
    weights = model.extractor.weights_source
    export_onnx(model, tmp_path / "m.onnx")
    capsys.readouterr()
    assert run_cli(["info", "--json", str(tmp_path / "m.onnx")], monkeypatch) == 0
    facts = json.loads(capsys.readouterr().out)
    assert (facts["strategy"], facts["backbone"], facts["backbone_weights"]) == (strategy["name"], "tiny-cnn", weights)
    assert run_cli(["info", str(tmp_path / "m.onnx")], monkeypatch) == 0
    assert f"backbone_weights: {weights}" in capsys.readouterr().out.splitlines()
    health = TestClient(create_app(tmp_path / "m.onnx", health_details=True)).get("/health").json()
    assert health["backbone_weights"] == weights


def test_info_names_the_training_images_pixel_type(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = info(saved / "model", monkeypatch, capsys)
    said = "as the images it was fitted on (hrad calibrate warns of good images of another type or kind)"
    assert status == 0 and f"pixel_type: 16-bit colour, {said}" in out
    without_kind = copy_model(saved, tmp_path / "without_kind", lambda manifest: manifest.pop("gray"))  # saved before hrad kept it
    status, out, _ = info(without_kind, monkeypatch, capsys)
    assert status == 0 and f"pixel_type: 16-bit, {said}" in out
    older = copy_model(saved, tmp_path, lambda manifest: manifest.pop("pixel_type"))
    status, out, _ = info(older, monkeypatch, capsys)
    assert status == 0 and "pixel_type: not recorded (saved before hrad kept it)" in out


def test_info_on_an_export_names_the_training_images_pixel_type(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecar did not keep it: info on an export could not tell what the model was fitted on.
    An older sidecar without it still loads, predicts and says it does not know; one without the
    kind (gray or colour) leaves it unsaid."""
    status, out, _ = info(saved / "model.onnx", monkeypatch, capsys)
    assert status == 0 and "pixel_type: 16-bit colour, as the images it was fitted on\n" in out
    (tmp_path / "without_kind").mkdir()
    without_kind = copy_export(saved, tmp_path / "without_kind", lambda sidecar: sidecar.pop("gray"))
    status, out, _ = info(without_kind, monkeypatch, capsys)
    assert status == 0 and "pixel_type: 16-bit, as the images it was fitted on\n" in out
    older = copy_export(saved, tmp_path, lambda sidecar: sidecar.pop("pixel_type"))
    status, out, _ = info(older, monkeypatch, capsys)
    assert status == 0 and "pixel_type: not recorded (saved before hrad kept it)\n" in out
    image = np.rint(training_images(9, 1, 64, 96)[0] * 4095).astype(np.uint16)
    assert open_predictor(older).predict(image).score == pytest.approx(open_predictor(saved / "model.onnx").predict(image).score)
