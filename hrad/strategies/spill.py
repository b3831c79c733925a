"""Spilled training embeddings and detector fit jobs: the one format of the pool strategies.

``tiled-ensemble`` (one detector per tile location) and ``hiad`` (a pool of detectors over
patches) both embed every training image once, spill the embeddings to disk and then fit each
detector from its share of them in a job that any :mod:`hrad.runners` runner can run (in
process, in local processes, on Ray). This module is that format:

- :class:`FeatureSpill`: a temporary directory of chunk files, one ``.npy`` array ``n x C x h x w``
  per chunk (both strategies write one chunk per training image: its tile or patch embeddings),
  written whole (:meth:`~FeatureSpill.write`) or row by row into a memory map
  (:meth:`~FeatureSpill.create`); read back memory-mapped, so a job reads only the rows it names;
- :class:`ChunkRef`: rows of one chunk (all of them, or the given indices);
- :class:`ChunkBatches`: a detector's re-iterable fit input over its chunk references: one batch
  per reference (HiAD: one image's patches of that detector), or ``batch_size`` rows at a time
  across references (the ensemble: one tile location of ``batch_size`` images);
- :class:`FitJob` and :func:`run_fit_job`: detector class, config, chunks, device, batching and
  optionally a file the fitted state is written to (so results need not travel back and only one
  detector is resident per worker); jobs carry paths, never tensors, and results equal serial
  fitting because a job holds everything its detector depends on;
- :func:`job_devices` and :func:`fit_detectors`: the devices jobs run on and running the jobs.

Every path must be readable from every worker: on a multi-machine cluster put the spill on
shared storage (``TMPDIR`` or HiAD's ``work_dir``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from hrad.detectors.base import Detector, DetectorConfig
from hrad.runners import JobProgress, active_runner, job_runner


@dataclass(frozen=True)
class ChunkRef:
    """Rows ``indices`` (None = all) of one spilled ``n x C x h x w`` chunk file."""

    path: str
    indices: tuple[int, ...] | None = None


def read_chunk(ref: ChunkRef) -> np.ndarray:
    """The rows a reference names, read from the memory-mapped chunk (a fresh array)."""
    chunk = np.load(ref.path, mmap_mode="r")
    return np.array(chunk) if ref.indices is None else np.asarray(chunk[list(ref.indices)])


class ChunkBatches:
    """Re-iterable embedding batches read lazily from spilled chunks (``Detector.fit`` input).

    ``batch_size`` None: one batch per reference. Otherwise the references' rows in order,
    ``batch_size`` at a time (the last batch may be smaller).
    """

    def __init__(
        self, chunks: Sequence[ChunkRef], device: str | torch.device = "cpu", batch_size: int | None = None
    ) -> None:
        self.chunks = list(chunks)
        self.device = device
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[Tensor]:
        if self.batch_size is None:
            for ref in self.chunks:
                yield torch.from_numpy(read_chunk(ref)).to(self.device)
            return
        pending: list[np.ndarray] = []
        count = 0
        for ref in self.chunks:
            rows = read_chunk(ref)
            while len(rows):
                take = rows[: self.batch_size - count]
                pending.append(take)
                count += len(take)
                rows = rows[len(take) :]
                if count == self.batch_size:
                    yield torch.from_numpy(np.concatenate(pending)).to(self.device)
                    pending, count = [], 0
        if pending:
            yield torch.from_numpy(np.concatenate(pending)).to(self.device)

    def __len__(self) -> int:
        return len(self.chunks)


def _numpy(tensor: Tensor) -> np.ndarray:
    """CPU numpy copy; types numpy lacks (bfloat16) become float32."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.contiguous().numpy()


class FeatureSpill:
    """A temporary directory of ``.npy`` feature chunks, removed by :meth:`close`."""

    def __init__(self, parent: str | None = None, prefix: str = "hrad-spill-") -> None:
        self._directory = tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
        self.root = Path(self._directory.name)
        self._count = 0

    def _next_path(self) -> Path:
        path = self.root / f"chunk{self._count:06d}.npy"
        self._count += 1
        return path

    def write(self, features: Tensor) -> str:
        """Spill a whole ``n x C x h x w`` chunk; returns its path."""
        path = self._next_path()
        np.save(path, _numpy(features))
        return str(path)

    def create(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> tuple[str, np.memmap]:
        """A new chunk as a writable memory map (fill its rows, then ``flush`` and drop it)."""
        path = self._next_path()
        return str(path), np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def close(self) -> None:
        self._directory.cleanup()

    def __enter__(self) -> FeatureSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class FitJob:
    """Everything one detector's fit depends on; picklable (paths, configs, classes)."""

    detector_type: type[Detector]
    config: DetectorConfig
    chunks: tuple[ChunkRef, ...]
    device: str
    #: rows per training batch across chunks; None = one batch per chunk reference
    batch_size: int | None = None
    #: write the fitted state to this safetensors file instead of returning it
    out_path: str | None = None
    #: what the job fits, in a few words (``tile (1, 2)``): its worker's log lines and bars are
    #: called that rather than ``job i/n`` (:func:`hrad.runners.job_label`)
    label: str | None = None


def run_fit_job(job: FitJob) -> dict[str, Tensor]:
    """Build and fit one detector; its state as CPU tensors, or, when the job names ``out_path``,
    written there (an empty dict comes back, and the detector is freed when this returns)."""
    detector = job.detector_type(job.config)
    detector.fit(ChunkBatches(job.chunks, job.device, job.batch_size))
    state = {key: value.detach().cpu().contiguous() for key, value in detector.state_dict().items()}
    if job.out_path is None:
        return state
    save_file(state, job.out_path)
    return {}


def job_devices(count: int, default: str) -> list[str]:
    """Device per job: the runner's when it pins devices (a Ray task sees its GPU as ``"cuda"``),
    round-robin over CUDA devices when there are several, else ``default``."""
    runner = active_runner()
    if runner is not None and runner.device is not None:
        return [runner.device] * count
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1:
        return [f"cuda:{index % gpus}" for index in range(count)]
    return [default] * count


def fit_detectors(
    jobs: Sequence[FitJob],
    workers: int,
    threads_per_worker: int | None = None,
    progress: JobProgress | None = None,
) -> list[dict[str, Tensor]]:
    """Run ``jobs``, results in job order: in process (``workers`` <= 1), in a spawn process
    pool, or on the runner made active by :func:`hrad.runners.use_runner` (e.g. Ray)."""
    return job_runner(min(workers, len(jobs)), threads_per_worker).map(run_fit_job, jobs, progress)
