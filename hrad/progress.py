"""Progress of long work, for the command line's bars and log lines.

Strategies and the model report through a callback (:data:`ProgressCallback`) the caller
passes in. Code whose interface has no place for one (a detector's ``fit(batches)``: its
training epochs, PatchCore's coreset selection) logs a record that carries
``(done, total, description)`` (:func:`log_progress`); the command line turns those records
into the same bars and lines (:func:`hrad.cli.progress.progress_bars`), and any other logging
setup reads them as ordinary INFO lines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

#: ``progress(done, total, description)``: ``done`` of ``total`` steps of the stage ``description``
ProgressCallback = Callable[[int, int, str], None]

#: the attribute of a log record that carries ``(done, total, description)``
PROGRESS = "hrad_progress"


def no_progress(done: int, total: int, description: str) -> None:
    """Default progress callback: report nothing."""


def log_progress(logger: logging.Logger, done: int, total: int, description: str, message: str = "", *args: object) -> None:
    """An INFO record of ``message % args`` (default ``description: done/total``) carrying the step."""
    if logger.isEnabledFor(logging.INFO):
        text, values = (message, args) if message else ("%s: %d/%d", (description, done, total))
        logger.info(text, *values, extra={PROGRESS: (done, total, description)})


def progress_of(record: logging.LogRecord) -> tuple[int, int, str] | None:
    """The step a record of :func:`log_progress` carries; None for any other record."""
    value = getattr(record, PROGRESS, None)
    return value if isinstance(value, tuple) and len(value) == 3 else None
