"""Names of the staging folders behind hrad's atomic writes, and whether one was left by a killed
process: a model artifact (:mod:`hrad.artifact`) and a report folder (:mod:`hrad.reports.folder`)
are each written into a hidden staging folder and moved into place only when complete; a folder
whose process was killed (SIGKILL, a power cut) is removed by the next write beside it. And the
folders made for an output that a failed write or command removes again (:func:`remove_created`).
Imports nothing of hrad, so every layer may use it.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path


def staging_name(prefix: str) -> str:
    """``PREFIXHOST-PID-RANDOM``: a staging folder's name that tells a later run whose it is
    (:func:`left_by_dead_process`)."""
    return f"{prefix}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def left_by_dead_process(name: str, prefix: str) -> bool:
    """Whether the staging folder ``name`` (:func:`staging_name` of ``prefix``) is a process's of
    this host that no longer lives (killed), so nothing will finish or remove it."""
    owner, _, pid = name[len(prefix) :].rpartition("-")[0].rpartition("-")
    if owner != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process
        return False
    return False


def missing_folders(path: Path) -> list[Path]:
    """``path`` and the folders above it that do not exist (not even as a link), outermost first:
    what writing ``path`` may create, recorded before a command runs so that a failed one can
    remove them again (:func:`remove_created`). ``..`` components are skipped: never a folder
    of their own."""
    return [folder for folder in [*reversed(path.parents), path] if folder.name != ".." and not os.path.lexists(folder)]


def remove_created(created: Sequence[Path]) -> None:
    """Remove the folders made for an output, innermost first, as long as they are empty: one that
    holds anything now (a kept checkpoint, a file written) stays, and so do the folders above it;
    one that was never made is skipped."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def staging_beside(path: Path) -> Path:
    """A new hidden folder beside ``path`` to build its content in (:func:`move_into_place` puts
    it at ``path`` once complete, so a build that fails or is stopped leaves no half-built folder
    that reads as a whole one); the folders of killed builds of ``path`` are removed first.
    OSError when it cannot be made."""
    prefix = f".{path.name}.hrad-building-"
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{prefix}*"):
        if stale.is_dir() and left_by_dead_process(stale.name, prefix):
            shutil.rmtree(stale, ignore_errors=True)
    staging = path.parent / staging_name(prefix)
    staging.mkdir()
    return staging


def move_into_place(staging: Path, path: Path) -> None:
    """The complete folder ``staging`` becomes ``path``, replacing what is there whole."""
    if not os.path.lexists(path):
        staging.rename(path)
        return
    replaced = path.parent / staging_name(f".{path.name}.hrad-replaced-")
    path.rename(replaced)
    staging.rename(path)
    shutil.rmtree(replaced, ignore_errors=True)


__all__ = ["left_by_dead_process", "missing_folders", "move_into_place", "remove_created", "staging_beside", "staging_name"]
