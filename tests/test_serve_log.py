"""``hrad serve`` with ``--log-file``: uvicorn's startup and shutdown lines and one line per request
(client, method, path, status, seconds) on stderr once and in the log file, worker processes
included, and every other line on stderr too (libraries' warnings, Python warnings of a worker,
a worker that cannot start) in hrad's form; nothing on stdout."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np
import psutil
import pytest
from cli_helpers import free_port, wait_ready
from export_helpers import make_model, training_images
from fastapi.testclient import TestClient
from test_log_file import logged

from hrad.cli.progress import server_log_config
from hrad.service import create_app

#: a request line: ``127.0.0.1:40312 "GET /health" 200 0.004 s``
REQUEST = re.compile(r'^[\d.]+:\d+ "(\w+) (\S+)" (\d{3}) (\d+\.\d{3}) s$')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model({"name": "tiled", "tile": 64}).fit(training_images(0, 3)).save(tmp_path_factory.mktemp("serve_log") / "model")


#: what loading :func:`warned_model_dir` warns, in every process that loads it
WEIGHTS_WARNING = "fitted with backbone weights from another camera's weights"


@pytest.fixture(scope="module")
def warned_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model_dir`` with a manifest that names other backbone weights: each load warns."""
    warned = tmp_path_factory.mktemp("serve_log_warned") / "model"
    shutil.copytree(model_dir, warned)
    manifest = json.loads((warned / "hrad.json").read_text())
    manifest["backbone_weights"] = "another camera's weights"
    (warned / "hrad.json").write_text(json.dumps(manifest))
    return warned


#: a multipart body python-multipart refuses with a warning of its own ("Found invalid character
#: 32 in header at 9"): a header name with a space
MALFORMED_UPLOAD = b"--XX\r\nBad Header: x\r\n\r\nabc\r\n--XX--\r\n"


def start_server(
    model: Path,
    log: Path,
    port: int,
    workers: int,
    pythonpath: Path | None = None,
    own_group: bool = False,
    extra: list[str] | None = None,
    temp: Path | None = None,
) -> subprocess.Popen[str]:
    """``hrad --log-file LOG serve`` in a process of its own (the environment's HRAD_LOG_FILE left
    out; ``pythonpath`` first on its path, for a ``sitecustomize``; ``own_group``: in a process
    group of its own, as a terminal's foreground job, whose Ctrl-C reaches every process in it;
    ``extra``: more serve options; ``temp``: its temp directory, TMPDIR)."""
    environment = {key: value for key, value in os.environ.items() if key != "HRAD_LOG_FILE"}
    if temp is not None:
        environment["TMPDIR"] = str(temp)
    if pythonpath is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [environment.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "hrad", "--log-file", str(log), "serve", "--model", str(model), "--port", str(port),
               "--workers", str(workers), *(extra or [])]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=own_group
    )


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
def test_serve_writes_startup_requests_and_shutdown_to_the_log_file(warned_model_dir: Path, tmp_path: Path, workers: int) -> None:
    """Also: python-multipart's warning on a malformed upload, and a worker's Python warnings,
    went to stderr as bare lines (Python's last-resort handler, Python's warning format) and
    never reached the log file; now every line on stderr is in the file, as hrad's lines."""
    log = tmp_path / "serve.log"
    port = free_port()
    server = start_server(warned_model_dir, log, port, workers)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        assert httpx.get(f"{base}/nowhere", timeout=30).status_code == 404
        malformed = httpx.post(
            f"{base}/predict", content=MALFORMED_UPLOAD, headers={"content-type": "multipart/form-data; boundary=XX"}, timeout=30
        )
        assert malformed.status_code == 400
    finally:
        server.terminate()
        stdout, stderr = server.communicate(timeout=60)
    lines = logged(log)
    requests = [match.groups() for match in map(REQUEST.match, lines) if match]
    assert [request[:3] for request in requests] == [
        ("GET", "/ready", "200"), ("GET", "/health", "200"), ("GET", "/nowhere", "404"), ("POST", "/predict", "400")
    ]  # fmt: skip
    assert Counter(stderr.splitlines()) == Counter(line for line in lines if not line.startswith("==="))  # all of stderr, and only it
    assert sum(line.startswith("hrad: warning: ") and "in header" in line for line in lines) == 1  # python-multipart's
    loads = 1 if workers == 1 else 1 + workers  # the model is loaded first in the parent, then in each worker
    assert sum(line.startswith("hrad: warning: ") and WEIGHTS_WARNING in line for line in lines) == loads
    assert sum(line.startswith("Started server process") for line in lines) == workers
    assert sum(line == "Application startup complete." for line in lines) == workers
    assert sum(line.startswith("Finished server process") for line in lines) == workers
    assert sum(line.startswith("===") for line in lines) == 2  # the header and the exit status: workers add no header
    assert stdout == ""  # uvicorn's access lines, which went there, are off
    shown = [line for line in stderr.splitlines() if REQUEST.match(line)]
    assert shown == [line for line in lines if REQUEST.match(line)]  # each request once on the terminal too


def test_other_libraries_records_are_hrad_lines_from_warning_up(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """hrad serve's logging (as uvicorn applies it in each process): a library's warning, which went
    to Python's last-resort handler as a bare line on stderr that the log file never got, is an
    ``hrad: warning:`` line; its info and debug records stay out."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # the config sets it; put back after
    root = logging.getLogger()
    configured = [root, *(logging.getLogger(name) for name in ("uvicorn", "uvicorn.access", "hrad.service"))]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in configured]
    try:
        logging.config.dictConfig(server_log_config())
        library = logging.getLogger("python_multipart.multipart")
        library.debug("Calling on_part_data with data[0:3]")
        library.info("Opening a file on disk")
        library.warning("Found invalid character 32 in header at 9")
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
    assert capsys.readouterr().err.splitlines() == ["hrad: warning: Found invalid character 32 in header at 9"]


#: a ``sitecustomize`` for the server's processes: in a worker of ``hrad serve --workers N`` (whose
#: environment carries the settings), the model is at a path that does not exist
FAILING_WORKERS = """
import json, os
if "HRAD_SERVE_SETTINGS" in os.environ:
    settings = json.loads(os.environ["HRAD_SERVE_SETTINGS"])
    os.environ["HRAD_SERVE_SETTINGS"] = json.dumps({**settings, "model_path": settings["model_path"] + "-gone"})
"""


def test_a_worker_that_cannot_load_the_model_stops_the_server_with_status_1(model_dir: Path, tmp_path: Path) -> None:
    """A worker whose model failed to load (it loaded in the parent: a file changed since, memory
    ran out) printed a traceback and was started again by uvicorn, forever; killing the server
    then gave status 0. Now the worker says why in one line and the server stops, status 1."""
    (tmp_path / "sitecustomize.py").write_text(FAILING_WORKERS)
    log = tmp_path / "serve.log"
    server = start_server(model_dir, log, free_port(), 2, pythonpath=tmp_path)
    try:
        stdout, stderr = server.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        server.kill()
        stdout, stderr = server.communicate()
        pytest.fail(f"hrad serve still runs with workers that cannot start: {stderr[-1500:]}")
    lines = logged(log)
    assert server.returncode == 1 and lines[-1].startswith("=== exit status 1 after"), stderr[-1500:]
    assert "Traceback" not in stderr
    failed = [line for line in lines if re.fullmatch(rf"hrad: error: worker process \d+ cannot serve: {re.escape(str(model_dir))}-gone: model not found", line)]
    assert 1 <= len(failed) <= 2  # the first to fail stops the server (the other may have failed by then too)
    assert lines[-2] == "hrad: error: a worker process could not start (its error is above); the server stopped"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_stops_the_server_gracefully_with_status_0_and_says_so(
    model_dir: Path, tmp_path: Path, workers: int, stop: str
) -> None:
    """systemctl stop / a Kubernetes pod stop: one process exited 143 (uvicorn raised the SIGTERM
    it had captured again after its graceful shutdown, into hrad's handler), --workers N 0. Both
    exit 0 now, with one line saying SIGTERM stopped it, on stderr and in the log file. Ctrl-C
    (SIGINT to the whole process group, as a terminal sends it) stops it the same way: it exited 0
    without a word of it (one process) or with uvicorn's 'Received SIGINT, exiting.' (workers)."""
    log = tmp_path / "serve.log"
    port = free_port()
    server = start_server(model_dir, log, port, workers, own_group=stop == "SIGINT")
    try:
        wait_ready(f"http://127.0.0.1:{port}")
    finally:
        if stop == "SIGINT":
            os.killpg(server.pid, signal.SIGINT)
        else:
            server.terminate()
        stdout, stderr = server.communicate(timeout=60)
    lines = logged(log)
    assert server.returncode == 0 and lines[-1].startswith("=== exit status 0 after"), stderr[-1500:]
    assert [line for line in stderr.splitlines() if stop in line] == [f"hrad serve stopped on {stop}"]
    assert lines[-2] == f"hrad serve stopped on {stop}" and "terminated" not in lines and "interrupted" not in lines
    assert "Traceback" not in stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
def test_the_workers_stop_when_the_server_process_is_killed(model_dir: Path, tmp_path: Path) -> None:
    """A server process SIGKILLed (the OOM killer, ``kill -9``, a service manager's final kill)
    left its --workers N processes serving on the port, an orphaned server nobody could stop by
    stopping the service. Now each worker gets a SIGTERM when it dies, and stops."""
    port = free_port()
    server = start_server(model_dir, tmp_path / "serve.log", port, 2, own_group=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        workers = [child for child in psutil.Process(server.pid).children() if "spawn_main" in " ".join(child.cmdline())]
        assert len(workers) == 2
        server.kill()
        server.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == [], f"workers {[worker.pid for worker in alive]} still run 10 s after their server process was killed"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
    finally:  # its whole group: no worker left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.communicate()


#: a ``sitecustomize`` for the server's processes: each prediction leaves a file ``predicting``
#: beside it, then takes a minute, so a request stays in flight while the test stops the server.
#: It patches hrad.model when the process imports it: importing it here (torch and all) delayed a
#: worker's answer to uvicorn's 5 s health check under load, and uvicorn killed and restarted it
SLOW_PREDICTIONS = """
import importlib.abc, importlib.machinery, pathlib, sys, time

def slow(module):
    _predict = module.AnomalyModel.predict
    def predict(self, *args, **kwargs):
        pathlib.Path(__file__).with_name("predicting").touch()
        time.sleep(60)
        return _predict(self, *args, **kwargs)
    module.AnomalyModel.predict = predict

class SlowPredictions(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "hrad.model":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        spec.loader.exec_module = lambda module: (run(module), slow(module))
        return spec

sys.meta_path.insert(0, SlowPredictions())
"""


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("stop", ["second SIGINT", "SIGTERM past --graceful-timeout"])
def test_a_second_ctrl_c_or_the_graceful_timeout_stops_at_once_with_one_line_and_status_128_plus_the_signal(
    model_dir: Path, tmp_path: Path, stop: str, workers: int
) -> None:
    """A second Ctrl-C while a request was in flight (uvicorn's force quit) printed asyncio's
    tracebacks of the cancelled requests on stderr and in the log file, then still waited for the
    prediction's thread to finish, and exited 0 saying it stopped on SIGINT. Now it stops at once,
    says it left the request unfinished in one line, and exits 130; a first SIGTERM whose
    graceful shutdown outlasts --graceful-timeout does the same, status 143. With --workers N the
    worker that holds the request ends so, silently, and the parent says the one line.

    Also: os._exit skipped the removal of the request's upload folder, so each forced stop left an
    ``hrad-upload-*`` folder in the temp directory; the stop removes it now."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_PREDICTIONS)
    log = tmp_path / "serve.log"
    temp = tmp_path / "temp"
    temp.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(
        model_dir, log, port, workers, pythonpath=tmp_path, own_group=True, extra=["--graceful-timeout", "1"], temp=temp
    )
    try:
        wait_ready(base)
        upload = {"image": ("part.png", cv2.imencode(".png", np.zeros((90, 130, 3), np.uint8))[1].tobytes())}

        def send() -> None:
            with contextlib.suppress(httpx.TransportError):  # the server stops without answering it
                httpx.post(f"{base}/predict", files=upload, timeout=60)

        threading.Thread(target=send, daemon=True).start()
        deadline = time.monotonic() + 30
        while not (tmp_path / "predicting").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # until the request is in flight (its prediction sleeps)
        assert len(list(temp.glob("hrad-upload-*"))) == 1  # the request's upload, while it is predicted
        if stop == "second SIGINT":
            os.killpg(server.pid, signal.SIGINT)
            time.sleep(0.3)  # the first starts the graceful shutdown (its timeout, 1 s, is not reached)
            os.killpg(server.pid, signal.SIGINT)
        else:
            server.terminate()
        stdout, stderr = server.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        stdout, stderr = server.communicate()
        pytest.fail(f"hrad serve still ran 20 s after {stop}: {stderr[-1500:]}")
    finally:  # its whole group: a worker left running holds the pipes, and communicate() waited for ever
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.communicate()
    said = ("hrad serve stopped on a second SIGINT without finishing 1 in-flight request" if stop == "second SIGINT" else
            "hrad serve stopped on SIGTERM without finishing 1 in-flight request within the 1 s graceful timeout")  # fmt: skip
    status = 130 if stop == "second SIGINT" else 143
    lines = logged(log)
    assert server.returncode == status, stderr[-1500:]
    assert [line for line in stderr.splitlines() if "stopped" in line] == [said]
    assert lines[-2:] == [said, lines[-1]] and lines[-1].startswith(f"=== exit status {status} after")
    assert "Traceback" not in stderr and not any("Traceback" in line or "Error" in line for line in lines), stderr[-1500:]
    assert "leaked" not in stderr, stderr[-1500:]  # the resource tracker's warning of a semaphore os._exit left
    assert stdout == ""
    assert list(temp.glob("hrad-upload-*")) == []


def test_a_worker_added_by_sigttin_is_hrads_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's SIGTTIN adds a worker; the supervisor's is an hrad WorkerProcess (forced stop, ends
    with the server) in a slot of the shared counts, not uvicorn's plain one."""
    import socket

    import uvicorn
    from uvicorn.supervisors.multiprocess import SIGNALS, Process

    from hrad.cli.serving import Supervisor, WorkerProcess

    monkeypatch.setattr(Process, "start", lambda self: None)  # nothing spawned, old code or new
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}  # the supervisor takes them over
    try:
        with socket.socket() as sock:
            supervisor = Supervisor(uvicorn.Config("hrad.service:create_app", workers=2), [sock], graceful_timeout=1.0)
            supervisor.init_processes()
            supervisor.handle_ttin()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert supervisor.processes_num == 3 and len(supervisor.processes) == 3
    assert all(isinstance(process, WorkerProcess) for process in supervisor.processes)
    assert [process.slot for process in supervisor.processes] == [0, 1, 0]  # type: ignore[attr-defined]
