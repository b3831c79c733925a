"""Folders watched for new images (``hrad predict --watch``): a camera or a line PC writing files
into a folder while hrad predicts them as they come.

A file is handed out once it is complete, and a writer gives no sign of that, so the rule is
the one file-drop tools use: a file is ready when its size and modification time held still
over one poll interval (a writer that renames a finished temporary file into place is ready at
the first poll that sees it twice). A file that changes after it was handed out (rewritten, or
caught half-written by a writer that paused longer than the interval) is handed out again.
Polling, not OS notifications: it works the same on network shares, where inotify sees nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from hrad.data.images import expand_image_paths, is_image_file
from hrad.errors import InputError

#: seconds between two looks at the watched folders: a file is handed out 1-2 intervals after
#: its last write
POLL_SECONDS = 1.0

_Identity = tuple[int, int]  # size, modification time (ns)


def _identity(path: Path) -> _Identity | None:
    try:
        status = path.stat()
    except OSError:  # vanished between the listing and now, or a dangling link
        return None
    return status.st_size, status.st_mtime_ns


class FolderWatch:
    """The image files of ``folders`` that are new or changed and have held still since the
    previous :meth:`poll`. ``seen``: files already handled (as they are now), not handed out
    again unless they change."""

    def __init__(self, folders: Sequence[str | os.PathLike[str]], seen: Iterable[Path] = ()) -> None:
        self.folders = [Path(folder) for folder in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise InputError(f"{folder}: {'not a folder' if folder.exists() else 'folder not found'}")
        # by absolute path: a file given as /line/a.png and listed as line/a.png is one file
        self._handed: dict[str, _Identity | None] = {os.path.abspath(path): _identity(path) for path in seen}
        self._pending: dict[Path, _Identity | None] = {}

    def _listing(self) -> dict[Path, _Identity | None]:
        current: dict[Path, _Identity | None] = {}
        for folder in self.folders:
            try:
                entries = list(folder.iterdir())
            except FileNotFoundError:
                raise InputError(f"{folder}: watched folder vanished") from None
            except OSError as error:
                raise InputError(f"{folder}: cannot list the watched folder ({error.strerror or error})") from None
            for path in entries:
                if is_image_file(path):
                    current[path] = _identity(path)
        return current

    def poll(self) -> list[Path]:
        """The files ready now, sorted by name (the order a camera's numbered files were written)."""
        current = self._listing()
        ready = sorted(
            path
            for path, identity in current.items()
            if identity is not None and self._handed.get(os.path.abspath(path)) != identity and self._pending.get(path) == identity
        )
        for path in ready:
            self._handed[os.path.abspath(path)] = current[path]
        self._pending = {
            path: identity for path, identity in current.items() if identity is not None and self._handed.get(os.path.abspath(path)) != identity
        }
        return ready

    def batches(self, idle_seconds: float | None = None, poll_seconds: float | None = None, quiet: bool = False) -> Iterator[list[Path]]:
        """The ready files of each poll that found some, until ``idle_seconds`` pass without one
        (None: forever; the caller stops it, e.g. on Ctrl-C), one look every ``poll_seconds``
        (default :data:`POLL_SECONDS`). ``quiet``: an empty list after each poll that found
        none too, so the caller's periodic work (the summary page) goes on while no image comes."""
        interval = POLL_SECONDS if poll_seconds is None else poll_seconds
        quiet_since = time.monotonic()
        while True:
            ready = self.poll()
            if ready or quiet:
                yield ready
            if ready or self._pending:  # a file being written is not idleness
                quiet_since = time.monotonic()
            elif idle_seconds is not None and time.monotonic() - quiet_since >= idle_seconds:
                return
            time.sleep(interval)


def watched_images(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[Path]]:
    """The images ``paths`` name now (:func:`~hrad.data.images.expand_image_paths`; an empty
    folder is fine, images will come) and the folders among them, to watch."""
    images = expand_image_paths(paths, allow_empty=True)
    folders: dict[str, Path] = {}  # a folder named twice is watched once
    for path in paths:
        if Path(path).is_dir():
            folders.setdefault(os.path.abspath(path), Path(path))
    if not folders:
        raise InputError("--watch: give at least one folder to watch (only files were given)")
    return images, list(folders.values())
