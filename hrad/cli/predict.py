"""``hrad predict`` and ``hrad predict-distributed``: maps, masks, overlays, regions and scores
for unlabeled images, through the one writer (:mod:`hrad.outputs`).

``hrad predict`` predicts in this process (:mod:`hrad.pipeline` overlaps decoding and writing
with the model), optionally watching folders for new images (:mod:`hrad.data.watch`) and
resuming an interrupted run; ``predict-distributed`` spreads images over Ray actors.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from hrad.cli.common import (
    DEFAULT_BATCH_IMAGES,
    ORT_SPINNING_HELP,
    MapFormat,
    Terminated,
    print_error,
    report_batch,
)
from hrad.cli.progress import console, print_warning, progress_bars
from hrad.errors import HradError
from hrad.loading import load_predictor


def predict(
    model: Annotated[
        Path, typer.Option(help="Model directory written by hrad fit, or an exported model (.onnx / OpenVINO .xml, run without torch)")
    ],
    paths: Annotated[list[Path], typer.Argument(help="Images or folders of images")],
    out: Annotated[Path, typer.Option(help="Output directory")],
    map_format: Annotated[
        MapFormat, typer.Option("--format", help="png16 (on the model's fixed scale, stored in the PNG and maps.json) or tiff (float32)")
    ] = MapFormat.png16,
    overlays: Annotated[bool, typer.Option(help="Write overlays on the model's fixed colour scale, with contours")] = True,
    masks: Annotated[bool, typer.Option(help="Write 0/255 mask PNGs of map > pixel threshold")] = True,
    regions: Annotated[bool, typer.Option(help="Write `<stem>_regions.json`: the mask's connected regions (box, area, peak, mean)")] = True,
    threshold: Annotated[float | None, typer.Option(help="Image-score threshold (default: the model's, from held-out normals)")] = None,
    pixel_threshold: Annotated[float | None, typer.Option(help="Pixel threshold for masks and contours (default: the model's)")] = None,
    sigmas: Annotated[
        float | None, typer.Option(help="Both thresholds at mean + SIGMAS x std of the model's held-out normals (fit used 3)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 (default: the model's)")] = None,
    runtime: Annotated[
        str | None, typer.Option(help="Exported models: onnxruntime or openvino (default: openvino for .xml, else onnxruntime)")
    ] = None,
    ort_spinning: Annotated[bool, typer.Option("--ort-spinning", help=ORT_SPINNING_HELP)] = False,
    batch_images: Annotated[
        int, typer.Option(min=1, metavar="N", help="Images predicted together (their tiles share backbone batches; up to 2N are decoded ahead); 1 = one at a time")
    ] = DEFAULT_BATCH_IMAGES,
    watch: Annotated[
        bool, typer.Option("--watch", help="Then watch the folders: predict each new (or rewritten) image once its file holds still; Ctrl-C ends")
    ] = False,
    watch_idle: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="With --watch: end after this long without a new image")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep what an interrupted run into --out finished; predict only the rest")
    ] = False,
    summary: Annotated[
        bool,
        typer.Option(help="Write index.html: flagged images first as thumbnails of their overlays (thumbs/), failed ones, the score histogram"),
    ] = True,
) -> None:
    """Anomaly maps, masks, overlays and scores for unlabeled images (one writer: hrad.outputs).

    A file that cannot be read or predicted is reported in one line and as a ``failed`` row of
    scores.csv; every other file is still processed. Rows are written (and flushed) as they
    finish. Exit status 0 when all succeeded, 3 when some failed. An exported model (hrad
    export) runs through onnxruntime or OpenVINO and needs no torch. With --watch, images a
    camera writes into the folders are predicted as they come (hrad.data.watch), until Ctrl-C,
    a SIGTERM or --watch-idle; the summary and exit status then cover every image. With --resume,
    the images an earlier run of the same model and settings into --out predicted are kept
    (rows and files) and only the others predicted (failed ones again, and rewritten ones).
    index.html in --out shows the batch: flagged images first, then failed and passed ones
    (written at the end, and every 30 s while watching).
    """
    from hrad.data.images import expand_image_paths, prepare_output_dir, read_pixels
    from hrad.data.watch import FolderWatch, watched_images
    from hrad.errors import ConfigError
    from hrad.outputs import (
        RUN_FOLDER,
        SCORES_COLUMNS,
        OutputRow,
        OutputStems,
        PredictionWriter,
        ScoresWriter,
        failed_row,
        resumable_rows,
    )
    from hrad.pipeline import overlapped_batches

    if watch_idle is not None and not (watch and watch_idle >= 0):
        raise ConfigError(f"--watch-idle {watch_idle:g}: " + ("only with --watch" if not watch else "must be 0 or more seconds"))
    images, folders = watched_images(paths) if watch else (expand_image_paths(paths), [])
    prepare_output_dir(out, paths)
    watcher = FolderWatch(folders, seen=images) if watch else None  # the files as listed, before any is predicted
    fitted = load_predictor(model, device, runtime, ort_spinning)
    decided = fitted.decision_thresholds(threshold, pixel_threshold, sigmas)  # a bad override fails before any image
    writer = PredictionWriter(
        out, fitted.thresholds, map_format=map_format.value, overlays=overlays, masks=masks, regions=regions, thumbnails=summary
    )
    run = {"model": str(model.resolve()), "thresholds": {"image": decided[0], "pixel": decided[1]}}
    kept = resumable_rows(out, images, writer.describe() | {"run": run}) if resume else {}
    if not resume:
        _tell_an_earlier_run_is_replaced(out)
    if kept:
        console.print(f"resuming: {len(kept)} of {len(images)} images already predicted into {out} (kept)")
    writer.write_description(run | {RUN_FOLDER: os.getcwd()})
    stems = OutputStems(images, kept)  # kept images keep their files' stems, the others take none of them
    failed: dict[Path, OutputRow] = {}  # by image: a watched file that failed half-written and then came whole did not fail
    counts = [len(kept), len(images)]  # rows predicted (or kept), files found: a file retried counts in both
    done = set(kept)  # the images with a row: the summary counts each once
    flagged = {path for path, row in kept.items() if dict(zip(SCORES_COLUMNS, row, strict=False)).get("is_anomalous") == "true"}

    def compute(batch: list[tuple[Path, str]], batch_images: list[Any]) -> list[Any]:
        names = [str(path) for path, _ in batch]  # what warnings about a decoded image call it
        if len(batch_images) > 1:  # an exported model's predictor runs them one by one
            return list(fitted.predict_batch(batch_images, threshold=threshold, pixel_threshold=pixel_threshold, sigmas=sigmas, names=names))
        return [
            fitted.predict(image, threshold=threshold, pixel_threshold=pixel_threshold, sigmas=sigmas, name=name)
            for image, name in zip(batch_images, names, strict=True)
        ]

    def finish(item: tuple[Path, str], image: Any, prediction: Any) -> OutputRow:
        return writer.write(item[0], item[1], image, prediction)

    page = SummaryPage(out, model) if summary else None

    def predict_all(paths_now: list[Path], progress: Any, scores: ScoresWriter) -> None:
        # the next batch of images is decoded and finished ones written in threads while the model computes
        # (hrad.pipeline); one bad image must not stop the others: its stage's error becomes its row
        items = [(path, stems(path)) for path in paths_now]
        # images stay in their file's pixel type (uint8/uint16): read_pixels, converted per tile
        stages = overlapped_batches(items, lambda item: read_pixels(item[0]), compute, finish, batch=batch_images, writers=1)
        for (path, _), outcome in stages:
            row = failed_row(path, outcome) if isinstance(outcome, Exception) else outcome
            scores.write(row)
            if row.error is not None:
                failed[path] = row
                print_error(f"skipped: {row.error}")
            else:
                failed.pop(path, None)
            if row.is_anomalous:
                flagged.add(path)
            else:
                flagged.discard(path)
            counts[0] += 1
            done.add(path)
            progress(counts[0], counts[1], "predicting")
            if page is not None:
                page.stale = True

    def tell_the_rest() -> None:  # a stopped run says what is left and how to go on
        if counts[0] < counts[1]:
            console.print(f"{counts[1] - counts[0]} of the {counts[1]} images found were not predicted: the same command with --resume predicts them")

    ended: HradError | None = None  # what ended a watch other than the user (a watched folder vanished)
    try:
        with progress_bars() as progress, ScoresWriter(out / "scores.csv", kept=list(kept.values())) as scores:
            predict_all([path for path in images if path not in kept], progress, scores)
            if watcher is not None:
                until = f"Ctrl-C, or {watch_idle:g} s without one, ends" if watch_idle is not None else "Ctrl-C ends"
                console.print(f"watching {', '.join(str(folder) for folder in folders)} for new images ({until})")
                if page is not None:
                    page.write()  # the images found so far, before the first new one comes
                try:
                    # every poll, with new images or none: a page behind them is rewritten within WATCH_INTERVAL
                    for ready in watcher.batches(idle_seconds=watch_idle, quiet=page is not None):
                        if ready:
                            counts[1] += len(ready)
                            predict_all(ready, progress, scores)
                        if page is not None and page.stale:
                            page.write(every=SummaryPage.WATCH_INTERVAL)
                except (KeyboardInterrupt, Terminated):  # how a watch is ended: every finished row is written
                    console.print("watch ended")
                    tell_the_rest()
                except HradError as error:  # told after the summary of what the watch did
                    ended = error
                else:
                    console.print(f"watch ended: no new image for {watch_idle:g} s")
    except (KeyboardInterrupt, Terminated):
        if page is not None:
            page.write(tell=True)
        tell_the_rest()
        raise
    if page is not None:
        page.write(tell=True)
    report_batch(len(done), list(failed.values()), out, ended, flagged=len(flagged))


def _tell_an_earlier_run_is_replaced(out: Path) -> None:
    """One warning when ``out`` holds an earlier run's scores.csv and this run (not --resume)
    replaces it: a second predict into the same folder dropped the first run's rows without a
    word, and the first run's maps and overlays stayed beside the new ones, in no table."""
    from hrad.outputs import scores_records

    try:
        earlier = sum(1 for _ in scores_records(out / "scores.csv"))
    except (OSError, ValueError, UnicodeDecodeError):  # none, or not one of hrad's: nothing to say of it
        return
    print_warning(
        f"{out} holds an earlier run's scores.csv ({earlier} row{'' if earlier == 1 else 's'}): this run replaces it and "
        "index.html (the files of images it does not predict again stay); --resume keeps its predictions and predicts only the rest"
    )


class SummaryPage:
    """``hrad predict``'s ``index.html`` (:func:`hrad.outputs.write_summary_page`), rewritten from
    scores.csv when asked; a page that cannot be written is one warning, never a failed run."""

    #: seconds between two rewrites while watching (each reads scores.csv and lists the folder)
    WATCH_INTERVAL = 30.0

    def __init__(self, out: Path, model: Path) -> None:
        self.out = out
        self.facts = {"model": str(model.resolve())}
        self.written = time.monotonic()
        self.broken = False
        #: rows were written since the page was (set by the caller)
        self.stale = False

    def write(self, every: float = 0.0, tell: bool = False) -> None:
        """Rewrite the page, unless it was written less than ``every`` seconds ago."""
        from hrad.outputs import write_summary_page

        if self.broken or time.monotonic() - self.written < every:
            return
        try:
            path = write_summary_page(self.out, self.facts | {"written": datetime.now().astimezone().isoformat(timespec="seconds")})
        except (OSError, ValueError, UnicodeDecodeError) as error:
            self.broken = True
            print_warning(f"{self.out / 'index.html'}: summary page not written ({' '.join(str(error).split())})")
            return
        self.written = time.monotonic()
        self.stale = False
        if tell:
            console.print(f"summary page: {path}")


def predict_distributed(
    model: Annotated[Path, typer.Option(help="Model directory written by hrad fit (shared storage on a cluster)")],
    paths: Annotated[list[Path], typer.Argument(help="Images or folders of images")],
    out: Annotated[Path, typer.Option(help="Output directory for maps and scores.csv")],
    workers: Annotated[int, typer.Option(min=1, metavar="N", help="Ray actors, each holding one loaded model")] = 1,
    gpus_per_worker: Annotated[
        float, typer.Option(min=0.0, metavar="GPUS", help="GPUs per actor: 0 = CPU, 0.5 = two actors share a GPU")
    ] = 0.0,
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto or ray://host:10001 (default: start Ray locally)")] = None,
    map_format: Annotated[MapFormat, typer.Option("--format", help="png16 (model's fixed scale) or tiff (float32)")] = MapFormat.png16,
    overlays: Annotated[bool, typer.Option(help="Write overlays on the model's fixed colour scale")] = False,
    masks: Annotated[bool, typer.Option(help="Write 0/255 mask PNGs of map > pixel threshold")] = True,
    regions: Annotated[bool, typer.Option(help="Write `<stem>_regions.json`: the mask's connected regions (box, area, peak, mean)")] = True,
    threshold: Annotated[float | None, typer.Option(help="Image-score threshold (default: the model's)")] = None,
    pixel_threshold: Annotated[float | None, typer.Option(help="Pixel threshold for masks (default: the model's)")] = None,
    sigmas: Annotated[float | None, typer.Option(help="Both thresholds at mean + SIGMAS x std of the held-out normals")] = None,
    summary: Annotated[bool, typer.Option(help="Write index.html: flagged images first as thumbnails (thumbs/), failed ones, the score histogram")] = True,
) -> None:
    """Anomaly maps and scores for many images with Ray actors (local GPUs or a cluster); same files as hrad predict."""
    from hrad.data.images import expand_image_paths, prepare_output_dir
    from hrad.distributed import PredictOptions, predict_many_ray

    options = PredictOptions(map_format.value, overlays, masks, threshold, pixel_threshold, sigmas, regions, thumbnails=summary)

    images = expand_image_paths(paths)
    prepare_output_dir(out, paths)
    with progress_bars() as progress:
        rows = predict_many_ray(
            model, images, out, num_gpus_per_worker=gpus_per_worker, workers=workers, address=address, progress=progress,
            options=options,
        )
    failed = [row for row in rows if row.error]
    for row in failed:
        print_error(f"skipped: {row.error}")
    if summary and rows:
        SummaryPage(out, model).write(tell=True)
    report_batch(len(rows), failed, out, flagged=sum(bool(row.is_anomalous) for row in rows))
