"""The process's one ``openvino.Core``, shared by the backbone runtime and exported-model sessions.

Each ``openvino.Core`` loads its own CPU plugin, and each CPU plugin instance points the calling
thread's alternate signal stack at a buffer of its own and frees that buffer when it is destroyed,
restoring the stack it replaced only if its own is still the current one (OpenVINO's
``SigAltStackSetup``). Two plugins released in the order they were made (a Core per compile,
models dropped first-made first) left the main thread's alternate stack on freed memory, and the
next Python signal handler (all run on that stack: SIGTERM from ``docker stop``, Ctrl-C) killed the
process with SIGSEGV and no traceback; the whole test suite died so at tests/test_watch.py's
SIGTERM (``tests/test_openvino_signals.py``). One Core, made on first use and never released,
loads one plugin whose stack stays valid. Imports nothing of hrad and not torch.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def openvino_core() -> Any:
    """This process's one ``openvino.Core`` (the caller has checked that openvino is installed)."""
    import openvino

    return openvino.Core()


__all__ = ["openvino_core"]
