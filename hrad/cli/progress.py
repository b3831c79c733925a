"""Progress behind the strategies' ``progress(done, total, description)`` callbacks and the steps
detectors log (:func:`hrad.progress.log_progress`: epochs, coreset selection): rich bars in a
terminal; plain lines when stderr is a file or pipe (``hrad fit ... 2> fit.log``), where bars
would show nothing until each stage ended. With ``--log-file`` the file gets the plain lines in
either case (:mod:`hrad.cli.log_file`)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from hrad.cli import log_file
from hrad.errors import HradError
from hrad.progress import ProgressCallback, progress_of
from hrad.runners import WorkerJob, worker_job

#: hrad's messages (stderr). ``markup=False``: messages carry user paths and error texts, which
#: must print as they are (a file named ``[x].png``, ``pip install 'hrad[serve]'``); a stray
#: ``[/x]`` in one would otherwise raise rich's MarkupError. Colours go through ``style``/``Text``.
#: ``soft_wrap``: long lines stay whole in a log file (rich would break them at 80 columns).
console = Console(stderr=True, markup=False, soft_wrap=True)


#: seconds between two plain progress lines of one stage when stderr is not a terminal
LOG_INTERVAL = 30.0


def duration_words(seconds: float) -> str:
    """A duration as a person reads it in a log line: '45 s', '12 min', '2 h 05 min'."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 100 else f"{minutes // 60} h {minutes % 60:02d} min"


class _LogLines:
    """A callback printing ``description: done/total, N s``: a stage's first update, then at most
    one line per ``interval`` seconds, and its last step. The lines in between, all a long stage
    (a two-hour fit) shows for hours, add the time left at the stage's pace so far: ``(about 1 h
    40 min left)``, as a terminal's bar shows it; the first step alone is too rough a pace (it
    carries the stage's start-up). A stage's seconds count from the
    previous update of its lane: this process's stages run one after another (the first counts
    from the start; a stage whose steps start over, the next job of a serial pool, is a new
    one); each job in a worker process is a lane of its own, timed on the worker's clock from
    the job's start (its records' times, so a slow queue does not stretch them). ``write``: where
    the lines go, default the console."""

    def __init__(self, interval: float, write: Callable[[str], None] | None = None) -> None:
        self.interval = interval
        self.write = write or _print_line
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}
        self.last: dict[str, int] = {}
        self.previous: dict[WorkerJob | None, float] = {None: time.monotonic()}

    def __call__(self, done: int, total: int, description: str) -> None:
        self.step(done, total, description, None, time.monotonic())

    def step(self, done: int, total: int, description: str, job: WorkerJob | None, now: float) -> None:
        """One update of ``description`` at ``now`` (``job``'s clock, or monotonic for None)."""
        previous = self.previous.get(job, job.started if job is not None else now)
        self.previous[job] = now
        first = description not in self.started or done < self.last[description]
        if first:
            self.started[description] = previous
        self.last[description] = done
        if first or done >= total or now - self.printed[description] >= self.interval:
            self.printed[description] = now
            seconds = now - self.started[description]
            left = f" (about {duration_words(seconds / done * (total - done))} left)" if not first and 0 < done < total else ""
            self.write(f"{description}: {done}/{total}, {seconds:.0f} s{left}")


def _print_line(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    """One ``hrad: warning: ...`` line."""
    console.print(Text.assemble(("hrad: warning:", "yellow"), f" {' '.join(message.split())}"))


def warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for hrad's commands: a Python warning (a 16-bit image brighter
    than the model's bit depth, other backbone weights than the fit's, a library's) as one
    ``hrad: warning:`` line, not Python's ``file:line: Category: ...`` and the source line under it."""
    print_warning(str(message))


#: where the code without progress callbacks logs its steps (:func:`hrad.progress.log_progress`)
STEP_LOGGER = "hrad.detectors"


class _ProgressRecords(logging.Handler):
    """Steps logged by code without a progress callback (:func:`hrad.progress.log_progress`:
    a detector's epochs, PatchCore's coreset) into the command's bars or lines; that code's
    warnings as warning lines (this handler takes the place of Python's last-resort printer).
    A step a pool's worker process logged (:func:`hrad.runners.worker_job`) is its job's stage,
    ``<job's label>: <description>`` (``job i/n`` or the job's own, ``tile (1, 2)``): concurrent
    jobs get bars and lines of their own."""

    def __init__(self, update: ProgressCallback) -> None:
        super().__init__(logging.INFO)
        self.update = update

    def emit(self, record: logging.LogRecord) -> None:
        step = progress_of(record)
        job = worker_job(record)
        if step is not None and job is not None:
            done, total, description = step
            description = f"{job.label}: {description}"
            if isinstance(self.update, (_LogLines, _Bars)):
                self.update.step(done, total, description, job, record.created)
            else:
                self.update(done, total, description)
        elif step is not None:
            self.update(*step)
        elif record.levelno >= logging.WARNING:
            print_warning(record.getMessage())


class ServerLines(logging.Handler):
    """``hrad serve``'s log records as console lines, which an open log file gets like every other
    line: uvicorn's startup, shutdown and errors, the service's request lines (method, path,
    status, seconds; uvicorn's own access lines, which have no time, are off), and the warnings
    and errors of any other library (python-multipart's on a malformed upload, asyncio's). Built
    by ``logging.config.dictConfig`` in each process uvicorn configures (:func:`server_log_config`),
    which also shows Python warnings there as hrad's lines (:func:`warning_line`; a worker process
    is not started by hrad's ``main``, which does it in the parent). In a worker process of
    ``hrad serve --workers N``, where no log file is open, ``log`` (the parent's) is opened
    without a header and the console teed into it as in the parent."""

    def __init__(self, log: str | None = None) -> None:
        super().__init__(logging.INFO)
        warnings.showwarning = warning_line
        if log is not None and log_file.current() is None:
            try:
                log_file.start(Path(log), console, print_warning, header=False)
            except HradError as error:  # the parent could write it; tell, and serve on
                print_warning(str(error))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING:
                level = ("hrad: error:", "red") if record.levelno >= logging.ERROR else ("hrad: warning:", "yellow")
                console.print(Text.assemble(level, f" {' '.join(record.getMessage().split())}"))
            else:
                _print_line(record.getMessage())
            if record.exc_info:
                _print_line(logging.Formatter().formatException(record.exc_info))
        except Exception:  # noqa: BLE001 (logging's rule: a handler never raises)
            self.handleError(record)


def server_log_config() -> dict[str, Any]:
    """uvicorn's ``log_config`` for ``hrad serve``: uvicorn's and the service's records through
    :class:`ServerLines` (uvicorn's access logger silenced: the service logs each request with
    its duration), into the open log file too, worker processes included. Every other logger's
    warnings and errors go the same way (the root's handler), not as bare lines on stderr that
    the log file never got; their info and debug records stay out."""
    log = log_file.current()
    lines = {"()": f"{__name__}.ServerLines", "log": str(log.path.absolute()) if log is not None else None}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"hrad": lines},
        "loggers": {
            "uvicorn": {"handlers": ["hrad"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "hrad.service": {"handlers": ["hrad"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["hrad"], "level": "WARNING"},
    }


@contextmanager
def _with_logged_steps(update: ProgressCallback) -> Iterator[None]:
    """Feed ``update`` the detectors' progress log records while the block runs."""
    logger = logging.getLogger(STEP_LOGGER)
    handler, level = _ProgressRecords(update), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def progress_bars(interval: float = LOG_INTERVAL) -> Iterator[ProgressCallback]:
    """A callback that shows one bar per distinct description in a terminal, else plain lines
    (:class:`_LogLines`, one per ``interval`` seconds and stage at most). The console's lines
    reach an open log file with everything else it prints; with bars, the file gets lines of its
    own."""
    if not console.is_terminal:
        lines = _LogLines(interval)
        with _with_logged_steps(lines):
            yield lines
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bars:
        log = log_file.current()
        update = _Bars(bars, _LogLines(interval, log.write) if log is not None else None)
        with _with_logged_steps(update):
            yield update


class _Bars:
    """A callback showing one rich bar per distinct description. A worker job's stage leaves
    when it reaches its total (the pool's own bar counts finished jobs): a pool of many jobs
    would otherwise leave a finished bar per job and stage on the screen. ``lines``: the log
    file's plain lines, fed the same updates."""

    def __init__(self, bars: Progress, lines: _LogLines | None = None) -> None:
        self.bars = bars
        self.lines = lines
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, done: int, total: int, description: str) -> None:
        self._show(done, total, description)
        if self.lines is not None:
            self.lines(done, total, description)

    def _show(self, done: int, total: int, description: str) -> None:
        if description not in self.tasks:
            self.tasks[description] = self.bars.add_task(description, total=total)
        self.bars.update(self.tasks[description], completed=done, total=total)

    def step(self, done: int, total: int, description: str, job: WorkerJob | None, now: float) -> None:
        """One update of a worker job's stage ``description`` (``job`` and ``now``: as :class:`_LogLines` takes them)."""
        self._show(done, total, description)
        if self.lines is not None:
            self.lines.step(done, total, description, job, now)
        if job is not None and done >= total:
            self.bars.remove_task(self.tasks.pop(description))
