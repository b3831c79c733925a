"""The HTTP service through FastAPI's TestClient (no network): health, predict, maps, errors, limits."""

from __future__ import annotations

import base64
import io
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
from conftest import textured_image, with_spot
from fastapi.testclient import TestClient

import hrad
from hrad.config import load_config
from hrad.data.images import read_image
from hrad.errors import ArtifactError
from hrad.model import AnomalyModel
from hrad.postprocess.regions import defect_regions
from hrad.service import create_app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    config = load_config(
        None,
        {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "test-gaussian"}, "strategy": {"name": "tiled", "tile": 64, "stride": 48}},
    )
    model = AnomalyModel(config).fit([textured_image(rng, 96, 128) for _ in range(6)])
    return model.save(tmp_path_factory.mktemp("service") / "model")


@pytest.fixture(scope="module")
def client(model_dir: Path) -> TestClient:
    return TestClient(create_app(model_dir))


def png_bytes(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", (np.clip(image, 0, 1) * 255).round().astype(np.uint8)[..., ::-1])
    assert ok
    return buffer.tobytes()


@pytest.fixture(scope="module")
def spot_png() -> bytes:
    image, _ = with_spot(textured_image(np.random.default_rng(9), 96, 128), 40, 60, 10)
    return png_bytes(image)


def test_health_reports_model_and_versions(client: TestClient, model_dir: Path) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["hrad_version"] == hrad.__version__
    assert body["backbone"] == "tiny-cnn" and body["detector"] == "test-gaussian" and body["strategy"] == "tiled"
    assert body["fitted_size"] == [96, 128] and body["thresholds"]["image"] > 0
    assert "config" not in body and "model" not in body and str(model_dir) not in str(body)  # no paths unless asked
    detailed = TestClient(create_app(model_dir, health_details=True)).get("/health").json()
    assert detailed["backbone_weights"] == "seeded random initialisation" and detailed["model"] == str(model_dir)
    assert detailed["config"]["strategy"]["tile"] == 64


def test_predict_matches_the_python_api(client: TestClient, model_dir: Path, spot_png: bytes, tmp_path: Path) -> None:
    response = client.post("/predict", files={"image": ("part.png", spot_png, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    (tmp_path / "part.png").write_bytes(spot_png)
    expected = hrad.load(model_dir).predict(read_image(tmp_path / "part.png"))
    assert body["score"] == pytest.approx(expected.score, rel=1e-6)
    assert body["is_anomalous"] is expected.is_anomalous is True
    assert body["image_threshold"] == pytest.approx(expected.image_threshold)
    assert body["pixel_threshold"] == pytest.approx(expected.pixel_threshold)
    assert (body["width"], body["height"]) == (128, 96) and body["seconds"] > 0 and "map" not in body
    expected_regions = defect_regions(expected.anomaly_map, expected.pixel_threshold)
    assert body["region_count"] == len(expected_regions) >= 1  # the spot
    first, reference = body["regions"][0], expected_regions[0]
    assert (first["x"], first["y"], first["width"], first["height"], first["area"]) == (
        reference.x, reference.y, reference.width, reference.height, reference.area
    )


def test_predict_returns_png16_map_and_overlay(client: TestClient, model_dir: Path, spot_png: bytes, tmp_path: Path) -> None:
    body = client.post("/predict?map=png16", files={"image": ("part.png", spot_png)}).json()
    data = base64.b64decode(body["map"]["base64"])
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint16 and decoded.shape == (96, 128)
    (tmp_path / "part.png").write_bytes(spot_png)
    expected = hrad.load(model_dir).predict(tmp_path / "part.png").anomaly_map
    low, high = body["map"]["vmin"], body["map"]["vmax"]
    restored = low + decoded / 65535.0 * (high - low)
    clipped = np.clip(expected, low, high)
    assert np.abs(restored - clipped).max() <= (high - low) / 65535.0
    overlay = client.post("/predict?map=overlay", files={"image": ("part.png", spot_png)}).json()["map"]
    picture = cv2.imdecode(np.frombuffer(base64.b64decode(overlay["base64"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert picture.shape == (96, 128, 3) and picture.dtype == np.uint8


def test_predict_reads_16bit_tiff_without_a_suffix(client: TestClient, model_dir: Path, tmp_path: Path) -> None:
    image = textured_image(np.random.default_rng(4), 96, 128)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (image * 65535).round().astype(np.uint16))
    body = client.post("/predict", files={"image": ("blob", buffer.getvalue())}).json()
    (tmp_path / "part.tiff").write_bytes(buffer.getvalue())
    assert body["score"] == pytest.approx(hrad.load(model_dir).predict(tmp_path / "part.tiff").score, rel=1e-6)


def test_non_images_get_one_line_400(client: TestClient) -> None:
    response = client.post("/predict", files={"image": ("notes.txt", b"this is not an image\n", "text/plain")})
    assert response.status_code == 400
    message = response.json()["error"]
    assert message.startswith("notes.txt: not a readable image") and "\n" not in message and "/tmp" not in message
    empty = client.post("/predict", files={"image": ("empty.png", b"")})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]


def test_an_image_the_model_refuses_is_named_by_its_upload(client: TestClient) -> None:
    tiny = png_bytes(np.full((8, 8, 3), 0.5, dtype=np.float32))  # far under the fitted 128x96
    response = client.post("/predict", files={"image": ("tiny.png", tiny)})
    assert response.status_code == 400
    assert response.json()["error"].startswith("tiny.png: image is 8x8, its short side is under")
    batch = client.post("/predict/batch", files=[("images", ("tiny.png", tiny))]).json()["results"][0]
    assert batch["status"] == 400 and batch["error"].startswith("tiny.png: image is 8x8")


def test_bad_requests_get_one_line_errors(client: TestClient, spot_png: bytes) -> None:
    missing = client.post("/predict", data={"other": "x"})
    assert missing.status_code == 422 and "image" in missing.json()["error"]
    wrong_map = client.post("/predict?map=jpeg", files={"image": ("part.png", spot_png)})
    assert wrong_map.status_code == 422 and "map" in wrong_map.json()["error"]


def test_upload_size_is_bounded(model_dir: Path, spot_png: bytes) -> None:
    small = TestClient(create_app(model_dir, max_upload_bytes=len(spot_png) + 1024))
    assert small.post("/predict", files={"image": ("part.png", spot_png)}).status_code == 200
    big = spot_png + b"\0" * 4096
    response = small.post("/predict", files={"image": ("part.png", big)})
    assert response.status_code == 413 and "limit" in response.json()["error"]

    def chunks():  # no Content-Length: the body is streamed
        yield b"x" * 4096
        yield b"x" * (len(spot_png) + 4096)

    streamed = small.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413


def test_requests_are_served_one_at_a_time(model_dir: Path, spot_png: bytes) -> None:
    app = create_app(model_dir)
    model = app.state.model
    original = model.predict
    active, peak = 0, 0
    guard = threading.Lock()

    def slow_predict(image: np.ndarray, **options: Any) -> hrad.model.Prediction:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        try:
            return original(image, **options)
        finally:
            with guard:
                active -= 1

    model.predict = slow_predict
    client = TestClient(app)
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(client.post("/predict", files={"image": ("p.png", spot_png)}).status_code))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 4 and peak == 1


def test_cli_serve_runs_uvicorn_on_the_app(model_dir: Path, spot_png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from hrad.cli.main import main
    from hrad.cli.serving import StoppingServer

    configs: list[Any] = []

    def run(server: StoppingServer, sockets: object = None) -> None:
        configs.append(server.config)
        server.started = True

    monkeypatch.setattr(StoppingServer, "run", run)
    monkeypatch.setattr(sys, "argv", ["hrad", "serve", "--model", str(model_dir), "--port", "8123", "--max-upload-mb", "1"])
    main()
    (config,) = configs
    assert config.host == "127.0.0.1" and config.port == 8123
    client = TestClient(config.app)
    assert client.post("/predict", files={"image": ("p.png", spot_png)}).status_code == 200
    assert client.post("/predict", files={"image": ("p.png", b"0" * 2**20)}).status_code == 413


def test_missing_model_fails_at_creation(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="model not found"):
        create_app(tmp_path / "nothing")


def test_every_error_has_one_json_shape(model_dir: Path, spot_png: bytes) -> None:
    client = TestClient(create_app(model_dir), raise_server_exceptions=False)
    responses = {
        404: client.get("/nope"),
        405: client.get("/predict"),
        422: client.post("/predict", data={"other": "x"}),
        400: client.post("/predict", files={"image": ("x.png", b"junk")}),
    }
    model = client.app.state.model  # type: ignore[attr-defined]
    model.predict = lambda image, **options: (_ for _ in ()).throw(RuntimeError("boom /secret/path"))
    responses[500] = client.post("/predict", files={"image": ("p.png", spot_png)})
    for status, response in responses.items():
        assert response.status_code == status
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and "\n" not in body["error"], body
    assert "/secret/path" not in responses[500].json()["error"]


def test_images_over_the_pixel_budget_get_413_before_decoding(model_dir: Path, spot_png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    client = TestClient(create_app(model_dir, max_pixels=96 * 128 - 1))
    decoded: list[int] = []
    monkeypatch.setattr(cv2, "imdecode", lambda *args: decoded.append(1))
    response = client.post("/predict", files={"image": ("part.png", spot_png)})
    assert response.status_code == 413 and response.json()["error"].startswith("part.png: image is 128x96")
    assert decoded == [] and client.get("/health").json()["max_pixels"] == 96 * 128 - 1


def test_requests_past_the_timeout_get_504_and_the_service_goes_on(model_dir: Path, spot_png: bytes) -> None:
    app = create_app(model_dir, request_timeout=0.3)
    model = app.state.model
    original = model.predict
    release = threading.Event()

    def stuck(image: np.ndarray, **options: Any) -> hrad.model.Prediction:
        release.wait(10)
        return original(image, **options)

    model.predict = stuck
    client = TestClient(app)
    response = client.post("/predict", files={"image": ("p.png", spot_png)})
    assert response.status_code == 504 and "0.3 s request timeout" in response.json()["error"]
    model.predict = original
    release.set()  # the abandoned prediction finishes and frees the model
    assert client.post("/predict", files={"image": ("p.png", spot_png)}).status_code == 200
