"""One output writer for predict, predict-distributed and the service: scales, masks, overlays, overrides."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run
from conftest import textured_image, with_spot

import hrad
from hrad.config import load_config
from hrad.errors import ConfigError
from hrad.model import AnomalyModel, Prediction, Thresholds
from hrad.outputs import (
    SCORES_COLUMNS,
    PredictionWriter,
    encode_map_png16,
    map_scale,
    overlay_scale,
    own_scale,
    read_map_png16,
)
from hrad.prediction import decision_thresholds


def test_scales_come_from_the_thresholds() -> None:
    thresholds = Thresholds(image=5.0, pixel=2.0, image_scores=[1.0, 2.0, 3.0], pixel_mean=1.0, pixel_std=1 / 3, sigmas=3.0)
    overlay = overlay_scale(thresholds)
    assert overlay is not None and (overlay.vmin, overlay.vmax) == (1.0, 3.0)  # threshold mid-scale
    stored = map_scale(thresholds)
    assert stored is not None and (stored.vmin, stored.vmax) == (-1.0, 9.0)
    old = Thresholds(image=5.0, pixel=2.0, image_scores=[])  # an artifact without pixel statistics
    assert (overlay_scale(old).vmin, overlay_scale(old).vmax) == (0.0, 4.0)  # type: ignore[union-attr]
    assert overlay_scale(None) is None and map_scale(None) is None
    np.testing.assert_allclose(overlay.unit(np.array([0.0, 1.0, 2.0, 3.0, 4.0])), [0, 0, 0.5, 1, 1])


def test_thresholds_at_other_sigmas() -> None:
    thresholds = Thresholds(image=0.0, pixel=0.0, image_scores=[1.0, 2.0, 3.0], pixel_mean=0.5, pixel_std=0.25)
    image, pixel = thresholds.at_sigmas(2.0)
    assert image == pytest.approx(2.0 + 2.0 * np.sqrt(2 / 3)) and pixel == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="refit it to change sigmas"):
        Thresholds(image=1.0, pixel=1.0, image_scores=[1.0]).at_sigmas(2.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": float("nan")}, "threshold must be a finite number"),
        ({"pixel_threshold": float("inf")}, "pixel threshold must be a finite number"),
        ({"sigmas": float("nan")}, "sigmas must be a finite number"),
    ],
)
def test_threshold_overrides_that_decide_nothing_are_refused(options: dict, message: str) -> None:
    thresholds = Thresholds(image=2.0, pixel=1.0, image_scores=[1.0, 2.0, 3.0], pixel_mean=0.5, pixel_std=0.25)
    with pytest.raises(ConfigError, match=message):
        decision_thresholds(thresholds, **options)
    assert decision_thresholds(thresholds, threshold=4.0, sigmas=0.0)[0] == 4.0


def test_png16_round_trip_keeps_values_within_one_step(rng: np.random.Generator) -> None:
    values = (rng.random((20, 30)) * 12 - 2).astype(np.float32)
    scale = own_scale(np.array([-1.0, 9.0]))
    restored = read_map_png16(encode_map_png16(values, scale))
    step = (scale.vmax - scale.vmin) / 65535
    np.testing.assert_allclose(restored, np.clip(values, -1, 9), atol=step / 2 + 1e-6)


def test_writer_files(tmp_path: Path, rng: np.random.Generator) -> None:
    thresholds = Thresholds(image=5.0, pixel=2.0, image_scores=[4.0], pixel_mean=1.0, pixel_std=1 / 3)
    writer = PredictionWriter(tmp_path, thresholds, map_format="png16", overlays=True, masks=True)
    anomaly_map = np.ones((16, 24), np.float32)
    anomaly_map[4:8, 5:10] = 6.0
    prediction = Prediction(anomaly_map, score=6.0, image_threshold=5.0, pixel_threshold=2.0)
    image = textured_image(rng, 16, 24)
    row = writer.write("a.png", "a", image, prediction)
    assert (row.path, row.score, row.is_anomalous, row.threshold, row.status) == ("a.png", 6.0, True, 5.0, "ok")
    mask = cv2.imread(str(tmp_path / "a_mask.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(mask, np.where(anomaly_map > 2.0, 255, 0))
    np.testing.assert_allclose(read_map_png16(tmp_path / "a_map.png"), anomaly_map, atol=10 / 65535)
    overlay = cv2.imread(str(tmp_path / "a_overlay.png"))[..., ::-1].astype(int)
    # JET on the fixed scale: normal pixels (at the normal mean) blue, the defect (above 2x the threshold) red
    assert overlay[0, 0, 2] > overlay[0, 0, 0] and overlay[6, 7, 0] > overlay[6, 7, 2]
    description = json.loads(writer.write_description().read_text())
    assert description["map_scale"]["vmin"] == -1.0 and description["scores_columns"] == list(SCORES_COLUMNS)
    # the defect is one region: its box, area and values; scores.csv counts it
    regions = json.loads((tmp_path / "a_regions.json").read_text())
    assert regions == {"pixel_threshold": 2.0, "count": 1,
                       "regions": [{"x": 5, "y": 4, "width": 5, "height": 4, "area": 20, "peak": 6.0, "mean": 6.0}]}
    assert row.regions == 1 and row.csv_row()[-1] == "1"
    quiet = PredictionWriter(tmp_path / "quiet", thresholds, regions=False).write("a.png", "a", image, prediction)
    assert quiet.regions is None and not (tmp_path / "quiet" / "a_regions.json").exists()
    undecided = Prediction(anomaly_map, score=6.0, image_threshold=None, pixel_threshold=None)
    assert writer.write("b.png", "b", image, undecided).regions is None and not (tmp_path / "b_regions.json").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    config = load_config(None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "test-gaussian"},
                                "strategy": {"name": "downsample", "image_size": 64}, "postprocess": {"sigma": 1}})
    model = AnomalyModel(config).fit([textured_image(rng, 64, 80) for _ in range(10)])
    return model.save(tmp_path_factory.mktemp("outputs") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(9)
    cv2.imwrite(str(folder / "normal.png"), (textured_image(rng, 64, 80) * 255).astype(np.uint8))
    spotted, _ = with_spot(textured_image(rng, 64, 80), 30, 40, 10)
    cv2.imwrite(str(folder / "spot.png"), (spotted * 255).astype(np.uint8))
    return folder


def read_scores(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == SCORES_COLUMNS
        return {Path(row["path"]).name: row for row in reader}


def test_predict_thresholds_can_be_overridden(model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = hrad.load(model_dir)
    assert model.thresholds is not None and model.thresholds.pixel_mean is not None
    out = tmp_path / "default"
    assert run(["predict", "--model", str(model_dir), str(images), "--out", str(out), "--device", "cpu"], monkeypatch) == 0
    rows = read_scores(out / "scores.csv")
    assert float(rows["spot.png"]["threshold"]) == pytest.approx(model.thresholds.image)
    assert rows["spot.png"]["is_anomalous"] == "true" and rows["normal.png"]["status"] == "ok"
    for name in ("normal_map.png", "spot_map.png", "spot_mask.png", "spot_overlay.png", "maps.json"):
        assert (out / name).is_file(), name

    high = tmp_path / "high"
    assert run(["predict", "--model", str(model_dir), str(images), "--out", str(high), "--threshold", "1e9", "--pixel-threshold", "1e9"], monkeypatch) == 0
    rows = read_scores(high / "scores.csv")
    assert {row["is_anomalous"] for row in rows.values()} == {"false"} and rows["spot.png"]["threshold"] == "1000000000.0"
    assert not cv2.imread(str(high / "spot_mask.png"), cv2.IMREAD_UNCHANGED).any()

    low = tmp_path / "low"
    assert run(["predict", "--model", str(model_dir), str(images), "--out", str(low), "--sigmas", "0"], monkeypatch) == 0
    image_threshold, pixel_threshold = model.thresholds.at_sigmas(0)
    rows = read_scores(low / "scores.csv")
    assert image_threshold < model.thresholds.image and float(rows["normal.png"]["threshold"]) == pytest.approx(image_threshold)
    for row in rows.values():
        assert row["is_anomalous"] == str(float(row["score"]) > image_threshold).lower()
    expected = model.predict(images / "spot.png").anomaly_map > pixel_threshold
    np.testing.assert_array_equal(cv2.imread(str(low / "spot_mask.png"), cv2.IMREAD_UNCHANGED) > 0, expected)
    # a negative k would put the thresholds below the good images' mean: refused in one line
    assert run(["predict", "--model", str(model_dir), str(images), "--out", str(tmp_path / "neg"), "--sigmas", "-1"], monkeypatch) == 2
    # the overlays keep the model's scale whatever the thresholds: same picture for the normal image
    np.testing.assert_array_equal(cv2.imread(str(out / "normal_map.png"), cv2.IMREAD_UNCHANGED),
                                  cv2.imread(str(low / "normal_map.png"), cv2.IMREAD_UNCHANGED))


def test_service_overrides_and_mask(model_dir: Path, images: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hrad.service import create_app

    client = TestClient(create_app(model_dir, device="cpu"))
    data = (images / "spot.png").read_bytes()
    body = client.post("/predict?threshold=1e9&map=mask&pixel_threshold=0.5", files={"image": ("spot.png", data)}).json()
    assert body["is_anomalous"] is False and body["image_threshold"] == 1e9 and body["pixel_threshold"] == 0.5
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["map"]["base64"]), np.uint8), cv2.IMREAD_UNCHANGED)
    expected = hrad.load(model_dir).predict(images / "spot.png").anomaly_map > 0.5
    np.testing.assert_array_equal(mask > 0, expected)
    png = client.post("/predict?map=png16", files={"image": ("spot.png", data)}).json()["map"]
    scale = map_scale(hrad.load(model_dir).thresholds)
    assert scale is not None and (png["vmin"], png["vmax"]) == (scale.vmin, scale.vmax)
    np.testing.assert_allclose(read_map_png16(base64.b64decode(png["base64"])),
                               np.clip(hrad.load(model_dir).predict(images / "spot.png").anomaly_map, scale.vmin, scale.vmax),
                               atol=(scale.vmax - scale.vmin) / 65535)
    sigmas = client.post("/predict?sigmas=0", files={"image": ("spot.png", data)}).json()
    assert sigmas["image_threshold"] == pytest.approx(float(np.mean(hrad.load(model_dir).thresholds.image_scores)))  # type: ignore[union-attr]
