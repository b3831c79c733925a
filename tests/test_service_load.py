"""A bounded load test of the real ``hrad serve`` on 127.0.0.1: concurrent valid and hostile
requests, every response checked, the server still up and its memory back near its baseline.

The server is the installed console script in its own process (as users run it), with a small
pixel budget and upload limit so that every hostile kind is cheap to send. Its RSS before and
after the burst is printed (``-s`` shows it) and bounded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from conftest import textured_image, with_spot

from hrad.config import load_config
from hrad.model import AnomalyModel

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

SCRIPT = Path(sys.executable).with_name("hrad")
BUDGET = 200 * 200
#: RSS growth allowed after the burst: allocator arenas of the worker threads, not leaked images
#: (one decoded over-budget image here would be small; the point is that none accumulate)
RSS_MARGIN_MB = 80


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", (np.clip(image, 0, 1) * 255).round().astype(np.uint8)[..., ::-1])
    assert ok
    return data.tobytes()


def header_only_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, psutil.Process]]:
    if not SCRIPT.is_file():
        pytest.skip("the hrad console script is not installed in this environment")
    rng = np.random.default_rng(21)
    config = load_config(
        None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "padim"}, "strategy": {"name": "tiled", "tile": 64, "stride": 64}}
    )
    model = AnomalyModel(config).fit([textured_image(rng, 96, 128) for _ in range(6)])
    path = model.save(tmp_path_factory.mktemp("load") / "model")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [str(SCRIPT), "--max-pixels", str(BUDGET), "serve", "--model", str(path), "--port", str(port),
               "--max-upload-mb", "1", "--timeout", "60", "--max-queue", "8"]  # 8 clients at once: none refused as over the queue
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"hrad serve exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("hrad serve did not come up within 120 s")
            time.sleep(0.3)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def requests_of_each_kind(url: str) -> dict[str, tuple[Callable[[httpx.Client], httpx.Response], Callable[[httpx.Response], bool]]]:
    rng = np.random.default_rng(8)
    valid = png(with_spot(textured_image(rng, 96, 128), 30, 50, 10)[0])
    over_budget = png(np.zeros((256, 256, 3), np.float32))  # a real, valid PNG of 65536 px
    truncated = valid[: len(valid) // 2]

    def post(name: str, data: bytes) -> Callable[[httpx.Client], httpx.Response]:
        return lambda client: client.post(f"{url}/predict", files={"image": (name, data)})

    def error(status: int, text: str) -> Callable[[httpx.Response], bool]:
        def check(response: httpx.Response) -> bool:
            body = response.json()
            return response.status_code == status and list(body) == ["error"] and text in body["error"]

        return check

    def scored(response: httpx.Response) -> bool:
        body = response.json()
        return response.status_code == 200 and body["width"] == 128 and np.isfinite(body["score"])

    return {
        "valid": (post("part.png", valid), scored),
        "garbage": (post("notes.png", b"this is not an image" * 10), error(400, "notes.png: not a readable image")),
        "empty": (post("empty.png", b""), error(400, "empty upload")),
        "truncated": (post("cut.png", truncated), error(400, "cut.png")),
        "header_bomb": (post("bomb.png", header_only_png(60000, 60000)), error(413, "pixel budget")),
        "over_budget": (post("big.png", over_budget), error(413, "256x256 = 65536 pixels")),
        "oversized_upload": (post("huge.png", os.urandom(2 * 2**20)), error(413, "upload larger than the limit")),
        "unknown_route": (lambda client: client.get(f"{url}/admin"), error(404, "/admin")),
        "wrong_method": (lambda client: client.get(f"{url}/predict"), error(405, "/predict")),
    }


def test_concurrent_valid_and_hostile_requests(server: tuple[str, psutil.Process]) -> None:
    url, process = server
    kinds = requests_of_each_kind(url)
    with httpx.Client(timeout=60) as client:
        for send, check in kinds.values():  # warm every code path once before the baseline
            assert check(send(client))
        for _ in range(3):
            assert kinds["valid"][1](kinds["valid"][0](client))
    time.sleep(0.5)
    baseline = process.memory_info().rss

    plan = [kind for kind in kinds for _ in range(8 if kind == "valid" else 5)]
    np.random.default_rng(0).shuffle(plan)

    def one(kind: str) -> tuple[str, bool, str]:
        send, check = kinds[kind]
        with httpx.Client(timeout=60) as client:
            response = send(client)
        return kind, check(response), f"{response.status_code} {response.text[:200]}"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, plan))
    wrong = [(kind, detail) for kind, ok, detail in results if not ok]
    assert not wrong, wrong
    assert Counter(kind for kind, _, _ in results) == Counter(plan)

    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"  # still up
    time.sleep(0.5)
    after = process.memory_info().rss
    print(f"\nhrad serve RSS: {baseline / 2**20:.1f} MB before, {after / 2**20:.1f} MB after {len(plan)} requests "
          f"({sum(kind != 'valid' for kind in plan)} hostile)")
    assert after - baseline < RSS_MARGIN_MB * 2**20
