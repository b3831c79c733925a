"""A report folder holds one run: the ``--out`` of ``hrad evaluate``, ``hrad compare`` and
``hrad ad2-evaluate``.

Without this, a second run into a folder wrote its files over the first's one by one: a file
the second did not write stayed beside its files, and a run that failed half-way left two runs
mixed. Now a command writes its report into a staging folder inside ``--out``
(``.hrad-staging-HOST-PID-RANDOM``, hidden) and, once every file is written, moves them into
place and removes the files of its previous report that this run did not write. A run that
fails or is stopped leaves the previous report as it was.

A previous report is known by its own files (:class:`ReportFolder`: the names the command writes
and its identifying file's content). A folder holding anything else, a user's file or another
command's output, is refused before any work, in one line naming what it holds: nothing a
command did not write is ever deleted. Staging inside the folder needs only what
:func:`~hrad.data.images.prepare_output_dir` checks, a writable folder (not its parent: a mount
point works), and keeps the folder itself (its permissions, a symlink to it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrad.data.images import prepare_output_dir
from hrad.errors import InputError
from hrad.staging import left_by_dead_process, staging_name

#: the staging folders' prefix (hidden; a killed run's is removed by the next run into the folder)
STAGING_PREFIX = ".hrad-staging-"
#: files a file browser leaves in a folder it showed (macOS Finder, Windows Explorer): no reason to
#: refuse a report folder, and kept as they are
BROWSER_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class ReportFolder:
    """The report one command writes into its ``--out``: ``files``, the names it writes (plain
    files), and ``recognise(folder)``, whether the folder's identifying file is this command's
    (``key_file``, named in the refusal)."""

    command: str
    files: frozenset[str]
    key_file: str
    recognise: Callable[[Path], bool]

    def check(self, folder: Path, inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
        """Before any work: ``folder`` is new, empty or a previous report of the command (then
        created and checked writable, as :func:`~hrad.data.images.prepare_output_dir` does with
        ``inputs``); anything else is a one-line :class:`~hrad.errors.InputError`."""
        folder = Path(folder)
        if folder.is_dir():
            entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith(STAGING_PREFIX) and entry.name not in BROWSER_FILES)
            foreign = next((entry for entry in entries if entry.name not in self.files or entry.is_symlink() or not entry.is_file()), None)
            if foreign is not None or (entries and not self.recognise(folder)):
                if foreign is not None:
                    what = f"it holds {foreign.name}"
                else:
                    what = f"its {self.key_file} is not {self.command}'s" if (folder / self.key_file).exists() else f"it has no {self.key_file}"
                raise InputError(
                    f"{folder}: not empty and not a report of {self.command} ({what}); give a new or empty --out "
                    f"(a report of {self.command} there is replaced whole, nothing else is deleted)"
                )
        return prepare_output_dir(folder, inputs)

    @contextmanager
    def staged(self, folder: Path) -> Iterator[Path]:
        """A staging folder inside ``folder`` (checked again) to write the report into; when the
        block ends without an error its files replace the previous report's, else it is removed
        and the previous report stays."""
        folder = self.check(folder)
        for stale in folder.glob(f"{STAGING_PREFIX}*"):  # a killed run's (SIGKILL, a power cut; a stopped run removes its own)
            if left_by_dead_process(stale.name, STAGING_PREFIX):
                shutil.rmtree(stale, ignore_errors=True)
        staging = folder / staging_name(STAGING_PREFIX)
        staging.mkdir()
        try:
            yield staging
            written = sorted(entry.name for entry in staging.iterdir())
            for name in self.files.difference(written):  # the previous run's, not written this time
                (folder / name).unlink(missing_ok=True)
            for name in written:
                os.replace(staging / name, folder / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def json_object_with(path: Path, keys: Iterable[str]) -> bool:
    """Whether ``path`` is a JSON object holding every one of ``keys`` (how a report's JSON file is
    told from another's)."""
    try:
        content: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(content, dict) and all(key in content for key in keys)


def first_line_is(path: Path, line: str) -> bool:
    """Whether ``path``'s first line is ``line`` (a CSV file's header)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return handle.readline().rstrip("\r\n") == line
    except (OSError, UnicodeDecodeError):
        return False


__all__ = ["STAGING_PREFIX", "ReportFolder", "first_line_is", "json_object_with"]
