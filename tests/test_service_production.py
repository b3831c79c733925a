"""Service conventions: typed OpenAPI, /ready vs /health, batch endpoint, Prometheus /metrics."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cli_helpers import free_port, hold_predictions, wait_ready
from conftest import textured_image, with_spot
from fastapi.testclient import TestClient

from hrad.config import load_config
from hrad.model import AnomalyModel
from hrad.service import RETRY_AFTER_CAP, ServiceTime, create_app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    config = load_config(
        None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "test-gaussian"}, "strategy": {"name": "tiled", "tile": 64}}
    )
    model = AnomalyModel(config).fit([textured_image(rng, 96, 128) for _ in range(4)])
    return model.save(tmp_path_factory.mktemp("service") / "model")


@pytest.fixture(scope="module")
def spot_png() -> bytes:
    image, _ = with_spot(textured_image(np.random.default_rng(9), 96, 128), 40, 60, 10)
    ok, buffer = cv2.imencode(".png", (image * 255).round().astype(np.uint8)[..., ::-1])
    assert ok
    return buffer.tobytes()


def test_openapi_schema_is_typed(model_dir: Path) -> None:
    schema = TestClient(create_app(model_dir)).get("/openapi.json").json()
    models = schema["components"]["schemas"]
    assert models["PredictResponse"]["properties"]["score"]["type"] == "number"
    assert models["MapPayload"]["properties"]["base64"]["type"] == "string"
    predict = schema["paths"]["/predict"]["post"]["responses"]
    assert predict["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictResponse")
    assert predict["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert schema["paths"]["/predict/batch"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/BatchResponse")
    assert schema["paths"]["/ready"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReadyResponse")


def test_ready_goes_503_while_the_queue_is_full_and_health_stays_200(model_dir: Path, spot_png: bytes) -> None:
    app = create_app(model_dir, max_queue=1)
    release = hold_predictions(app, 10)
    client = TestClient(app)
    assert client.get("/ready").json() == {"ready": True, "queued": 0, "max_queue": 1, "request_seconds": None, "retry_after": 1}
    statuses: list[int] = []
    worker = threading.Thread(target=lambda: statuses.append(client.post("/predict", files={"image": ("a.png", spot_png)}).status_code))
    worker.start()
    try:
        for _ in range(200):
            answer = client.get("/ready")
            if answer.status_code == 503:
                break
            time.sleep(0.02)
        assert answer.status_code == 503
        assert answer.json() == {"ready": False, "queued": 1, "max_queue": 1, "request_seconds": None, "retry_after": 1}
        assert client.get("/health").status_code == 200  # alive, only not ready
    finally:
        release.set()
        worker.join()
    assert statuses == [200] and client.get("/ready").status_code == 200


def test_retry_after_is_the_queue_depth_times_the_moving_average_of_service_time() -> None:
    """The estimator's arithmetic: 1 s before anything was measured, the first request taken as it
    is, then each new one weighted 0.3; the depth times that, rounded up, within 1 and the cap."""
    service = ServiceTime()
    assert service.seconds is None and service.retry_after(4) == 1
    service.observe(2.0)
    assert service.seconds == 2.0 and service.retry_after(3) == 6 and service.retry_after(0) == 1
    service.observe(4.0)
    assert service.seconds == pytest.approx(2.6)  # 2 + 0.3 x (4 - 2)
    assert service.retry_after(3) == 8  # 7.8 rounded up
    service.observe(0.0)
    assert service.seconds == pytest.approx(1.82)  # 2.6 + 0.3 x (0 - 2.6)
    assert service.retry_after(1) == 2 and service.retry_after(100) == RETRY_AFTER_CAP == 60
    service.observe(0.001)
    assert service.retry_after(0) == 1  # never below 1


def test_retry_after_grows_with_a_slow_model(model_dir: Path, spot_png: bytes) -> None:
    """A request refused because the queue is full was told to retry in 1 s however slow the model:
    a client that obeyed it hammered a queue that takes seconds to drain. Retry-After is now the
    queue's depth times the measured time a request holds the model (1 s before any was measured),
    and /ready shows both."""
    slow = 1.0  # seconds each prediction takes, at least
    app = create_app(model_dir, max_queue=2)
    model = app.state.model
    original = model.predict
    gate = threading.Event()

    def slow_predict(image: Any, **options: Any) -> object:
        gate.wait(30)
        time.sleep(slow)
        return original(image, **options)

    model.predict = slow_predict
    client = TestClient(app)

    def fill_the_queue() -> tuple[list[threading.Thread], list[int]]:
        """Two requests in flight, held by the closed gate; then a third is refused."""
        statuses: list[int] = []
        posts = [
            threading.Thread(target=lambda: statuses.append(client.post("/predict", files={"image": ("a.png", spot_png)}).status_code))
            for _ in range(2)
        ]
        for post in posts:
            post.start()
        for _ in range(500):
            if client.get("/ready").json()["queued"] == 2:
                break
            time.sleep(0.02)
        return posts, statuses

    def refused() -> tuple[int, dict[str, Any]]:
        answer = client.post("/predict", files={"image": ("c.png", spot_png)})
        assert answer.status_code == 503
        ready = client.get("/ready").json()
        assert ready["queued"] == 2 and ready["retry_after"] == int(answer.headers["retry-after"])
        assert answer.json()["error"].endswith(f"retry in {answer.headers['retry-after']} s")
        return int(answer.headers["retry-after"]), ready

    posts, statuses = fill_the_queue()
    try:
        first, ready = refused()
        assert (first, ready["request_seconds"]) == (1, None)  # nothing measured yet
    finally:
        gate.set()
        for post in posts:
            post.join()
    assert statuses == [200, 200]
    gate.clear()
    posts, statuses = fill_the_queue()
    try:
        second, ready = refused()
    finally:
        gate.set()
        for post in posts:
            post.join()
    assert statuses == [200, 200]
    measured = ready["request_seconds"]
    assert measured >= slow and second == math.ceil(2 * measured) >= 2 * slow > first


def test_batch_answers_every_image_on_its_own(model_dir: Path, spot_png: bytes) -> None:
    client = TestClient(create_app(model_dir, max_batch=3))
    files = [("images", ("a.png", spot_png)), ("images", ("junk.png", b"not an image")), ("images", ("b.png", spot_png))]
    answer = client.post("/predict/batch", files=files)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "junk.png", "b.png"]
    single = client.post("/predict", files={"image": ("a.png", spot_png)}).json()
    assert results[0]["score"] == pytest.approx(single["score"]) and results[2]["score"] == pytest.approx(single["score"])
    assert results[1]["status"] == 400 and "junk.png" in results[1]["error"] and "score" not in results[1]
    too_many = client.post("/predict/batch", files=[("images", (f"{i}.png", spot_png)) for i in range(4)])
    assert too_many.status_code == 413 and too_many.json() == {"error": "4 images in one batch; at most 3"}


def test_metrics_count_requests_and_latencies(model_dir: Path, spot_png: bytes) -> None:
    client = TestClient(create_app(model_dir))
    for _ in range(2):
        assert client.post("/predict", files={"image": ("a.png", spot_png)}).status_code == 200
    assert client.post("/predict", files={"image": ("x.png", b"junk")}).status_code == 400
    client.get("/no/such/route")
    text = client.get("/metrics").text
    assert 'hrad_requests_total{route="/predict",status="200"} 2.0' in text
    assert 'hrad_requests_total{route="/predict",status="400"} 1.0' in text
    assert 'hrad_requests_total{route="unmatched",status="404"} 1.0' in text
    assert 'hrad_request_seconds_count{route="/predict"} 3.0' in text
    assert "hrad_prediction_seconds_count 2.0" in text
    assert "hrad_queued_requests 0.0" in text


def test_two_worker_processes_serve_concurrent_requests(tmp_path: Path, spot_png: bytes) -> None:
    """hrad serve --workers 2 in a subprocess: two model processes behind one port, 8 concurrent requests."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    rng = np.random.default_rng(4)
    config = load_config(
        None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "patchcore"}, "strategy": {"name": "tiled", "tile": 64}}
    )
    model_path = AnomalyModel(config).fit([textured_image(rng, 96, 128) for _ in range(3)]).save(tmp_path / "model")
    port = free_port()
    command = [sys.executable, "-c", "from hrad.cli.main import main; main()", "serve", "--model", str(model_path),
               "--port", str(port), "--workers", "2", "--timeout", "60", "--max-queue", "8"]  # fmt: skip (8 at once may meet one worker)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        children = [
            int(entry) for entry in os.listdir("/proc") if entry.isdigit()
            and Path(f"/proc/{entry}/stat").exists() and _parent(int(entry)) == server.pid
        ]  # fmt: skip
        assert len(children) >= 2  # uvicorn's two workers (a resource tracker may be a third child)

        def post(index: int) -> tuple[int, float]:
            answer = httpx.post(f"{base}/predict", files={"image": (f"{index}.png", spot_png)}, timeout=60)
            return answer.status_code, answer.json().get("score", float("nan"))

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
        assert [status for status, _ in answers] == [200] * 8
        assert len({round(score, 5) for _, score in answers}) == 1  # every worker holds the same model
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])
