"""The region of interest: exact map and score rules on small arrays, and a model that keeps it
(thresholds, predict, artifact, export, CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run as run_cli
from cli_helpers import write
from conftest import textured_image, with_spot
from export_helpers import make_model
from roi_helpers import DETECTOR, HEIGHT, TILED, WIDTH, left_half_mask, textured_images

import hrad
from hrad.artifact import MANIFEST
from hrad.errors import ArtifactError, InputError
from hrad.export import OnnxPredictor, export_onnx
from hrad.postprocess.regions import defect_regions
from hrad.postprocess.roi import RegionOfInterest, read_roi
from hrad.postprocess.smoothing import PostprocessConfig, image_score


def test_outside_takes_the_lowest_value_inside() -> None:
    anomaly_map = np.arange(20, dtype=np.float32).reshape(4, 5)
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True  # values 7, 8, 12, 13
    roi = RegionOfInterest(mask)
    out = roi.apply(anomaly_map)
    assert out is anomaly_map
    expected = np.full((4, 5), 7.0, np.float32)
    expected[1:3, 2:4] = [[7, 8], [12, 13]]
    np.testing.assert_array_equal(out, expected)


def test_the_mask_is_stretched_by_nearest_neighbour() -> None:
    roi = RegionOfInterest(np.array([[1, 0], [0, 1]], bool))
    np.testing.assert_array_equal(roi.at((4, 6)), np.kron(np.eye(2, dtype=int), np.ones((2, 3), int)).astype(bool))
    assert roi.at((2, 2)) is roi.mask


def test_the_score_is_taken_inside() -> None:
    anomaly_map = np.zeros((4, 4), np.float32)
    anomaly_map[0, 0] = 9.0  # outside
    anomaly_map[3, 3] = 2.0
    anomaly_map[2, 3] = 1.0
    mask = np.zeros((4, 4), bool)
    mask[2:, 2:] = True
    roi = RegionOfInterest(mask)
    assert image_score(anomaly_map, 9.0, PostprocessConfig(image_score="strategy"), roi) == 2.0
    assert image_score(anomaly_map, 9.0, PostprocessConfig(image_score="strategy")) == 9.0
    assert image_score(anomaly_map, 9.0, PostprocessConfig(image_score="top-fraction", top_fraction=0.5), roi) == 1.5


def test_stored_form_round_trips_and_damage_is_one_line() -> None:
    mask = np.random.default_rng(0).random((37, 53)) > 0.5
    stored = RegionOfInterest(mask).to_json()
    again = RegionOfInterest.from_json(json.loads(json.dumps(stored)), "m/hrad.json")
    assert again is not None
    np.testing.assert_array_equal(again.mask, mask)
    assert RegionOfInterest.from_json(None, "m/hrad.json") is None
    with pytest.raises(ArtifactError, match=r"^m/hrad.json: its region of interest is damaged \("):
        RegionOfInterest.from_json({**stored, "width": 54}, "m/hrad.json")
    with pytest.raises(ArtifactError, match="damaged"):
        RegionOfInterest.from_json({"png_base64": "not base64!"}, "m/hrad.json")


def test_an_empty_region_is_refused_naming_its_file(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "roi.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match=r"roi.png: the region of interest is empty"):
        read_roi(tmp_path / "roi.png")


def test_a_mask_with_transparency_is_refused_naming_its_file(tmp_path: Path) -> None:
    """Painted on a transparent layer, the region is in alpha, which hrad ignores: black paint read
    as empty, a white layer erased around the part read as all of it. Opaque RGBA is read by colour."""
    painted = np.zeros((8, 8, 4), np.uint8)
    painted[2:5, 2:5, 3] = 255  # black paint, opaque only there
    cv2.imwrite(str(tmp_path / "painted.png"), painted)
    with pytest.raises(InputError, match=r"^\S*painted.png: the region of interest has transparency \(an alpha channel\); hrad reads"):
        read_roi(tmp_path / "painted.png")
    opaque = np.zeros((8, 8, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[2:5, 2:5, :3] = 255
    cv2.imwrite(str(tmp_path / "opaque.png"), opaque)
    np.testing.assert_array_equal(read_roi(tmp_path / "opaque.png").mask, opaque[..., 0] > 0)


def test_a_mask_of_another_aspect_ratio_warns_at_fit(images: list[np.ndarray]) -> None:
    """Stretching a mask drawn at another scale is what --roi promises; one of another shape is
    distorted on the part, so the fit says so (a scaled copy does not)."""
    assert RegionOfInterest(np.ones((9, 13), bool)).stretch_problem((HEIGHT, WIDTH)) is None  # 13/9 is within 1% of 130/90
    square = np.zeros((50, 50), np.uint8)
    square[10:40, 10:40] = 255
    with pytest.warns(UserWarning, match=r"^roi array: the region of interest is 50x50 \(aspect 1\) but the training images are 130x90 \(aspect 1.44\)"):
        make_model(TILED, DETECTOR).fit(images[:3], roi=square)


images = pytest.fixture(scope="module", name="images")(textured_images)
roi_mask = pytest.fixture(scope="module", name="roi_mask")(left_half_mask)


def spot_at(x: int) -> np.ndarray:
    return with_spot(textured_image(np.random.default_rng(11), HEIGHT, WIDTH), 40, x, 12)[0]


def test_a_defect_outside_the_region_is_not_one(images: list[np.ndarray], roi_mask: np.ndarray, tmp_path: Path) -> None:
    """The same spot is found on the inspected half and ignored on the other; the model keeps
    the region through save and load, and its thresholds come from inside it."""
    model = make_model(TILED, DETECTOR).fit(images, roi=roi_mask)
    plain = make_model(TILED, DETECTOR).fit(images)
    outside, inside = spot_at(100), spot_at(25)
    assert plain.predict(outside).is_anomalous  # without the region, the spot is a defect
    ignored = model.predict(outside)
    assert not ignored.is_anomalous and defect_regions(ignored.anomaly_map, ignored.pixel_threshold) == []
    assert float(ignored.anomaly_map[:, WIDTH // 2 :].max()) == float(ignored.anomaly_map[:, : WIDTH // 2].min())
    found = model.predict(inside)
    assert found.is_anomalous
    [region] = defect_regions(found.anomaly_map, found.pixel_threshold)[:1]
    assert region.x < WIDTH // 2

    model.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / MANIFEST).read_text())["roi"]["width"] == WIDTH
    loaded = hrad.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict(inside).anomaly_map, found.anomaly_map)

    manifest = json.loads((tmp_path / "model" / MANIFEST).read_text())
    manifest["roi"]["png_base64"] = manifest["roi"]["png_base64"][:40]
    (tmp_path / "model" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="its region of interest is damaged"):
        hrad.load(tmp_path / "model")


def test_the_export_applies_the_region(
    images: list[np.ndarray], roi_mask: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model(TILED, DETECTOR).fit(images, roi=roi_mask)
    export_onnx(model, tmp_path / "model.onnx")
    capsys.readouterr()
    assert run_cli(["info", str(tmp_path / "model.onnx"), "--json"], monkeypatch) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == {"export": "onnx", "sidecar": "model.json"}  # values for scripts, not sentences
    assert shown["region_of_interest"] == {"width": 130, "height": 90, "inspected": 0.5}
    assert shown["fitted_size"] == {"width": 130, "height": 90} and shown["thresholds"]["pixel"] == model.thresholds.pixel  # type: ignore[union-attr]
    assert json.loads((tmp_path / "model.json").read_text())["roi"] == model.roi.to_json()  # type: ignore[union-attr]
    for image in (spot_at(100), spot_at(25)):
        expected = model.predict(image)
        got = OnnxPredictor(tmp_path / "model.onnx").predict(image)
        assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4 * float(np.abs(expected.anomaly_map).max())
        assert got.score == pytest.approx(expected.score, rel=1e-4) and got.is_anomalous == expected.is_anomalous


def test_cli_fit_keeps_the_region_and_predict_ignores_what_is_outside(
    images: list[np.ndarray], roi_mask: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for index, image in enumerate(images):
        write(tmp_path / "good" / f"{index}.png", image)
    cv2.imwrite(str(tmp_path / "roi.png"), roi_mask)
    status = run_cli(
        ["fit", "--data", str(tmp_path / "good"), "--out", str(tmp_path / "model"), "--backbone", "tiny-cnn",
         "--strategy", "tiled", "--tile", "48", "--stride", "32", "--set", "detector.coreset_ratio=0.25",
         "--device", "cpu", "--roi", str(tmp_path / "roi.png")],
        monkeypatch,
    )  # fmt: skip
    assert status == 0 and json.loads((tmp_path / "model" / MANIFEST).read_text())["roi"] is not None
    assert f"region of interest: {tmp_path / 'roi.png'}, 130x90 mask, 50.0% inspected (stretched to each image)\n" in capsys.readouterr().err
    assert run_cli(["info", str(tmp_path / "model")], monkeypatch) == 0
    shown = capsys.readouterr().out
    assert "region_of_interest: 130x90 mask, 50.0% inspected\n" in shown and "strategy: tiled\n" in shown
    assert "fitted_size: 130x90\n" in shown and "thresholds: image " in shown
    write(tmp_path / "parts" / "outside.png", spot_at(100))
    assert run_cli(["predict", "--model", str(tmp_path / "model"), str(tmp_path / "parts"), "--out", str(tmp_path / "out")], monkeypatch) == 0
    assert json.loads((tmp_path / "out" / "outside_regions.json").read_text())["count"] == 0
    assert run_cli(["fit", "--data", str(tmp_path / "good"), "--out", str(tmp_path / "m2"), "--roi", str(tmp_path / "nope.png")], monkeypatch) == 2


def test_the_report_says_a_region_was_applied(images: list[np.ndarray], roi_mask: np.ndarray, tmp_path: Path) -> None:
    """Metrics of a model with a region miss whatever ground truth lies outside it: the report says so."""
    from hrad.data.datasets import load_dataset
    from hrad.evaluation import evaluate

    root = tmp_path / "part"
    write(root / "train" / "good" / "000.png", images[0])
    write(root / "test" / "good" / "000.png", images[1])
    write(root / "test" / "spot" / "000.png", spot_at(25))
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[34:46, 19:31] = 255
    (root / "ground_truth" / "spot").mkdir(parents=True)
    cv2.imwrite(str(root / "ground_truth" / "spot" / "000_mask.png"), mask)
    model = make_model(TILED, DETECTOR).fit(images, roi=roi_mask)
    evaluate(model, load_dataset(root).test, tmp_path / "report")
    report = (tmp_path / "report" / "report.html").read_text()
    assert "A region of interest was applied (50.0% of each image inspected)" in report
    # metrics.md and metrics.json, what CI logs and scripts read, say it too
    assert "\nA region of interest was applied (50.0% of each image inspected)" in (tmp_path / "report" / "metrics.md").read_text()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["roi_inspected"] == 0.5 and metrics["bit_depth"] is None


def test_the_service_says_what_it_inspects(images: list[np.ndarray], roi_mask: np.ndarray, tmp_path: Path) -> None:
    """/health names the region of interest's share and the bit depth, for the model and its export."""
    from fastapi.testclient import TestClient

    from hrad.service import create_app

    model = make_model(TILED, DETECTOR).fit(images, roi=roi_mask)
    model.save(tmp_path / "model")
    export_onnx(model, tmp_path / "model.onnx")
    for served in (tmp_path / "model", tmp_path / "model.onnx"):
        body = TestClient(create_app(served)).get("/health").json()
        assert (body["region_of_interest"], body["bit_depth"]) == (0.5, None), served
