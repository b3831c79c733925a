"""``hrad calibrate``: a fitted model calibrated again on new good images, without training.

A line's good parts drift from the training images (a new lamp, another batch of material, a
cleaned lens) and the model's thresholds, learned from held-out images of the old parts, start
to flag good parts. Refitting costs the training; calibrating again costs one prediction of
each new good image (two when the maps have a border excess to profile).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hrad.cli.common import counted
from hrad.cli.progress import console, print_warning, progress_bars
from hrad.errors import ConfigError
from hrad.loading import EXPORTED_SUFFIXES
from hrad.prediction import check_finite

#: fewer new good images than this give thresholds from a rough mean and std: said, not refused
FEW_IMAGES = 10


def calibrate(
    model: Annotated[Path, typer.Option(help="Model directory written by hrad fit")],
    paths: Annotated[list[Path], typer.Argument(help="Good images, or folders of them (no defects)")],
    out: Annotated[Path, typer.Option(help="Model directory to write (--model's own path replaces it atomically)")],
    sigmas: Annotated[float | None, typer.Option(help="k of the thresholds' mean + k x std (default: the model's)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 (default: the model's)")] = None,
) -> None:
    """Calibrate a fitted model again on new good images, without training.

    As fit did on its held-out images: the image and pixel thresholds, the image-border profile
    and the strategy's own calibration (a HiAD or ensemble pool's map ranges). The training, bit
    depth and region of interest stay. For exports: calibrate the model, export it again.
    """
    from hrad.artifact import artifact_target
    from hrad.data.images import ImageList, check_pixel_budget, expand_image_paths
    from hrad.model import load

    if model.suffix in EXPORTED_SUFFIXES:
        raise ConfigError(
            f"{model}: an exported model cannot be calibrated; calibrate the model directory it was exported from "
            "(hrad calibrate) and export that again"
        )
    check_finite("sigmas", sigmas, minimum=0)  # before the model loads (minutes for a large one)
    with artifact_target(out):  # refused before any work, like fit; a failed run leaves no folders it made
        files = expand_image_paths(paths)
        for path in files:  # headers only, as fit's: a bad file now, not after the model loaded and the others were read
            check_pixel_budget(path)
        images = ImageList(files)
        fitted = load(model, device=device)
        good = counted(len(images), "good image")
        console.print(f"calibrating {model} on {good}")
        if len(images) < FEW_IMAGES:
            print_warning(f"{good} give{'s' if len(images) == 1 else ''} rough thresholds (a mean and std of {counted(len(images), 'score')}); give {FEW_IMAGES} or more")
        with progress_bars() as progress:
            previous = fitted.calibrate(images, progress, sigmas=sigmas)
        thresholds = fitted.thresholds
        assert thresholds is not None  # calibrate always sets them
        was = (
            f" (was {previous.image:.6g} / {previous.pixel:.6g}, from {len(previous.image_scores)} "
            f"{'good images given to hrad calibrate' if previous.calibrated else 'held-out images'})"
            if previous is not None
            else " (the model had none)"
        )
        console.print(
            f"thresholds from {good} at {thresholds.sigmas:g} sigmas: image {thresholds.image:.6g}, "
            f"pixel {thresholds.pixel:.6g}{was}"
        )
        if previous is not None and not fitted.strategy.needs_calibration:  # else the maps' scale changed too
            above = sum(score > previous.image for score in thresholds.image_scores)
            console.print(f"{above} of the {good} scored above the old image threshold")
        fitted.save(out)
    console.print(f"model written to {out}")
