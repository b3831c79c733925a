"""User-facing errors.

Every mistake a user can make (bad path, corrupt image, wrong mask size, an artifact from
another version) raises :class:`HradError` with one line that names the file and the problem.
The CLI prints that line and exits with status 2; it never shows a traceback for them.
"""

from __future__ import annotations

import os


class HradError(Exception):
    """A user-facing error whose message is one self-explanatory line."""


class InputError(HradError):
    """Bad input data: missing, unreadable, empty or inconsistent files."""


class ImageTooLargeError(InputError):
    """An image whose header declares more pixels than the pixel budget allows (never decoded)."""


class ConfigError(HradError):
    """An invalid configuration or an option combination that cannot work."""


class ArtifactError(HradError):
    """A model artifact that is missing, incomplete or from an incompatible version."""


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
