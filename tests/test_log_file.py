"""``hrad --log-file PATH``: the command's messages, progress and exit status as timestamped lines
in a file, in a real process (stderr not a terminal) and with a terminal's bars. Errors and where
the file comes from are checked in-process (``cli_helpers.run``: the same ``main()``, exit status
and stderr) to spare a Python + torch start each."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image

#: ``2026-12-01T05:38:36+00:00 text``
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d (.*)$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain folder of 5 good images."""
    root = tmp_path_factory.mktemp("log_file") / "good"
    rng = np.random.default_rng(0)
    for index in range(5):
        write(root / f"{index:03d}.png", textured_image(rng, 64, 96))
    return root


def hrad(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``hrad ARGS`` in a process of its own (stderr a pipe, as in ``2> fit.log``)."""
    environment = {key: value for key, value in os.environ.items() if key != "HRAD_LOG_FILE"}
    return subprocess.run([sys.executable, "-m", "hrad", *args], capture_output=True, text=True, env={**environment, **(env or {})}, timeout=300)


def logged(path: Path) -> list[str]:
    """The log's lines without their timestamps (every line has one)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    matches = [STAMPED.match(line) for line in lines]
    assert all(matches), lines
    return [match.group(1) for match in matches if match]


def fit_args(dataset: Path, out: Path) -> list[str]:
    """A seconds-long PatchCore fit that also warns (no held-out images, so no thresholds)."""
    return ["fit", "--data", str(dataset), "--out", str(out), "--backbone", "tiny-cnn", "--detector", "patchcore",
            "--strategy", "downsample", "--image-size", "64", "--set", "threshold.validation_fraction=0"]  # fmt: skip


def test_a_fit_logs_its_header_messages_progress_warnings_and_exit_status(dataset: Path, tmp_path: Path) -> None:
    log = tmp_path / "fit.log"
    args = fit_args(dataset, tmp_path / "m")
    done = hrad("--log-file", str(log), *args)
    assert done.returncode == 0, done.stderr
    lines = logged(log)
    assert lines[0] == "=== hrad " + __import__("hrad").__version__ + ": hrad --log-file " + " ".join([str(log), *args])
    assert re.fullmatch(r"=== exit status 0 after \d+\.\d s", lines[-1])
    # the file holds what stderr showed, line for line: messages, progress lines, the warning
    assert lines[1:-1] == [line for line in done.stderr.splitlines() if line.strip()]
    # the seconds are wall time from the embedding's last step: a process descheduled for half a second
    # (a loaded CI box) writes "1 s", so they are not pinned here
    assert [line for line in lines if re.fullmatch(r"coreset selection: 32/32, \d+ s", line)]
    assert f"model written to {tmp_path / 'm'}" in lines
    assert [line for line in lines if line.startswith("hrad: warning: no held-out normal images")]


def test_a_failing_command_logs_its_error_and_status_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run.log"
    assert run(["--log-file", str(log), "info", str(tmp_path / "missing")], monkeypatch) == 2
    lines = logged(log)
    assert lines[1] == f"hrad: error: {tmp_path / 'missing'}: model not found" == capsys.readouterr().err.strip()
    assert lines[2].startswith("=== exit status 2 after ") and len(lines) == 3


@pytest.mark.parametrize("where", ["missing folder", "a folder", "disk full"])
def test_a_log_file_that_cannot_be_written_stops_the_command_before_any_work(
    dataset: Path, tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "disk full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    path = {"missing folder": tmp_path / "nowhere" / "fit.log", "a folder": tmp_path, "disk full": Path("/dev/full")}[where]
    assert run(["--log-file", str(path), *fit_args(dataset, tmp_path / "m")], monkeypatch) == 2
    reason = {"missing folder": "No such file or directory", "a folder": "Is a directory", "disk full": "No space left on device"}[where]
    assert capsys.readouterr().err.splitlines() == [f"hrad: error: {path}: cannot write the log file ({reason})"]
    assert not (tmp_path / "m").exists()


def test_the_environment_names_the_log_file_and_the_option_wins_and_runs_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env, from_option = tmp_path / "env.log", tmp_path / "option.log"
    monkeypatch.setenv("HRAD_LOG_FILE", str(from_env))
    assert run(["info", str(tmp_path / "a")], monkeypatch) == 2
    assert run(["--log-file", str(from_option), "info", str(tmp_path / "b")], monkeypatch) == 2
    assert run(["info", str(tmp_path / "c")], monkeypatch) == 2
    errors = [line for line in logged(from_env) if not line.startswith("=== exit")]
    assert errors == [
        f"=== hrad {__import__('hrad').__version__}: hrad info {tmp_path / 'a'}",
        f"hrad: error: {tmp_path / 'a'}: model not found",
        f"=== hrad {__import__('hrad').__version__}: hrad info {tmp_path / 'c'}",
        f"hrad: error: {tmp_path / 'c'}: model not found",
    ]
    assert logged(from_option)[1] == f"hrad: error: {tmp_path / 'b'}: model not found"


def test_a_log_that_stops_taking_lines_is_told_once_and_the_command_goes_on(dataset: Path, tmp_path: Path) -> None:
    """The log is a pipe whose reader goes away after the header (as a full disk would refuse
    the writes): one warning, the fit finishes, status 0."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    process = subprocess.Popen([sys.executable, "-m", "hrad", "--log-file", str(fifo), *fit_args(dataset, tmp_path / "m")],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        received, deadline = b"", time.monotonic() + 120
        while b"\n" not in received:
            assert time.monotonic() < deadline and process.poll() is None, "no header line"
            try:
                received += os.read(reader, 65536)
            except BlockingIOError:
                time.sleep(0.05)
    finally:
        os.close(reader)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 0, err
    assert b"=== hrad " in received
    assert len([line for line in err.splitlines() if "cannot write the log file" in line]) == 1, err
    assert f"hrad: warning: {fifo}: cannot write the log file (Broken pipe): logging stopped" in err
    assert (tmp_path / "m").exists()


def test_in_a_terminal_the_bars_show_and_the_file_gets_plain_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced terminal: bars on the console; the log file gets the progress as plain lines
    (rate-limited like stderr's when it is not a terminal; a worker job's under its label),
    the console's messages without colours, and no screen updates."""
    from rich.console import Console
    from rich.text import Text

    from hrad.cli import log_file
    from hrad.cli import progress as cli_progress
    from hrad.progress import PROGRESS
    from hrad.runners import WORKER_JOB, WorkerJob

    screen = io.StringIO()
    monkeypatch.setattr(cli_progress, "console", Console(file=screen, force_terminal=True, width=100))
    monkeypatch.setattr(sys, "argv", ["hrad", "--log-file", "x.log", "fit"])
    path = tmp_path / "x.log"
    logger = logging.getLogger("hrad.detectors.test_log_file")
    with pytest.raises(SystemExit), log_file.ended_with_status():
        log_file.start(path, cli_progress.console, cli_progress.print_warning)
        cli_progress.console.print(Text.assemble(("red words", "red"), " and\nsecond line"))
        with cli_progress.progress_bars(interval=3600) as update:
            for done in range(1, 5):
                update(done, 4, "stage")
            record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "step", (), None,
                                       extra={PROGRESS: (2, 2, "train epochs"), WORKER_JOB: WorkerJob(1, 2, 0.0, "tile (0, 1)")})  # fmt: skip
            record.created = 5.0
            logger.handle(record)
        cli_progress.print_warning("careful")
        sys.exit(3)
    lines = logged(path)
    # the stage lines' seconds are wall time ("1 s" when the process is descheduled): checked below
    assert lines == [
        "=== hrad " + __import__("hrad").__version__ + ": hrad --log-file x.log fit",
        "red words and",
        "second line",
        lines[3],
        lines[4],
        "tile (0, 1): train epochs: 2/2, 5 s",
        "hrad: warning: careful",
        lines[-1],
    ]
    assert re.fullmatch(r"stage: 1/4, \d+ s", lines[3]) and re.fullmatch(r"stage: 4/4, \d+ s", lines[4])
    assert re.fullmatch(r"=== exit status 3 after \d+\.\d s", lines[-1])
    shown = screen.getvalue()
    assert "\x1b[" in shown and "━" in shown and "stage" in shown and "careful" in shown  # bars and colours on the terminal
    assert cli_progress.console._render_hooks == []  # the console is no longer teed
    assert log_file.current() is None
