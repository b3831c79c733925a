"""Names of the staging folders behind hrad's atomic writes, and whether one was left by a killed
process: a model artifact (:mod:`hrad.artifact`) and a report folder (:mod:`hrad.reports.folder`)
are each written into a hidden staging folder and moved into place only when complete; a folder
whose process was killed (SIGKILL, a power cut) is removed by the next write beside it. Imports
nothing of hrad, so every layer may use it.
"""

from __future__ import annotations

import os
import socket
import uuid


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


__all__ = ["left_by_dead_process", "staging_name"]
