"""What the ``hrad`` commands share: exit statuses, SIGTERM as an exception, the one-line error,
a batch's summary, the map format and batch size options, and the optional MLflow run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from hrad.cli.progress import console
from hrad.errors import HradError

if TYPE_CHECKING:
    from hrad.tracking import TrackedRun

#: Exit status when a command ran but some of its inputs failed (``hrad predict`` over a folder
#: with unreadable images): 0 = all done, 1 = unexpected crash, 2 = usage or input mistake.
EXIT_SOME_FAILED = 3
#: Exit status after Ctrl-C (SIGINT; typer turns KeyboardInterrupt into this status) and after SIGTERM.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

#: hrad predict / evaluate: images predicted together by default. 1: on the 2-core CPU batches of 2
#: and 4 measured no faster than single images (within the run-to-run drift) and 8 slower, while
#: each image more in a batch holds two more decoded images (benchmarks/results/predict_pipeline.md)
DEFAULT_BATCH_IMAGES = 1

#: hrad predict / evaluate / serve: the switch of :func:`hrad.export_runtime.onnxruntime_session`
ORT_SPINNING_HELP = (
    "Exported models on onnxruntime: its threads busy-wait between ops (off by default: on a shared or "
    "loaded CPU they take the cores from the work; predict time off / on measured 0.77-0.88 on a loaded 2-core "
    "CPU, 0.94-1.02 in a shorter pilot: export_spinning.md in benchmarks/results)"
)


class MapFormat(str, Enum):
    png16 = "png16"
    tiff = "tiff"


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a scheduler or ``docker stop``) raised as an exception, so
    the clean-up that Ctrl-C gets runs too: a fit's feature-cache spill folder and a model's
    staging folder are removed, scores.csv keeps its finished rows. A BaseException, so no
    per-image ``except Exception`` takes it for a failed input."""


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler :func:`hrad.cli.main.main` installs."""
    raise Terminated


def counted(count: int, noun: str) -> str:
    """``1 image``, ``2 images``: a count with its noun (``noun`` singular, plural by an s)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def print_error(message: str) -> None:
    """``hrad: error: ...`` on one line (whitespace in ``message`` folded)."""
    console.print(Text.assemble(("hrad: error:", "red"), f" {' '.join(message.split())}"), soft_wrap=True)


def report_batch(total: int, failed: list[Any], out: Path, ended: HradError | None = None, flagged: int | None = None) -> None:
    """Summary line of a batch; exit status 3 (:data:`EXIT_SOME_FAILED`) when inputs failed.
    ``ended``: the error that stopped the batch early, raised after the summary (status 2);
    ``flagged``: how many of the predictions were anomalous (said with the count)."""
    verdict = f": {flagged} flagged anomalous, {total - len(failed) - flagged} passed" if flagged is not None and total > len(failed) else ""
    written = total - len(failed)
    console.print(f"{written} prediction{'' if written == 1 else 's'} written to {out}{verdict}")
    if failed:
        console.print(Text.assemble((f"{len(failed)} of {total} images failed", "red"), f" (status 'failed' in {out / 'scores.csv'})"))
    if ended is not None:
        raise ended
    if failed:
        sys.exit(EXIT_SOME_FAILED)


@contextlib.contextmanager
def tracking(command: str, flag: bool, name: str) -> Iterator[TrackedRun | None]:
    """An MLflow run when tracking is requested (``--track`` or ``MLFLOW_TRACKING_URI``), else None."""
    from hrad.tracking import tracked_run, tracking_requested

    if not tracking_requested(flag):
        yield None
        return
    with tracked_run(command, run_name=name) as run:
        yield run
        console.print(f"MLflow run {run.run_id} recorded")
