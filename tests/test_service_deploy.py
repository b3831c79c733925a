"""``hrad serve`` against what a broken client or an attacker sends in deployment: a client that
leaves mid-upload, and many large uploads waiting for the model at once (their bodies must wait
on disk, not in memory)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cli_helpers import hold_predictions
from export_helpers import make_model, spotted_image, training_images
from fastapi.testclient import TestClient

from hrad.service import create_app

#: a request's scope as uvicorn hands it to the app
SCOPE: dict[str, Any] = {
    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
    "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
    "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model({"name": "tiled", "tile": 64}).fit(training_images(0, 3)).save(tmp_path_factory.mktemp("deploy") / "model")


def jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", (np.clip(image, 0, 1) * 255).round().astype(np.uint8)[..., ::-1])
    assert ok
    return data.tobytes()


def test_a_client_that_leaves_mid_upload_is_answered_499_and_counted(model_dir: Path) -> None:
    """The body middleware returned without a response, and Starlette's middleware stack raised
    'No response returned.' for it: a 40-line traceback in the server's log per such client, and
    no count in /metrics."""
    app = create_app(model_dir)
    body = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n" + b"\xff" * 1000
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", b"100000")]
    asyncio.run(app({**SCOPE, "headers": headers}, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert b"client disconnected after" in sent[1]["body"]
    metrics = TestClient(app).get("/metrics").text
    assert 'hrad_requests_total{route="unmatched",status="499"} 1.0' in metrics


def test_uploads_waiting_for_the_model_wait_on_disk(model_dir: Path) -> None:
    """Four 8 MB uploads queued behind a busy model: each was held twice in memory while it
    waited (the body middleware's chunks and the endpoint's read of the upload), 64 MB for four,
    so concurrent large uploads could exhaust a server's memory however the queue was bounded.
    Now the bodies are spooled to disk and read by the decoder from there. The requests are fed
    to the app as uvicorn does, a megabyte at a time, so no client holds a copy."""
    app = create_app(model_dir)
    release = hold_predictions(app, 30)
    head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n\r\n' + jpeg(spotted_image(5, 96, 128))
    tail = b"\r\n--b--\r\n"
    padding = 8  # MB of zeros after the JPEG, which its decoder ignores
    headers = [(b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", str(len(head) + padding * 2**20 + len(tail)).encode())]

    async def post() -> int:
        parts = itertools.chain([head], (bytes(2**20) for _ in range(padding)), [tail])  # made as sent
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            part = next(parts, None)
            if part is None:
                await asyncio.sleep(60)
                return {"type": "http.disconnect"}
            await asyncio.sleep(0)
            return {"type": "http.request", "body": part, "more_body": part is not tail}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app({**SCOPE, "headers": headers}, receive, send)
        return statuses[0]

    async def held_while_queued() -> int:
        deadline = time.monotonic() + 60
        while app.state.metrics.queued._value.get() < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        held = tracemalloc.get_traced_memory()[0] - baseline
        release.set()
        return held

    async def main() -> list[int]:
        return list(await asyncio.gather(held_while_queued(), *(post() for _ in range(4))))

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        held, *statuses = asyncio.run(main())
        queued = app.state.metrics.queued._value.get()
    finally:
        tracemalloc.stop()
        release.set()
    assert statuses == [200] * 4 and queued == 0
    # each body keeps up to 1 MB in memory before it spools to disk, plus the parser's buffers: about
    # 8 MB in all here, where the bodies held in memory took 64.7 MB (twice the 32 MB sent)
    sent = 4 * padding * 2**20
    assert held < sent / 2, f"{held / 2**20:.1f} MB held by four requests waiting for the model ({sent / 2**20:.0f} MB sent)"


def test_a_prediction_request_past_the_queue_is_refused_before_its_body_is_read(model_dir: Path) -> None:
    """With --max-queue requests in flight, each further upload was received whole (spooled to
    disk) and waited for the model until its timeout, however many came: a flood of uploads could
    fill the disk. It is now 503 at once, with Retry-After, and none of its body is received; the
    requests within the queue wait and are answered as before, and so is one after them. (Retry-After
    is 1 s here, as nothing was measured yet: tests/test_service_production.py has it grow.)"""
    app = create_app(model_dir, max_queue=2)
    release = hold_predictions(app, 30)
    upload = b'--b\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n\r\n' + jpeg(spotted_image(5, 96, 128)) + b"\r\n--b--\r\n"
    headers = [(b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", str(len(upload)).encode())]
    received: list[int] = []  # which requests' bodies the server asked for

    async def post(number: int, path: str = "/predict") -> tuple[int, dict[bytes, bytes], bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if number in received:
                await asyncio.sleep(60)
                return {"type": "http.disconnect"}
            received.append(number)
            return {"type": "http.request", "body": upload, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app({**SCOPE, "path": path, "raw_path": path.encode(), "headers": headers}, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), b"".join(message.get("body", b"") for message in sent[1:])

    async def main() -> list[tuple[int, dict[bytes, bytes], bytes]]:
        queued = [asyncio.ensure_future(post(number)) for number in (1, 2)]
        deadline = time.monotonic() + 30
        while app.state.metrics.queued._value.get() < 2 and time.monotonic() < deadline:  # both wait for the model
            await asyncio.sleep(0.02)
        try:
            refused = [await asyncio.wait_for(post(3), 10), await asyncio.wait_for(post(4, "/predict/batch"), 10)]
        finally:
            release.set()
        return [*refused, *await asyncio.gather(*queued), await post(5)]

    try:
        (status, headers_sent, body), (batch_status, _, batch_body), *answered = asyncio.run(main())
    finally:
        release.set()
    assert (status, batch_status) == (503, 503) and headers_sent[b"retry-after"] == b"1"
    error = json.loads(body)["error"]
    assert error == "/predict: the queue is full (2 of at most 2 prediction requests in flight, max_queue); retry in 1 s"
    assert json.loads(batch_body)["error"].startswith("/predict/batch: the queue is full (2 of at most 2")
    assert sorted(received) == [1, 2, 5]  # the refused requests' bodies were never asked for
    assert [answer[0] for answer in answered] == [200, 200, 200]
    assert TestClient(app).get("/ready").json()["queued"] == 0


def test_a_request_without_the_image_file_says_how_to_send_one(model_dir: Path) -> None:
    """A client posting JSON or the raw image got 'body.image: Field required', and a text field
    'Expected UploadFile, received: <class 'str'>': nothing said multipart."""
    client = TestClient(create_app(model_dir))
    image = jpeg(spotted_image(5, 96, 128))
    how = "takes the image file in multipart/form-data field 'image' (curl -F image=@part.png)"
    cut_short = b'--B\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n\r\n' + image + b"\r\n--B"
    answers = {
        f"body.image: /predict {how}, not application/json": client.post("/predict", json={"image": "x"}),
        f"body.image: /predict {how}, not image/jpeg": client.post("/predict", content=image, headers={"content-type": "image/jpeg"}),
        f"body.image: /predict {how}, not a body without Content-Type": client.post("/predict"),
        f"body.image: /predict {how}, not application/x-www-form-urlencoded": client.post("/predict", data={"image": "x"}),
        f"body.image: /predict {how}; this form has no such field": client.post("/predict", files={"picture": ("p.jpg", image)}),
        f"body.image: /predict {how}; this form has text there, not a file": client.post(
            "/predict", data={"image": "x"}, files={"other": ("p.jpg", image)}
        ),
        "body.images: /predict/batch takes the image file in multipart/form-data field 'images' (curl -F images=@part.png);"
        " this form has no such field": client.post("/predict/batch", files={"image": ("p.jpg", image)}),
        # a form cut short (no closing boundary) parses as one without the field: said so, not 'no such field'
        f"body.image: /predict {how}; the body is not a complete multipart form (it lacks the closing --B--; cut short?)": client.post(
            "/predict", content=cut_short, headers={"content-type": 'multipart/form-data; boundary="B"'}
        ),
    }
    for message, answer in answers.items():
        assert (answer.status_code, answer.json()) == (422, {"error": message})


def test_two_images_in_predicts_field_are_refused(model_dir: Path) -> None:
    """FastAPI keeps the last file of a repeated field: a client that sent two images to /predict
    got one result, for the last, and nothing said the first was dropped."""
    client = TestClient(create_app(model_dir))
    image = jpeg(spotted_image(5, 96, 128))
    answer = client.post("/predict", files=[("image", ("a.jpg", image)), ("image", ("b.jpg", image))])
    assert (answer.status_code, answer.json()) == (
        422,
        {"error": "body.image: /predict takes one image, this form has 2 in field 'image' (several: /predict/batch, field 'images')"},
    )
    assert client.post("/predict", files={"image": ("a.jpg", image)}).json()["filename"] == "a.jpg"


def test_a_batch_past_the_form_parsers_file_limit_is_refused_like_any_large_batch(model_dir: Path) -> None:
    """Starlette's form parser stops at 1000 files with its own 400; the client is told hrad's limit, 413."""
    client = TestClient(create_app(model_dir, max_batch=3))
    answer = client.post("/predict/batch", files=[("images", (f"{i}.png", b"x")) for i in range(1001)])
    assert (answer.status_code, answer.json()) == (413, {"error": "over 1000 files in one request; at most 3 images in one batch"})
