"""Training checkpoints of the neural detectors, so an interrupted fit resumes instead of starting over.

Training at the papers' settings takes hours; a Ctrl-C, a ``kill``, a preempted cluster job or a
crash used to lose all of it. While the ``HRAD_CHECKPOINTS`` environment variable names a folder
(``hrad fit`` points it at ``<out>.checkpoints`` and removes that folder once the model is
written), every neural detector's fit saves its position there after an epoch, at most once a
:data:`CHECKPOINT_SECONDS` and always at the end of a stage: the network, the optimisers, the
loss scaler, the random generators, the loss histories and the detector's own training state
(:meth:`~hrad.detectors.neural.NeuralDetector.training_state`). The next fit of the same
detector on the same embeddings (the same command again) continues from there; on the CPU the
result equals an uninterrupted fit exactly (tested for every neural detector).

A checkpoint belongs to one detector and one training set: its file name is a digest of the
detector's class, its config and the bytes of its first embedding batch (only the first: a
detector that does not cache its batches would embed every image again for more), so the
detectors of a HiAD pool or of a tiled ensemble each find their own and a changed config
starts afresh. That the whole training set is the same is the caller's to check: ``hrad fit``
records its files and config next to the checkpoints and clears them when either changed. An environment variable rather than an argument, because pool
detectors train in worker processes, which inherit it. Files are written atomically (a
temporary file, then a rename). They are pickles (optimiser states): resume only from a folder
you wrote.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from hrad.data.images import atomic_write

logger = logging.getLogger(__name__)

#: the folder neural detectors keep their training checkpoints in (unset: none are kept)
CHECKPOINT_ENV = "HRAD_CHECKPOINTS"
#: least seconds between two checkpoints of one fit; a stage's last epoch always writes one
CHECKPOINT_SECONDS = 60.0


@contextmanager
def checkpoints_in(folder: str | os.PathLike[str] | None) -> Iterator[None]:
    """Neural detectors fitted inside keep checkpoints in ``folder`` (None: as outside)."""
    previous = os.environ.get(CHECKPOINT_ENV)
    if folder is not None:
        os.environ[CHECKPOINT_ENV] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CHECKPOINT_ENV, None)
        else:
            os.environ[CHECKPOINT_ENV] = previous


def fit_digest(kind: str, config: BaseModel, batches: Iterable[Tensor]) -> str:
    """What identifies one detector's fit: its class, its config and its first embedding batch."""
    digest = hashlib.sha256(f"{kind}\n{config.model_dump_json()}".encode())
    first = next(iter(batches), None)
    if first is not None:
        values = first.detach().to("cpu", torch.float32).contiguous()
        digest.update(repr(tuple(values.shape)).encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


class TrainingCheckpoint:
    """One fit's checkpoint file: :meth:`load` where it stopped, :meth:`save` where it is now."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = time.monotonic()

    @classmethod
    def for_fit(cls, kind: str, config: BaseModel, batches: Iterable[Tensor]) -> TrainingCheckpoint | None:
        """The checkpoint of this fit in the folder ``HRAD_CHECKPOINTS`` names; None when unset."""
        folder = os.environ.get(CHECKPOINT_ENV)
        if not folder:
            return None
        return cls(Path(folder) / f"{kind}-{fit_digest(kind, config, batches)[:20]}.pt")

    def load(self) -> dict[str, Any] | None:
        """The saved position, or None (no file yet, or one that does not read: started afresh)."""
        if not self.path.is_file():
            return None
        try:
            content = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - a damaged checkpoint costs the time it saved, nothing else
            logger.warning("%s: unreadable training checkpoint (%s); training from the start", self.path, error)
            return None
        return content if isinstance(content, dict) else None

    def due(self, force: bool) -> bool:
        return force or time.monotonic() - self._last >= CHECKPOINT_SECONDS

    def save(self, content: dict[str, Any]) -> None:
        """Write ``content`` atomically (:func:`~hrad.data.images.atomic_write`: an interrupted
        write leaves no half file); a folder that cannot be written is one warning, not a failed fit."""
        try:
            atomic_write(self.path, lambda temporary: torch.save(content, temporary))
        except OSError as error:
            logger.warning("%s: cannot write a training checkpoint (%s); training goes on without", self.path, error)
        self._last = time.monotonic()
