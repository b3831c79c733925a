"""``hrad serve`` under hostile uploads at its default limits: status, latency and the server's RSS.

Issue 13 found that one valid 858 KB PNG of 30000x30000 (a decompression bomb) made ``hrad
serve`` answer 500 after 13.5 s and keep 3.3 GB afterwards. This script builds that kind of
file (8-bit gray, zeros, compressed row by row so it never sits in memory here), a PNG whose
header alone claims 60000x60000, and garbage; fits a tiny model on synthetic textures (no
dataset); starts the installed ``hrad serve`` on 127.0.0.1 with its defaults (pixel budget
2**28, 256 MB uploads); and sends ``--rounds`` rounds of every kind from ``--threads``
concurrent clients, sampling the server's RSS every 20 ms. It records each kind's status codes
and median latency, and the server's RSS before, at its peak during, and after the burst.

    PYTHONPATH=. python benchmarks/hostile_service.py --rounds 10 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import psutil

from hrad.config import load_config
from hrad.evaluation import environment
from hrad.model import AnomalyModel
from hrad.reports.markdown import table

RESULTS = Path(__file__).resolve().parent / "results"
SCRIPT = Path(sys.executable).with_name("hrad")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")


def bomb_png(side: int) -> bytes:
    """A valid 8-bit gray PNG of ``side x side`` zeros, compressed row by row."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def header_only_png(side: int) -> bytes:
    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def texture(rng: np.random.Generator, height: int = 256, width: int = 320) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    base = 0.5 + 0.2 * np.sin(xx / 7.0 + rng.uniform(0, 6)) * np.cos(yy / 9.0 + rng.uniform(0, 6))
    gray = np.clip(base + rng.normal(0, 0.02, (height, width)), 0, 1)
    return np.repeat(gray[..., None], 3, axis=2).astype(np.float32)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--bursts", type=int, default=2, help="bursts in a row: a leak grows with each, warm-up does not")
    parser.add_argument("--name", default="hostile_service")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    bomb = bomb_png(30000)
    bomb_seconds = time.perf_counter() - started
    ok, encoded = cv2.imencode(".png", (texture(rng) * 255).astype(np.uint8))
    assert ok
    uploads = {
        "valid 320x256": encoded.tobytes(),
        f"bomb 30000x30000 ({len(bomb) / 1e3:.0f} KB)": bomb,
        "header claims 60000x60000": header_only_png(60000),
        "garbage": os.urandom(100_000),
    }

    with tempfile.TemporaryDirectory(prefix="hrad-hostile-") as folder:
        config = load_config(
            None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "padim"}, "strategy": {"name": "tiled", "tile": 128}}
        )
        model_path = AnomalyModel(config).fit([texture(rng) for _ in range(6)]).save(Path(folder) / "model")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [str(SCRIPT), "serve", "--model", str(model_path), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("hrad serve did not start")
                time.sleep(0.3)
            process = psutil.Process(server.pid)

            def send(kind: str) -> tuple[str, int, float, str]:
                with httpx.Client(timeout=300) as client:
                    begin = time.perf_counter()
                    response = client.post(f"{url}/predict", files={"image": ("upload.png", uploads[kind])})
                    seconds = time.perf_counter() - begin
                body = response.json()
                return kind, response.status_code, seconds, str(body.get("error", ""))[:160]

            for _ in range(3):  # warm up the model and allocator before the baseline
                send("valid 320x256")
            time.sleep(1.0)
            before = process.memory_info().rss
            peak = before
            sampling = True

            def sample() -> None:
                nonlocal peak
                while sampling:
                    peak = max(peak, process.memory_info().rss)
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            plan = [kind for _ in range(args.rounds) for kind in uploads]
            results = []
            after_each = []
            burst_started = time.perf_counter()
            for _ in range(args.bursts):
                with ThreadPoolExecutor(args.threads) as pool:
                    results.extend(pool.map(send, plan))
                time.sleep(1.0)
                after_each.append(process.memory_info().rss)
            burst_seconds = time.perf_counter() - burst_started
            sampling = False
            sampler.join()
            health = httpx.get(f"{url}/health", timeout=10).json()["status"]
        finally:
            server.terminate()
            server.wait(timeout=30)

    by_kind: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
    for kind, status, seconds, error in results:
        by_kind[kind].append((status, seconds, error))
    rows: list[dict[str, Any]] = []
    for kind, answers in by_kind.items():
        statuses = sorted({status for status, _, _ in answers})
        rows.append({
            "upload": kind,
            "requests": len(answers),
            "status": "/".join(str(status) for status in statuses),
            "median_seconds": round(statistics.median(seconds for _, seconds, _ in answers), 4),
            "max_seconds": round(max(seconds for _, seconds, _ in answers), 4),
            "error": answers[0][2] or "-",
        })
    memory = {
        "rss_before_mb": round(before / 2**20, 1),
        "rss_peak_during_mb": round(peak / 2**20, 1),
        **{f"rss_after_burst_{index + 1}_mb": round(value / 2**20, 1) for index, value in enumerate(after_each)},
        "bursts_seconds": round(burst_seconds, 2),
        "health_after": health,
        "bomb_build_seconds": round(bomb_seconds, 2),
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    env = environment()
    command = "PYTHONPATH=. python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"command": command, "environment": env, "rows": rows, "memory": memory}, indent=2, default=str)
    )
    text = (
        f"# {args.name}\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\nNo dataset: synthetic textures and generated files.\n\n"
        f"Command: `{command}`\n\nMachine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']} on {env['device']}; "
        f"date {env['date']}. Server: installed `hrad serve`, default pixel budget and upload limit, "
        f"{args.threads} concurrent clients, {args.bursts} bursts of {args.rounds} rounds of each upload "
        "(RSS measured 1 s after each burst). The machine's 1-minute load average at the end is recorded: "
        "other jobs share its 2 cores, so latencies are noisy; the status codes and memory are the result.\n\n"
        + table(rows, ["upload", "requests", "status", "median_seconds", "max_seconds", "error"])
        + "\n## Server memory\n\n"
        + table([memory], list(memory))
    )
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
