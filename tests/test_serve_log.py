"""``hrad serve`` with ``--log-file``: uvicorn's startup and shutdown lines and one line per request
(client, method, path, status, seconds) on stderr once and in the log file, worker processes
included; nothing on stdout."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cli_helpers import free_port, wait_ready
from export_helpers import make_model, training_images
from fastapi.testclient import TestClient
from test_log_file import logged

from hrad.service import create_app

#: a request line: ``127.0.0.1:40312 "GET /health" 200 0.004 s``
REQUEST = re.compile(r'^[\d.]+:\d+ "(\w+) (\S+)" (\d{3}) (\d+\.\d{3}) s$')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model({"name": "tiled", "tile": 64}).fit(training_images(0, 3)).save(tmp_path_factory.mktemp("serve_log") / "model")


def test_each_request_is_logged_once_with_its_status_and_seconds_and_an_escaped_path(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(create_app(model_dir))
    with caplog.at_level(logging.INFO, logger="hrad.service"):
        client.get("/health")
        client.get("/no%0Awhere?x=1")
    lines = [record.getMessage() for record in caplog.records if record.name == "hrad.service"]
    assert len(lines) == 2
    assert re.fullmatch(r'testclient:50000 "GET /health" 200 \d+\.\d{3} s', lines[0]), lines
    assert re.fullmatch(r'testclient:50000 "GET /no%0Awhere\?x=1" 404 \d+\.\d{3} s', lines[1]), lines


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_writes_startup_requests_and_shutdown_to_the_log_file(model_dir: Path, tmp_path: Path, workers: int) -> None:
    log = tmp_path / "serve.log"
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key != "HRAD_LOG_FILE"}
    command = [sys.executable, "-m", "hrad", "--log-file", str(log), "serve", "--model", str(model_dir), "--port", str(port),
               "--workers", str(workers)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        assert httpx.get(f"{base}/nowhere", timeout=30).status_code == 404
    finally:
        server.terminate()
        stdout, stderr = server.communicate(timeout=60)
    lines = logged(log)
    requests = [match.groups() for match in map(REQUEST.match, lines) if match]
    assert [request[:3] for request in requests] == [("GET", "/ready", "200"), ("GET", "/health", "200"), ("GET", "/nowhere", "404")]
    assert sum(line.startswith("Started server process") for line in lines) == workers
    assert sum(line == "Application startup complete." for line in lines) == workers
    assert sum(line.startswith("Finished server process") for line in lines) == workers
    assert sum(line.startswith("===") for line in lines) == 2  # the header and the exit status: workers add no header
    assert stdout == ""  # uvicorn's access lines, which went there, are off
    shown = [line for line in stderr.splitlines() if REQUEST.match(line)]
    assert shown == [line for line in lines if REQUEST.match(line)]  # each request once on the terminal too
