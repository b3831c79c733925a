"""Measuring time and peak memory of a piece of work, for reports and benchmarks."""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import Any

import psutil


def _loaded_torch() -> Any:
    """torch if this process has imported it, else None: a process without torch (an exported
    model's ``hrad evaluate`` on a runtime install) holds no GPU memory to measure, and
    importing torch here would cost seconds there, or fail."""
    return sys.modules.get("torch")


class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs.

    A background thread samples RSS every ``interval`` seconds; the peak is measured relative
    to nothing (absolute RSS), which is what an operator sizing a machine needs. On CUDA the
    peak allocated GPU memory is recorded too.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, self._process.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        torch = _loaded_torch()
        if torch is not None and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()
        self.peak_rss_mb = self._process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, self._process.memory_info().rss / 2**20)
        self.seconds = time.perf_counter() - self._start
        torch = _loaded_torch()  # imported inside the block: its peak since the process began is the block's
        if torch is not None and torch.cuda.is_available():
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
