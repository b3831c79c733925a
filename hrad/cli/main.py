"""The ``hrad`` command line: fit, predict, evaluate, demo and data tools.

User mistakes (HradError) print one line and exit with status 2, never a traceback; a model that
diverged (DivergedError) one line and status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from hrad.cli.calibrate import FEW_IMAGES, calibrate
from hrad.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    ORT_SPINNING_HELP,
    Terminated,
    counted,
    print_error,
    raise_terminated,
    tracking,
)
from hrad.cli.compare import compare
from hrad.cli.evaluate import evaluate
from hrad.cli.info import described_facts, model_page, read_model
from hrad.cli.predict import predict, predict_distributed
from hrad.cli.progress import console, print_warning, progress_bars, warning_line
from hrad.errors import DivergedError, HradError, InputError
from hrad.staging import missing_folders, remove_created

if TYPE_CHECKING:
    from hrad.prediction import Thresholds

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown", help="High-resolution industrial anomaly detection.")


def _file_identity(path: Path) -> list[Any]:
    """A training file as a resumed fit must find it again: path, size, modification time."""
    try:
        status = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), status.st_size, status.st_mtime_ns]


def _clear_checkpoints(folder: Path) -> None:
    """Remove what a fit wrote into ``folder`` (checkpoints, half-written ones, ``fit.json``), and
    the folder when that leaves it empty: anything else a user keeps there stays."""
    for written in [*folder.glob("*.pt"), *folder.glob(".*.pt.*"), folder / "fit.json"]:
        written.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _prepare_checkpoints(folder: Path, this_fit: dict[str, Any]) -> None:
    """Keep ``folder``'s training checkpoints only when they are of this fit (the same config,
    training files and region, recorded in its ``fit.json``), saying so; else start it afresh."""
    record = folder / "fit.json"
    described = json.dumps(this_fit, sort_keys=True)
    if any(folder.glob("*.pt")):
        try:
            previous = record.read_text()
        except OSError:
            previous = None
        if previous == described:
            console.print(f"resuming from the training checkpoints in {folder} (remove it to train from the start)")
            return
        console.print(f"the training checkpoints in {folder} are of another fit (its config or files changed): training from the start")
    _clear_checkpoints(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(described)


def _overrides(
    backbone: str | None,
    weights: Path | None,
    detector: str | None,
    strategy: str | None,
    image_size: int | None,
    tile: int | None,
    stride: int | None,
    device: str | None,
) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if backbone or weights:
        overrides["backbone"] = {k: v for k, v in (("name", backbone), ("weights", weights)) if v is not None}
    if detector:
        overrides["detector"] = {"name": detector}
    strategy_options = {k: v for k, v in (("name", strategy), ("image_size", image_size), ("tile", tile), ("stride", stride)) if v is not None}
    if strategy and "tile" in strategy_options:
        from hrad.strategies import STRATEGIES

        fields = STRATEGIES.get(strategy).config_type.model_fields
        if "tile" not in fields and "patch_size" in fields:  # HiAD calls its tiles patches
            strategy_options["patch_size"] = strategy_options.pop("tile")
    if strategy_options:
        overrides["strategy"] = strategy_options
    if device:
        overrides["device"] = device
    return overrides


def merge_assignments(overrides: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings (values parsed as YAML) onto nested overrides."""
    import yaml

    from hrad.config import yaml_problem
    from hrad.errors import ConfigError

    for assignment in assignments:
        key, separator, raw = assignment.partition("=")
        parts = key.strip().split(".")
        if not separator or not all(parts):
            raise ConfigError(f"--set {assignment!r}: expected section.field=value, e.g. strategy.tile=512")
        target = overrides
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {assignment!r}: {part} is not a section")
        try:
            target[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {assignment!r}: value is not valid YAML {yaml_problem(error, where=False)}") from None
    return overrides


def _print_thresholds(thresholds: Thresholds | None) -> None:
    """The thresholds a fit learned and from how many held-out images: 5 good images hold out
    one, whose score is the image threshold, and the fit said only 'model written to m'."""
    if thresholds is None:
        return  # fit warns about it
    count = len(thresholds.image_scores)
    at = f" at {thresholds.sigmas:g} sigmas" if thresholds.sigmas is not None else ""
    rough = (
        f" (rough: a mean and std of {count} score{'' if count == 1 else 's'}; fit on more good images, or run hrad "
        f"calibrate on {FEW_IMAGES} or more)"
        if count < FEW_IMAGES
        else ""
    )
    console.print(
        f"thresholds from {count} held-out normal image{'' if count == 1 else 's'}{at}: image {thresholds.image:.6g}, "
        f"pixel {thresholds.pixel:.6g}{rough}"
    )


@app.command()
def fit(
    data: Annotated[Path, typer.Option(help="Dataset root (MVTec AD, VisA, MVTec AD 2) or a folder of good images")],
    out: Annotated[Path, typer.Option(help="Model directory to write")],
    config: Annotated[Path | None, typer.Option(help="YAML config (backbone/detector/strategy sections)")] = None,
    backbone: Annotated[str | None, typer.Option(help="efficientnet-lite0, dinov2-vits14, wide-resnet50, ...")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local backbone weights file")] = None,
    detector: Annotated[str | None, typer.Option(help="patchcore, padim, students, varad, ...")] = None,
    strategy: Annotated[str | None, typer.Option(help="downsample, tiled, tiled-ensemble, hiad, mrf")] = None,
    image_size: Annotated[int | None, typer.Option(help="Resize side for downsample (or long side before tiling)")] = None,
    tile: Annotated[int | None, typer.Option(help="Tile / patch size in pixels")] = None,
    stride: Annotated[int | None, typer.Option(help="Tile stride in pixels (default: tile)")] = None,
    category: Annotated[str | None, typer.Option(help="Category: a folder of a multi-category MVTec AD / MVTec AD 2 root, or a VisA object")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    set_options: Annotated[
        list[str] | None, typer.Option("--set", help="Any config field, e.g. --set strategy.assignment=ra --set detector.k=5")
    ] = None,
    roi: Annotated[
        Path | None, typer.Option(help="Region of interest: a mask image, non-zero = inspect (stretched to each image); kept in the model")
    ] = None,
    track: Annotated[
        bool, typer.Option(help="Record the run in MLflow (also on when MLFLOW_TRACKING_URI is set; pip install 'hrad[track]')")
    ] = False,
) -> None:
    """Fit a model on good images and write one artifact.

    Neural detectors keep training checkpoints in ``<out>.checkpoints`` while they train: an
    interrupted fit (Ctrl-C, kill, a crash) resumes where it stopped when the same command runs
    again; the folder is removed once the model is written.
    """
    from hrad.artifact import MANIFEST, artifact_target
    from hrad.config import load_config
    from hrad.data.datasets import training_images
    from hrad.data.images import ImageList, check_pixel_budget
    from hrad.detectors.checkpoints import checkpoints_in
    from hrad.model import AnomalyModel
    from hrad.postprocess.roi import read_roi

    with artifact_target(out):  # a foreign or unwritable --out is refused before the fit; a failed fit leaves no folders it made
        train_paths, validation_paths = training_images(data, category=category)
        train = ImageList(train_paths)
        validation = ImageList(validation_paths) if validation_paths else None
        overrides = _overrides(backbone, weights, detector, strategy, image_size, tile, stride, device)
        model_config = load_config(config, merge_assignments(overrides, set_options or []))
        region = read_roi(roi) if roi is not None else None  # a bad mask now, not after the backbone loaded
        for path in [*train_paths, *validation_paths]:  # headers only, 4 ms an image: a bad file now, not after the others' embedding
            check_pixel_budget(path)
        images = counted(len(train), "image")  # a folder holding one image: '1 image', not '1 images'
        console.print(f"fitting {model_config.detector.name} / {model_config.strategy.name} on {images} of {data}")
        if (out / MANIFEST).is_file():  # said while there is time to stop: the old model stays until the new one is written
            console.print(f"{out} holds a model already: this fit replaces it when it ends")
        checkpoints = out.parent / f"{out.name}.checkpoints"
        this_fit = {
            "config": model_config.model_dump(mode="json"),
            "files": [_file_identity(path) for path in [*train_paths, *(validation_paths or [])]],
            "roi": _file_identity(roi) if roi is not None else None,
        }
        _prepare_checkpoints(checkpoints, this_fit)
        with tracking("fit", track, out.name) as run:
            try:
                with progress_bars() as progress, checkpoints_in(checkpoints):
                    model = AnomalyModel(model_config).fit(train, validation, progress, roi=region)
            except BaseException as error:
                if any(checkpoints.glob("*.pt")) and not isinstance(error, DivergedError):  # a diverged training resumed diverges again
                    console.print(f"training checkpoints kept in {checkpoints}: the same command resumes from them")
                else:
                    _clear_checkpoints(checkpoints)
                raise
            if model.bit_depth is not None:
                found = f"; brightest training pixel {model.brightest[0]}, in {model.brightest[1]}" if model.brightest else "; set, not learned"
                console.print(f"16-bit images: {model.bit_depth} significant bits, scaled to the full range (bit_depth){found}")
            if model.roi is not None:
                height, width = model.roi.mask.shape
                console.print(f"region of interest: {roi}, {width}x{height} mask, {model.roi.inspected:.1%} inspected (stretched to each image)")
            model.save(out)
            _clear_checkpoints(checkpoints)  # the model holds what they were for
            _print_thresholds(model.thresholds)
            console.print(f"model written to {out}")
            if model.thresholds is not None:
                # quoted as a shell needs it: a path with a space, pasted as printed, was two arguments
                console.print(f"next: hrad predict --model {shlex.quote(str(out))} IMAGES --out FOLDER (hrad info {shlex.quote(str(out))}: what the model is)")
            if model.thresholds is None:
                print_warning(
                    f"no held-out normal images ({images.replace('image', 'training image')}, threshold.validation_fraction "
                    f"{model_config.threshold.validation_fraction}), so the model has no thresholds: hrad predict gives "
                    "scores and maps but no decisions or masks unless given --threshold / --pixel-threshold; "
                    "fit on more good images to get them"
                )
            if run is not None:
                run.log_config(model_config.model_dump(mode="json"))
                run.log_history(model.training_history)
                if model.thresholds is not None:
                    run.log_metrics({"image_threshold": model.thresholds.image, "pixel_threshold": model.thresholds.pixel})
                run.set_tags({"hrad.data": data, "hrad.model": out.resolve()})
                run.log_artifacts(out, "model")


# commands in modules of their own: hrad/cli/predict.py, evaluate.py, calibrate.py, compare.py
app.command()(predict)
app.command()(evaluate)
app.command("calibrate")(calibrate)
app.command("compare")(compare)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working directory for data, models and report")] = Path("hrad_demo"),
    size: Annotated[int, typer.Option(help="Side of the synthetic images")] = 2048,
    backbone: Annotated[str, typer.Option(help="Backbone for both models")] = "efficientnet-lite0",
) -> None:
    """Build a synthetic high-resolution dataset, fit downsampling vs full-resolution tiling, compare."""
    from hrad.cli.demo import run_demo

    run_demo(out, size=size, backbone=backbone)


@app.command("make-hd")
def make_hd(
    source: Annotated[Path, typer.Option(help="MVTec-layout dataset with anomalous test images and masks")],
    out: Annotated[Path, typer.Option(help="Where to write the high-resolution dataset")],
    size: Annotated[int, typer.Option(help="Target long side (2048 = 2K, 4096 = 4K)")] = 2048,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the defect hosts and placements")] = 0,
    category: Annotated[str | None, typer.Option(help="Category: a folder of a multi-category MVTec AD / MVTec AD 2 root, or a VisA object")] = None,
) -> None:
    """Build a HiAD-style high-resolution benchmark with tiny (transplanted) and large defects."""
    from hrad.data.hd_builder import build_hd_dataset

    path = build_hd_dataset(source, out, target_size=size, seed=seed, category=category)
    console.print(f"high-resolution dataset written to {path}")


#: what hrad serve says when SIGTERM (systemctl stop, a Kubernetes pod stop) or SIGINT (Ctrl-C)
#: stopped it, after uvicorn's graceful shutdown; it then exits 0, with or without --workers (one
#: process exited 143 on SIGTERM, and stopped on Ctrl-C without a word of it)
STOPPED_ON = "hrad serve stopped on {}"

#: hrad serve's default --graceful-timeout: seconds a stop waits for the requests in flight
DEFAULT_GRACEFUL_TIMEOUT = 30.0


def _serve_in_this_process(app_: Any, graceful_timeout: float | None = None, **options: Any) -> str | None:
    """``uvicorn.run(app_, **options)`` in this process (its one-process path, with
    :class:`hrad.cli.serving.StoppingServer`: a second Ctrl-C or ``graceful_timeout`` ends the
    process at once), and the signal that stopped it, SIGTERM or SIGINT, None when it stopped on
    its own. uvicorn catches both while it serves, shuts down gracefully, then raises the signal
    again into the handler it found: hrad's for SIGTERM (:class:`Terminated`), and for SIGINT the
    one set here, which notes it and raises KeyboardInterrupt as Python's own does."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from hrad.cli.serving import StoppingServer

    interrupted: list[int] = []

    def note_interrupt(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    server = StoppingServer(uvicorn.Config(app_, **options), graceful_timeout)
    previous = signal.signal(signal.SIGINT, note_interrupt)
    try:
        server.run()
    except Terminated:
        return "SIGTERM"
    except KeyboardInterrupt:
        return "SIGINT"
    finally:
        signal.signal(signal.SIGINT, previous)
        if server.timer is not None:
            server.timer.cancel()
    if not server.started:  # as uvicorn.run: the app's startup failed (it logged why)
        sys.exit(STARTUP_FAILURE)
    return "SIGINT" if interrupted else None


@app.command()
def serve(
    model: Annotated[
        Path, typer.Option(help="Model directory written by hrad fit, or an exported model (.onnx / OpenVINO .xml, run without torch)")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = 8000,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 (default: the model's)")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest accepted upload in MB")] = 256.0,
    timeout: Annotated[float, typer.Option(min=0.001, metavar="SECONDS", help="Seconds a request may take (body, queue, prediction)")] = 300.0,
    health_details: Annotated[
        bool, typer.Option("--health-details", help="Show the model's path, config and weight sources on /health")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, metavar="N", help="Worker processes, each with its own copy of the model")] = 1,
    max_queue: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="Prediction requests in flight (uploading, waiting, running) per worker; past that /ready answers 503 "
            "and a new one is refused at once with 503 and Retry-After, before its upload is read",
        ),
    ] = 4,
    runtime: Annotated[
        str | None, typer.Option(help="Exported models: onnxruntime or openvino (default: openvino for .xml, else onnxruntime)")
    ] = None,
    ort_spinning: Annotated[bool, typer.Option("--ort-spinning", help=ORT_SPINNING_HELP)] = False,
    no_page: Annotated[
        bool, typer.Option("--no-page", help="No page at GET / (by default it lets a browser drop images on the model)")
    ] = False,
    graceful_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            metavar="SECONDS",
            help="Seconds Ctrl-C or SIGTERM waits for the requests in flight; past that the server stops without them, "
            "exit status 130 (Ctrl-C) or 143 (SIGTERM)",
        ),
    ] = DEFAULT_GRACEFUL_TIMEOUT,
) -> None:
    """Serve a model over HTTP: GET /health, /ready, /metrics; POST /predict (field 'image'), /predict/batch (field 'images').

    GET / is a page to try the model in a browser: drop images, see each decision, score,
    overlay and defect regions (it calls /predict like any client).

    The pixel budget is hrad's (--max-pixels before the command, or HRAD_MAX_PIXELS). With
    --workers N, N processes share the port and each loads the model (N x its memory); the model
    is loaded once here first, so a broken artifact fails before anything listens.

    Each request is one line on stderr (client, method, path, status, seconds), beside uvicorn's
    startup and shutdown lines; hrad --log-file writes them to its file too, workers' included.
    Ctrl-C or SIGTERM shuts down gracefully (requests in flight are answered) and exits 0. A
    second Ctrl-C, or --graceful-timeout passing first, stops at once without the requests in
    flight, says how many, and exits 130 (Ctrl-C) or 143 (SIGTERM).
    """
    try:
        import uvicorn

        from hrad.service import create_app
    except ImportError as error:
        from hrad.errors import ConfigError

        raise ConfigError(f"hrad serve needs {error.name}, which is not installed: pip install 'hrad[serve]' beside hrad, or on a "
            "runtime install pip install fastapi uvicorn python-multipart prometheus-client") from None

    from hrad.cli.serving import check_address
    from hrad.data.images import max_pixels

    check_address(host, port)
    settings = {
        "model_path": str(model),
        "device": device,
        "max_upload_bytes": int(max_upload_mb * 2**20),
        "max_pixels": max_pixels(),
        "request_timeout": timeout,
        "health_details": health_details,
        "max_queue": max_queue,
        "runtime": runtime,
        "ort_spinning": ort_spinning,
        "page": not no_page,
    }
    app_ = create_app(**settings)  # type: ignore[arg-type]
    console.print(f"serving {model} on http://{host}:{port}" + (f" with {workers} worker processes" if workers > 1 else ""))
    if not no_page:
        console.print(f"try it in a browser: http://{host}:{port}/")
    from hrad.cli.progress import server_log_config

    logs = server_log_config()  # uvicorn's lines and one per request (with its seconds) on the console and in a log file
    if workers == 1:
        stopped_by = _serve_in_this_process(
            app_, graceful_timeout, host=host, port=port, workers=1, log_config=logs, access_log=False
        )
        if stopped_by is not None:
            console.print(STOPPED_ON.format(stopped_by))
        return
    import json

    from uvicorn.config import STARTUP_FAILURE

    from hrad.service import SETTINGS_ENV

    del app_
    os.environ[SETTINGS_ENV] = json.dumps(settings)
    # uvicorn.run(workers=N) itself, but with its supervisor at hand: a worker that failed to start
    # stops uvicorn's parent as a SIGTERM does, and uvicorn.run returned normally, status 0
    config = uvicorn.Config(
        "hrad.service:app_from_environment", factory=True, host=host, port=port, workers=workers, log_config=logs, access_log=False
    )
    from hrad.cli.serving import Supervisor

    supervisor = Supervisor(config, [config.bind_socket()], graceful_timeout)
    supervisor.run()
    supervisor.stop_unfinished()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        print_error("a worker process could not start (its error is above); the server stopped")
        sys.exit(1)
    if supervisor.stopped_by is not None:
        console.print(STOPPED_ON.format(supervisor.stopped_by))


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Model directory written by hrad fit")],
    out: Annotated[Path, typer.Option(help="ONNX (or OpenVINO .xml) file to write; the sidecar goes next to it as .json")],
    tile_size: Annotated[int | None, typer.Option(help="Export for this tile (downsample: image) side instead")] = None,
    export_format: Annotated[
        str, typer.Option("--format", help="onnx, or openvino (IR .xml/.bin converted from the verified ONNX, written beside it)")
    ] = "onnx",
    precision: Annotated[
        str, typer.Option(help="OpenVINO precision: fp32, fp16 (weights), or int8 (post-training quantisation of the backbone, needs --calibration-images)")
    ] = "fp32",
    calibration_images: Annotated[
        Path | None, typer.Option(help="Folder of training images whose network inputs calibrate --precision int8")
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="OpenVINO: largest accepted difference from onnxruntime, relative to the output's magnitude "
            "(default fp32 1e-3, fp16 5e-2, int8 0.25); a larger one refuses the export",
        ),
    ] = None,
) -> None:
    """Export the per-tile network (backbone + detector scoring) to ONNX or OpenVINO with a JSON sidecar."""
    from hrad.errors import ConfigError
    from hrad.export import export_onnx, export_openvino
    from hrad.model import load

    if export_format not in ("onnx", "openvino"):
        raise ConfigError(f"export format {export_format!r} is unknown; choose onnx or openvino")
    if tolerance is not None and export_format != "openvino":
        raise ConfigError("--tolerance is for --format openvino")
    if calibration_images is not None and export_format != "openvino":
        raise ConfigError("--calibration-images is for --format openvino --precision int8")
    from hrad.data.images import prepare_output_file
    from hrad.loading import EXPORTED_SUFFIXES

    what = "OpenVINO model" if export_format == "openvino" else "ONNX model"
    prepare_output_file(out, what)
    # the files written beside --out are checked as it is, before the model loads: an existing
    # folder at the sidecar's path was found only after the whole export, as a traceback
    sidecar_path = out.with_suffix(".json")
    if sidecar_path == out:
        raise ConfigError(f"--out {out}: the sidecar is written to the .json beside the model; give the model another suffix")
    if out.suffix not in EXPORTED_SUFFIXES:  # hrad predict, evaluate, serve and info tell an export by it
        raise ConfigError(
            f"--out {out}: an export's file name ends in .onnx (or .xml, OpenVINO), which hrad predict, evaluate and serve "
            f"know it by; give {out.with_suffix('.onnx').name}"
        )
    prepare_output_file(sidecar_path, f"{what}'s sidecar")
    for suffix in (".xml", ".onnx", ".bin") if export_format == "openvino" else ():
        if out.with_suffix(suffix) != out:
            prepare_output_file(out.with_suffix(suffix), f"{what}'s {suffix} file")
    fitted = load(model, device="cpu")
    if export_format == "openvino":
        sidecar = export_openvino(
            fitted, out, precision=precision, tile_size=tile_size, calibration_images=calibration_images, tolerance=tolerance
        )
        console.print(f"OpenVINO {precision} model written to {out.with_suffix('.xml')}, sidecar to {sidecar}")
        return
    sidecar = export_onnx(fitted, out, tile_size=tile_size)
    console.print(f"ONNX model written to {out}, sidecar to {sidecar}")


app.command("predict-distributed")(predict_distributed)  # hrad/cli/predict.py


@app.command("ad2-export")
def ad2_export(
    model: Annotated[Path, typer.Option(help="Model fitted on an MVTec AD 2 object (train/good + validation/good)")],
    data: Annotated[Path, typer.Option(help="MVTec AD 2 object folder")],
    out: Annotated[Path, typer.Option(help="Submission folder (anomaly_images/..., float16 TIFF)")],
    category: Annotated[str | None, typer.Option(help="Object folder of an MVTec AD 2 root holding several")] = None,
) -> None:
    """Write an MVTec AD 2 submission: float16 TIFF maps and thresholded masks for the private splits."""
    from hrad.ad2 import export_submission
    from hrad.data.datasets import load_dataset
    from hrad.data.images import prepare_output_dir
    from hrad.model import load

    dataset = load_dataset(data, layout="mvtec_ad2", category=category)
    prepare_output_dir(out)
    with progress_bars() as progress:
        counts = export_submission(load(model), dataset, out, progress=progress)
    console.print(f"submission written to {out}: " + ", ".join(f"{split} {count}" for split, count in counts.items()))


@app.command("ad2-evaluate")
def ad2_evaluate(
    model: Annotated[Path, typer.Option(help="Model fitted on an MVTec AD 2 object")],
    data: Annotated[Path, typer.Option(help="MVTec AD 2 object folder")],
    out: Annotated[
        Path | None, typer.Option(help="Write metrics.json here: a new or empty folder, or an earlier one of ad2-evaluate (replaced)")
    ] = None,
    category: Annotated[str | None, typer.Option(help="Object folder of an MVTec AD 2 root holding several")] = None,
) -> None:
    """MVTec AD 2 metrics on test_public: AU-PRO and AU-ROC to FPR 0.05, SegF1 at the validation threshold."""
    from hrad import strict_json
    from hrad.ad2 import evaluate_ad2
    from hrad.data.datasets import load_dataset
    from hrad.data.images import atomic_write_bytes
    from hrad.model import load
    from hrad.reports.folder import ReportFolder, json_object_with

    # --out holds one run's metrics.json: an earlier one of this command is replaced, a folder of anything else refused
    report = ReportFolder(
        "hrad ad2-evaluate", frozenset({"metrics.json"}), "metrics.json", lambda folder: json_object_with(folder / "metrics.json", ("aupro_05", "seg_f1"))
    )
    if out is not None:
        report.check(out)  # before the model loads
    dataset = load_dataset(data, layout="mvtec_ad2", category=category)
    with progress_bars() as progress:
        metrics = evaluate_ad2(load(model), dataset, progress=progress)
    text = strict_json.dumps(metrics, indent=1, default=str)  # undefined metrics as null
    if out is not None:
        with report.staged(out) as staging:
            atomic_write_bytes(staging / "metrics.json", text.encode("utf-8"))
    typer.echo(text)  # the command's result: stdout, as hrad evaluate's metrics


@app.command("info")
def info(
    model: Annotated[Path, typer.Argument(help="Model directory (hrad fit) or exported .onnx / .xml (hrad export)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as JSON (numbers, not sentences: for scripts)")] = False,
    page: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Also write an HTML page: the facts, held-out scores against the threshold, losses, region")
    ] = None,
) -> None:
    """What a model is, without loading it: strategy, detector, backbone, fitted size, bit depth,
    region of interest, thresholds and training losses (an export needs no torch for this)."""
    facts, roi = read_model(model)  # one reading of the manifest or sidecar (and its region) for the lines and the page
    if page is not None:
        from hrad.data.images import atomic_write_bytes, text_bytes

        if page.is_dir() or not page.parent.is_dir():
            raise InputError(f"{page}: cannot write the page there ({'a folder' if page.is_dir() else 'its folder does not exist'})")
        try:
            atomic_write_bytes(page, text_bytes(model_page(facts, roi)))
        except OSError as error:  # a read-only or full file system, a folder that takes no files (/proc)
            raise InputError(f"{page}: cannot write the page there ({error.strerror or error})") from None
        console.print(f"page written to {page}")
    if as_json:  # the command's output: stdout, like list, options and schema
        from hrad import strict_json

        typer.echo(strict_json.dumps(facts, indent=2))
        return
    for key, value in described_facts(facts).items():
        typer.echo(f"{key}: {'not recorded (saved before hrad kept it)' if value is None else value}")


@app.command("list")
def list_components() -> None:
    """Registered backbones, detectors and strategies."""
    import hrad.detectors
    import hrad.features
    import hrad.strategies

    # the command's output: stdout, like options and schema (messages go to stderr)
    typer.echo("backbones:  " + ", ".join(hrad.features.BACKBONES.names()))
    typer.echo("detectors:  " + ", ".join(hrad.detectors.DETECTORS.names()))
    typer.echo("strategies: " + ", ".join(hrad.strategies.STRATEGIES.names()))
    typer.echo("options of each: hrad options detector|strategy|backbone [NAME]")


@app.command("options")
def options(
    section: Annotated[
        str | None, typer.Argument(help="detector, strategy, backbone, postprocess, threshold or model")
    ] = None,
    name: Annotated[str | None, typer.Argument(help="A registered detector/strategy/backbone name (default: all)")] = None,
) -> None:
    """Every config option with its type, default and meaning (set with --set section.field=value)."""
    from hrad.options import SECTIONS, config_class, option_rows, section_names

    if section is None:
        for listed in SECTIONS:
            registered = section_names(listed)
            typer.echo(f"{listed}: " + (", ".join(registered) if registered else "(one set of options)"))
        typer.echo("show one: hrad options detector patchcore; a whole-config JSON schema: hrad schema")
        return
    names: list[str | None] = [name] if name is not None or section not in ("detector", "strategy") else list(section_names(section))
    for index, each in enumerate(names):
        model = config_class(section, each)
        title = f"{section} {each}" if each else section
        if name is None and section == "backbone":
            title += f" (one config for every backbone: {', '.join(section_names('backbone'))})"
        summary = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        typer.echo(("\n" if index else "") + f"{title}: {summary}")
        for option in option_rows(model):
            typer.echo(f"  {section}.{option.name}: {option.type} = {option.default}")
            if option.doc:
                typer.echo(f"      {option.doc}")


@app.command("schema")
def schema(
    out: Annotated[Path | None, typer.Option(help="Write the schema to this file instead of stdout")] = None,
) -> None:
    """JSON schema of a whole model config file (for editors and validation of YAML configs)."""
    from hrad.options import model_schema

    text = json.dumps(model_schema(), indent=2)
    if out is None:
        typer.echo(text)
    else:
        try:
            out.write_text(text + "\n")
        except OSError as error:
            raise InputError(f"{out}: cannot write the schema ({error.strerror or error})") from None
        console.print(f"schema written to {out}")


def _version(context: typer.Context, value: bool) -> None:
    # not while main() reads the command line again to learn its paths (resilient parsing, as click's --help)
    if value and not context.resilient_parsing:
        from hrad.version import __version__

        typer.echo(f"hrad {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
    max_pixels: Annotated[
        float | None,
        typer.Option(
            "--max-pixels",
            min=1,
            metavar="N",
            help="Pixel budget: images whose header declares more pixels are refused before decoding "
            "(default 268435456 = 2**28, e.g. 16384x16384 or 8192x32768; env HRAD_MAX_PIXELS)",
        ),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file",
            envvar="HRAD_LOG_FILE",
            show_envvar=False,
            metavar="PATH",
            help="Also write the command's messages, warnings, errors, progress and exit status to PATH as plain "
            "lines with ISO timestamps, appended below a header line, whatever the terminal shows (env HRAD_LOG_FILE)",
        ),
    ] = None,
) -> None:
    """High-resolution industrial anomaly detection."""
    if log_file is not None:  # first: a log file that cannot be written stops the command before any work
        from hrad.cli.log_file import start

        start(log_file, console, print_warning)
    if max_pixels is not None:
        from hrad.data.images import set_max_pixels

        set_max_pixels(max_pixels)
    elif os.environ.get("HRAD_MAX_PIXELS"):
        from hrad.data.images import max_pixels as budget_in_force

        # HRAD_MAX_PIXELS=abc failed every image of a predict (exit 3) and every upload of a
        # server, one line each, instead of the command once
        budget_in_force()


#: Usage errors of the command-line parser. Typer ships its own copy of click
#: (``typer.TyperException`` is the base of its ``ClickException``); older typer raised
#: click's own. Both are caught, so a dependency upgrade cannot turn them into tracebacks.
_USAGE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException, click.ClickException)
_ABORTS: tuple[type[BaseException], ...] = (typer.Abort, click.exceptions.Abort, EOFError)
#: modules of a full install that a torch-free runtime install (requirements-runtime.txt) lacks, or
#: lacked before its evaluate support (sklearn, psutil, matplotlib: an older runtime install)
_FULL_INSTALL_ONLY = frozenset(
    {"torch", "faiss", "sklearn", "skimage", "yaml", "safetensors", "psutil", "matplotlib", "transformers", "onnx", "numba"}
)


def _missing_full_install(error: ModuleNotFoundError) -> str | None:
    """The one-line reason when a command needs a package only the full install has, else None."""
    missing = (error.name or "").split(".")[0]
    if missing not in _FULL_INSTALL_ONLY:
        return None
    return (
        f"this command needs {missing}, which is not installed: a runtime install (requirements-runtime.txt) "
        "runs exported models only (hrad predict, evaluate, serve and info on an .onnx or .xml); install hrad itself "
        "(pip install -e .) for the rest"
    )


#: the parameters (of any command) that name an input, a file or folder that must exist, with what
#: a missing one is called, as the commands' own checks call it ("model not found"); None: as a
#: missing image (:func:`~hrad.data.images.missing_reason`)
_INPUT_PATHS: dict[str, str | None] = {
    "model": "model", "data": "dataset folder", "source": "dataset folder", "config": "config file", "weights": "weights file",
    "reports": "report folder", "calibration_images": "folder", "paths": None, "roi": None,
}  # fmt: skip


def _command_values(args: list[str]) -> dict[str, Any] | None:
    """The parameters of the command in the command line ``args`` as click reads them, defaults
    included, without running anything (None: no command, or the line does not parse)."""
    group = typer.main.get_command(app)
    try:
        with group.make_context("hrad", list(args), resilient_parsing=True) as context:
            if len(context.args) >= len(args):  # no command
                return None
            name = args[len(args) - len(context.args) - 1]  # hrad's own options come before the command
            command = group.get_command(context, name)  # type: ignore[attr-defined]  # a group (typer's own click)
            if command is None:
                return None
            with command.make_context(name, list(context.args), parent=context, resilient_parsing=True) as given:
                return dict(given.params)
    except _USAGE_ERRORS:
        return None


def _missing_input(args: list[str]) -> str | None:
    """The line naming the first input path of the command line ``args`` that does not exist, as
    the full install names it (None: every one exists, or the line does not parse). A command
    imports what needs torch before it checks its inputs, so on a runtime install a mistyped path
    read 'this command needs torch', which hid the user's mistake behind an install it may not need."""
    from hrad.data.images import missing_reason
    from hrad.loading import EXPORTED_SUFFIXES

    values = _command_values(args)
    if values is None:
        return None
    for parameter, noun in _INPUT_PATHS.items():
        value = values.get(parameter)
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(path, Path) and not path.exists():
                if noun is None or path.is_symlink():  # a broken link says where it points
                    return missing_reason(path, or_folder=parameter == "paths")  # images or folders of them
                exported = parameter == "model" and path.suffix in EXPORTED_SUFFIXES
                return f"{path}: {'exported model' if exported else noun} not found"
    return None


def _usage_error(error: Exception) -> int:
    """Print a parser error as one line (with the command's --help hint); the exit status."""
    code = int(getattr(error, "exit_code", 2))
    if any(kind.__name__ == "NoArgsIsHelpError" for kind in type(error).__mro__):
        show = getattr(error, "show", None)
        if callable(show):  # ``hrad`` or ``hrad fit`` with nothing: the help text, status 2
            show()
            return code
    message = error.format_message() if hasattr(error, "format_message") else str(error)
    context = getattr(error, "ctx", None)
    hint = f" (see '{context.command_path} --help')" if context is not None else ""
    print_error(f"{message}{hint}")
    return code


#: the parameters (of any command) that name what it writes: a folder, or a file in folders it makes
_OUTPUT_PATHS = ("out", "page")


def _new_output_folders(args: list[str]) -> list[Path]:
    """The folders on the output paths of the command line ``args`` that do not exist yet (each
    output's outermost first): what the command may create, for :func:`_removed_after_failure`."""
    values = _command_values(args) or {}
    return [folder for name in _OUTPUT_PATHS if isinstance(values.get(name), Path) for folder in missing_folders(values[name])]


@contextlib.contextmanager
def _removed_after_failure(folders: list[Path]) -> Iterator[None]:
    """A command that fails (an error, a usage mistake, Ctrl-C, SIGTERM, a crash) removes the
    ``folders`` it made that are still empty: ``hrad predict --model /missing --out OUT`` left an
    empty OUT, made before the model was found missing."""
    try:
        yield
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            remove_created(folders)
        raise
    except BaseException:
        remove_created(folders)
        raise


def main() -> None:
    """The console script: user mistakes are one line and status 2, never a traceback; warnings one
    line each; with --log-file, the log's last line is the exit status and wall time. A failed
    command leaves no folder it made for its output."""
    from hrad.cli.log_file import ended_with_status

    with ended_with_status(), _removed_after_failure(_new_output_folders(sys.argv[1:])):
        _run()


def _run() -> None:
    previous = signal.signal(signal.SIGTERM, raise_terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = warning_line
            result = app(standalone_mode=False)
    except HradError as error:
        print_error(str(error))
        sys.exit(error.exit_status)  # 2: the user's mistake; 1: a model that diverged
    except ModuleNotFoundError as error:
        reason = _missing_full_install(error)
        if reason is None:
            raise
        print_error(_missing_input(sys.argv[1:]) or reason)  # a mistyped path first: the user's mistake
        sys.exit(2)
    except _ABORTS:
        console.print("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except _USAGE_ERRORS as error:
        sys.exit(_usage_error(error))
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        console.print("terminated")
        sys.exit(EXIT_TERMINATED)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if result == EXIT_INTERRUPTED and not isinstance(result, bool):
        console.print("interrupted")
    if isinstance(result, int) and not isinstance(result, bool) and result:
        sys.exit(result)


if __name__ == "__main__":
    main()
