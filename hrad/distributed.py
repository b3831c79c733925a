"""Prediction over many images with Ray (:func:`predict_many_ray`).

Ray actors each load the artifact once on their own device, images go to whichever actor is
free, each actor writes its maps, and the driver writes ``scores.csv`` as rows finish (flushed
per row, so an interrupted run keeps them) and rewrites it in input order at the end. An image
that fails (corrupt file, or a worker process that dies on it) becomes a ``failed`` row with the
error, never a failed run. Every path (model, images, output) must be readable from every
worker; workers need ``hrad`` installed (or ship it with ``runtime_env``).

Fitting jobs (ensemble tiles, HiAD's pool) run through :mod:`hrad.runners`, which this module
builds on; it sits above the model, so strategies never import it.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hrad.errors import ConfigError
from hrad.outputs import (
    MapFormat,
    OutputRow,
    PredictionWriter,
    ScoresWriter,
    failed_row,
    output_stems,
    write_scores_csv,
)
from hrad.runners import Setup, _check_gpus, _one_line, _run_setup, _set_threads, _task_error, ray_session

if TYPE_CHECKING:
    from hrad.progress import ProgressCallback


@dataclass(frozen=True)
class _ImageJob:
    index: int
    path: str
    stem: str


@dataclass(frozen=True)
class PredictOptions:
    """What each worker writes and which thresholds decide (see :mod:`hrad.outputs`)."""

    map_format: MapFormat = "png16"
    overlays: bool = False
    masks: bool = True
    threshold: float | None = None
    pixel_threshold: float | None = None
    sigmas: float | None = None
    regions: bool = True
    #: ``thumbs/<stem>.jpg`` for the summary page (:func:`hrad.outputs.write_summary_page`)
    thumbnails: bool = False


class _PredictWorker:
    """A Ray actor holding one loaded model; predicts one image per call."""

    def __init__(
        self,
        model_path: str,
        device: str,
        out_dir: str,
        threads: int,
        token: str,
        setup: Setup | None,
        options: PredictOptions | None = None,
    ) -> None:
        self._error: BaseException | None = None
        try:
            _run_setup(token, setup)
            _set_threads(threads)
            from hrad.model import load

            self.options = options or PredictOptions()
            self.model = load(model_path, device=device)
            self.model.decision_thresholds(
                self.options.threshold, self.options.pixel_threshold, self.options.sigmas
            )
            self.writer = PredictionWriter.for_model(
                out_dir,
                self.model,
                map_format=self.options.map_format,
                overlays=self.options.overlays,
                masks=self.options.masks,
                regions=self.options.regions,
                thumbnails=self.options.thumbnails,
            )
        except Exception as error:  # re-raised by ready(), keeping its type and message
            self._error = error

    def ready(self) -> bool:
        if self._error is not None:
            raise self._error
        return True

    def predict(self, job: _ImageJob) -> OutputRow:
        from hrad.data import images as image_io

        options = self.options
        try:
            image = image_io.read_pixels(job.path)  # its pixel type, converted per tile
            prediction = self.model.predict(
                image,
                threshold=options.threshold,
                pixel_threshold=options.pixel_threshold,
                sigmas=options.sigmas,
                name=str(job.path),
            )
            return self.writer.write(job.path, job.stem, image, prediction)
        except Exception as error:  # one bad image must not stop the others
            return failed_row(job.path, error)


def predict_many_ray(
    model_path: str | os.PathLike[str],
    image_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    num_gpus_per_worker: float = 0.0,
    workers: int = 1,
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    setup: Setup | None = None,
    runtime_env: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    options: PredictOptions | None = None,
) -> list[OutputRow]:
    """Predict ``image_paths`` with ``workers`` Ray actors that each load the model once.

    Actors use ``"cuda"`` when ``num_gpus_per_worker`` > 0 (0.5 = two actors share a GPU),
    else the CPU. Each writes its images' files with :class:`hrad.outputs.PredictionWriter`
    (``options``: map format, masks, overlays, threshold overrides; by default the 16-bit map
    on the model's fixed scale and the mask) into ``out_dir``; the rows come back, and go to
    ``out_dir/scores.csv``, in input order. ``setup`` runs in every actor before it loads the
    model (register plugin detectors there).
    """
    if workers < 1:
        raise ConfigError(f"predict needs at least 1 worker, got {workers}")
    if num_gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise ConfigError(
            f"workers need gpus >= 0 and cpus > 0, got {num_gpus_per_worker} and {cpus_per_worker}"
        )
    model_path, out = str(model_path), Path(out_dir)
    options = options or PredictOptions()
    manifest = None
    if address is None or not address.startswith("ray://"):  # a ray:// driver may not see the files
        from hrad.artifact import read_manifest

        manifest = read_manifest(Path(model_path))
    out.mkdir(parents=True, exist_ok=True)
    if manifest is not None:  # maps.json: how to read the maps back (the scales come from the thresholds)
        from hrad.model import Thresholds

        saved = manifest.get("thresholds")
        thresholds = Thresholds.from_json(saved) if saved else None
        PredictionWriter(  # thumbnails: a file in their folder's place is refused here, before Ray starts
            out, thresholds, options.map_format, options.overlays, options.masks, options.regions, options.thumbnails
        ).write_description()
    paths = [str(path) for path in image_paths]
    jobs = deque(
        _ImageJob(index, path, stem)
        for index, (path, stem) in enumerate(zip(paths, output_stems(paths), strict=True))
    )
    rows: list[OutputRow | None] = [None] * len(paths)
    if paths:
        with ray_session(address, runtime_env) as ray, ScoresWriter(out / "scores.csv") as streamed:
            _check_gpus(ray, num_gpus_per_worker)
            actor_type = ray.remote(_PredictWorker).options(
                num_cpus=cpus_per_worker, num_gpus=num_gpus_per_worker
            )
            arguments = (
                model_path,
                "cuda" if num_gpus_per_worker > 0 else "cpu",
                str(out.resolve()),
                max(1, int(cpus_per_worker)),
                uuid.uuid4().hex,
                setup,
                options,
            )
            actors = [actor_type.remote(*arguments) for _ in range(min(workers, len(paths)))]
            try:
                try:  # a model that cannot load fails the run, with the worker's own error
                    ray.get([actor.ready.remote() for actor in actors])
                except Exception as error:
                    raise _task_error(ray, error) from None
                _distribute(
                    ray, actors, jobs, rows, lambda: actor_type.remote(*arguments), progress, streamed.write
                )
            finally:
                for actor in actors:
                    ray.kill(actor)
    finished = [row for row in rows if row is not None]
    assert len(finished) == len(paths)
    write_scores_csv(out / "scores.csv", finished)
    return finished


def _distribute(
    ray: ModuleType,
    actors: list[Any],
    jobs: deque[_ImageJob],
    rows: list[OutputRow | None],
    new_actor: Callable[[], Any],
    progress: ProgressCallback | None,
    on_row: Callable[[OutputRow], None] | None = None,
) -> None:
    """Give each free actor the next image until none are left; ``on_row`` sees each row as it
    finishes (completion order), so ``scores.csv`` grows while the run goes.

    An actor whose process dies on an image (segfault, out of memory) yields an error row for
    that image and is replaced by a fresh one, so the remaining images still run.
    """
    in_flight: dict[Any, tuple[int, _ImageJob]] = {}

    def submit(slot: int) -> None:
        if jobs:
            job = jobs.popleft()
            in_flight[actors[slot].predict.remote(job)] = (slot, job)

    for slot in range(len(actors)):
        submit(slot)
    done = 0
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            slot, job = in_flight.pop(ref)
            try:
                rows[job.index] = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                reason = _one_line(error).split(" The actor")[0][:200]
                rows[job.index] = failed_row(job.path, f"worker process died on this image ({reason})")
                ray.kill(actors[slot])
                actors[slot] = new_actor()
            finished = rows[job.index]
            if on_row is not None and finished is not None:
                on_row(finished)
            done += 1
            if progress is not None:
                progress(done, len(rows), "predicting (ray)")
            submit(slot)


__all__ = ["PredictOptions", "predict_many_ray"]
