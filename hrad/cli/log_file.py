"""``hrad --log-file PATH``: the command's messages and progress also as plain, timestamped lines
in a file, whatever the terminal shows.

The file is a second sink of hrad's console: a render hook (:class:`_Tee`) copies everything
printed on it (warnings, errors, summaries, and the progress lines when stderr is not a
terminal) as plain text; in a terminal, where progress is bars, the progress display adds the
file's own lines (:func:`hrad.cli.progress.progress_bars`). No command knows of the file. Each
line is written and flushed at once, so ``tail -f`` follows a run and a killed run keeps what
was written; a write that fails (disk full) is told once on the console and ends the logging,
not the command.
"""

from __future__ import annotations

import io
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import IO

from rich.console import Console, ConsoleRenderable, RenderableType, RenderHook
from rich.control import Control

from hrad.data.images import TEXT_ERRORS
from hrad.errors import InputError
from hrad.version import __version__


class LogFile:
    """An appended text file of lines, each ``<ISO time> <text>``, flushed one by one; opened with
    a header line (time, hrad's version, the command line) that also separates runs, except in a
    worker process of ``hrad serve --workers N`` (``header=False``), which adds to its parent's."""

    def __init__(self, path: Path, warn: Callable[[str], None], header: bool = True) -> None:
        self.path, self.warn = path, warn
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.file: IO[str] | None = None
        try:
            self.file = open(path, "a", encoding="utf-8", errors=TEXT_ERRORS)  # noqa: SIM115 (closed by close())
            if header:
                self._write(f"=== hrad {__version__}: {shlex.join(['hrad', *sys.argv[1:]])}")
        except OSError as error:
            self._close()
            raise InputError(f"{path}: cannot write the log file ({error.strerror or error})") from None

    def _write(self, text: str) -> None:
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        assert self.file is not None
        self.file.write("".join(f"{stamp} {line}\n" for line in text.splitlines() if line.strip()))
        self.file.flush()

    def write(self, text: str) -> None:
        """``text``'s lines (blank ones left out); a failed write stops the log with one warning."""
        with self.lock:
            if self.file is None:
                return
            try:
                self._write(text)
                return
            except OSError as error:
                failure = error.strerror or str(error)
                self._close()
        self.warn(f"{self.path}: cannot write the log file ({failure}): logging stopped")

    def _close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            with suppress(OSError):
                file.close()

    def close(self, status: int) -> None:
        """The last line: exit status and seconds since the log was opened."""
        self.write(f"=== exit status {status} after {time.monotonic() - self.started:.1f} s")
        with self.lock:
            self._close()


class _Tee(RenderHook):
    """Copies what the console prints, as plain text, into the log file. Bars' screen updates
    (``Control``) and blank lines are left out."""

    def __init__(self, log: LogFile) -> None:
        self.log = log
        self.plain = Console(
            file=io.StringIO(),
            color_system=None,
            soft_wrap=True,
            markup=False,
            highlight=False,
            emoji=False,
            width=200,
        )

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        shown: list[RenderableType] = [
            renderable for renderable in renderables if not isinstance(renderable, Control)
        ]
        if shown:
            with self.plain.capture() as captured:
                self.plain.print(*shown)
            self.log.write(captured.get())
        return renderables


#: the log file of this command and the console it is teed from, while open
_log: tuple[LogFile, Console] | None = None


def start(path: Path, console: Console, warn: Callable[[str], None], header: bool = True) -> None:
    """Open ``path`` (InputError when it cannot be written) and copy ``console``'s output into it;
    ``warn`` tells a later write failure; ``header``: as :class:`LogFile` takes it."""
    global _log
    log = LogFile(path, warn, header)
    console.push_render_hook(_Tee(log))
    _log = log, console


def current() -> LogFile | None:
    """The open log file, if any."""
    return _log[0] if _log is not None else None


@contextmanager
def ended_with_status() -> Iterator[None]:
    """Around the whole command: the log's last line is its exit status (SystemExit's code, 0
    when it returns, 1 on a crash) and wall time; the console is no longer teed after it."""
    global _log
    status = 1
    try:
        yield
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        raise
    finally:
        if _log is not None:
            log, console = _log
            _log = None
            log.close(status)
            console.pop_render_hook()
