"""User-facing errors.

Every mistake a user can make (bad path, corrupt image, wrong mask size, an artifact from
another version) raises :class:`HradError` with one line that names the file and the problem.
The CLI prints that line and exits with status 2; it never shows a traceback for them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: the list :func:`collecting_warnings` gathers this context's warnings in (None: not gathered)
_COLLECTED: ContextVar[list[str] | None] = ContextVar("hrad_collected_warnings", default=None)


class HradError(Exception):
    """A user-facing error whose message is one self-explanatory line."""

    #: the CLI's exit status for it: 2, the user's mistake (1: :class:`DivergedError`)
    exit_status: int = 2


class InputError(HradError):
    """Bad input data: missing, unreadable, empty or inconsistent files."""


class ImageTooLargeError(InputError):
    """An image whose header declares more pixels than the pixel budget allows (never decoded)."""


class ConfigError(HradError):
    """An invalid configuration or an option combination that cannot work."""


class ArtifactError(HradError):
    """A model artifact that is missing, incomplete or from an incompatible version."""


class DivergedError(HradError):
    """A model whose training loss, maps or thresholds came out NaN or inf on finite, varied
    input (a diverged training, a backbone gone degenerate): not the user's data, so the CLI
    exits 1; the model is never written, as it could not be loaded again."""

    exit_status = 1


class ExportCheckError(HradError):
    """An exported graph that does not reproduce its source within tolerance (that graph is not written)."""


class WeightsError(HradError):
    """Pretrained weights that cannot be found; the message says how to provide them."""


def naming_file(path: str | os.PathLike[str], error: HradError) -> str:
    """``error``'s line, prefixed with ``path`` when it does not name the file: checks of a
    decoded image see only the array ("image array: image is 512x40, ..."), not its file."""
    text = " ".join(str(error).split()).removeprefix("image array: ")
    return text if str(path) in text else f"{path}: {text}"


def named(path: str | os.PathLike[str], error: HradError) -> HradError:
    """``error`` again, its line naming ``path`` (:func:`naming_file`): raise it ``from None``."""
    return type(error)(naming_file(path, error))


class NotFittedError(RuntimeError):
    """A detector used before ``fit`` or ``load_state_dict``: a programming error, not a user
    mistake, so it is no :class:`HradError` (models loaded from artifacts are always fitted)."""


def warn(message: str, stacklevel: int = 1, collect: bool = True) -> None:
    """A warning for the user (one ``hrad: warning:`` line in the CLI, Python's warning in the
    API) that :func:`collecting_warnings` also hands to the request it concerns (``hrad serve``
    returns it with the result; not with ``collect`` False, when the caller tells the request
    apart: :func:`tell_request`). ``stacklevel`` counts from the caller of this function."""
    if collect:
        tell_request(message)
    warnings.warn(message, stacklevel=stacklevel + 1)


def tell_request(message: str) -> None:
    """Hand ``message`` to the request being served (:func:`collecting_warnings`) only, with no
    warning: for a warning the model gives once (one console line per model) that every
    response it concerns should still carry. Nothing outside a served request."""
    collected = _COLLECTED.get()
    if collected is not None:
        collected.append(message)


@contextmanager
def collecting_warnings() -> Iterator[list[str]]:
    """The :func:`warn` messages of this thread (context) while the block runs, in order, as well
    as their usual warning. ``warnings.catch_warnings`` would do it by swapping process-wide
    filters and hooks, which concurrent requests in threads (and any library's own
    ``catch_warnings``) restore in the wrong order; a context variable is each thread's own, and
    the warnings module's once-per-location filter cannot hide a repeated upload's warning."""
    collected: list[str] = []
    token = _COLLECTED.set(collected)
    try:
        yield collected
    finally:
        _COLLECTED.reset(token)
