"""Detector-parallel fitting for HiAD's pool (the reference code's multi-GPU mode).

Training features are spilled to disk per image (:class:`FeatureSpill`); a job names the
chunks and patch indices of one detector, so a worker process receives file paths rather
than gigabytes of pickled tensors, and holds only one chunk at a time while iterating. Jobs
run in a ``spawn`` process pool (safe with CUDA and threads); with several CUDA devices the
jobs are spread over them round-robin. Results are identical to fitting in process, because a
job carries everything its detector depends on (class, config with seed, data order).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hrad.detectors.base import Detector, DetectorConfig
from hrad.runners import active_runner, job_runner


@dataclass(frozen=True)
class ChunkRef:
    """Patches ``indices`` (None = all) of one spilled ``n x C x h x w`` chunk file."""

    path: str
    indices: tuple[int, ...] | None = None


class ChunkBatches:
    """Re-iterable embedding batches read lazily from spilled chunks (Detector.fit input)."""

    def __init__(self, chunks: Sequence[ChunkRef], device: str | torch.device = "cpu") -> None:
        self.chunks = list(chunks)
        self.device = device

    def __iter__(self) -> Iterator[Tensor]:
        for ref in self.chunks:
            features = torch.load(ref.path, map_location="cpu", weights_only=True)
            if ref.indices is not None:
                features = features[list(ref.indices)]
            yield features.to(self.device)

    def __len__(self) -> int:
        return len(self.chunks)


class FeatureSpill:
    """A temporary directory of per-image feature chunks, removed by :meth:`close`."""

    def __init__(self, parent: str | None = None) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="hrad-hiad-", dir=parent)
        self.root = Path(self._directory.name)
        self._count = 0

    def write(self, features: Tensor) -> str:
        path = self.root / f"chunk{self._count:06d}.pt"
        self._count += 1
        torch.save(features.detach().cpu().contiguous(), path)
        return str(path)

    def close(self) -> None:
        self._directory.cleanup()

    def __enter__(self) -> FeatureSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class FitJob:
    detector_type: type[Detector]
    config: DetectorConfig
    chunks: tuple[ChunkRef, ...]
    device: str


def run_fit_job(job: FitJob) -> dict[str, Tensor]:
    """Build, fit and return the state of one detector of the pool (CPU tensors)."""
    detector = job.detector_type(job.config)
    detector.fit(ChunkBatches(job.chunks, job.device))
    return {key: value.detach().cpu().contiguous() for key, value in detector.state_dict().items()}


def job_devices(count: int, default: str) -> list[str]:
    """Device per job: round-robin over CUDA devices when there are several, else ``default``."""
    runner = active_runner()
    if runner is not None and runner.device is not None:  # e.g. Ray: each task sees its GPU as "cuda"
        return [runner.device] * count
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1:
        return [f"cuda:{index % gpus}" for index in range(count)]
    return [default] * count


def fit_detectors(jobs: Sequence[FitJob], workers: int) -> list[dict[str, Tensor]]:
    """Run ``jobs`` in order: in process (``workers`` <= 1), in a spawn process pool, or on the
    runner made active by :func:`hrad.runners.use_runner` (e.g. Ray)."""
    return job_runner(min(workers, len(jobs))).map(run_fit_job, jobs)
