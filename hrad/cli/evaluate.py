"""``hrad evaluate``: image and pixel metrics of a model on a labelled test set, what its
thresholds decide, and the report (:mod:`hrad.evaluation`)."""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from hrad import strict_json
from hrad.cli.common import DEFAULT_BATCH_IMAGES, EXIT_SOME_FAILED, ORT_SPINNING_HELP, tracking
from hrad.cli.progress import console, print_warning, progress_bars
from hrad.errors import InputError
from hrad.loading import load_predictor


class MetricProtocol(str, Enum):
    full = "full"
    hiad512 = "hiad512"


def evaluate(
    model: Annotated[
        Path, typer.Option(help="Model directory written by hrad fit, or an exported model (.onnx / OpenVINO .xml, as hrad predict takes)")
    ],
    data: Annotated[Path, typer.Option(help="Labelled dataset root (its test part: no train folder needed)")],
    out: Annotated[
        Path,
        typer.Option(
            help="Report directory (report.html, metrics.json, metrics.md, cases.png, scores.csv): new, empty, or an earlier report, replaced whole"
        ),
    ],
    protocol: Annotated[MetricProtocol, typer.Option(help="full: exact at ground-truth resolution; hiad512: resized to 512")] = MetricProtocol.full,
    category: Annotated[str | None, typer.Option(help="Category: a folder of a multi-category MVTec AD / MVTec AD 2 root, or a VisA object")] = None,
    limit: Annotated[int | None, typer.Option(min=1, metavar="N", help="Evaluate only the first N test images (quick looks)")] = None,
    score_bits: Annotated[
        int,
        typer.Option(
            min=12, max=32, metavar="BITS",
            help="Pixel-metric precision: scores binned to this many bits; 24 = bins 3e-5 of the score wide "
            "(every pixel metric within 1e-5 of exact, measured in `metric_precision.md` of benchmarks/results), "
            "32 = exact for float32 maps",
        ),
    ] = 24,
    track: Annotated[
        bool, typer.Option(help="Record the run in MLflow (also on when MLFLOW_TRACKING_URI is set; pip install 'hrad[track]')")
    ] = False,
    batch_images: Annotated[
        int, typer.Option(min=1, metavar="N", help="Images predicted together (their tiles share backbone batches); metrics do not depend on it")
    ] = DEFAULT_BATCH_IMAGES,
    threshold: Annotated[float | None, typer.Option(help="Image-score threshold whose decisions are measured (default: the model's)")] = None,
    pixel_threshold: Annotated[float | None, typer.Option(help="Pixel threshold whose decisions are measured (default: the model's)")] = None,
    sigmas: Annotated[float | None, typer.Option(help="Both thresholds at mean + SIGMAS x std of the model's held-out normals")] = None,
    runtime: Annotated[
        str | None, typer.Option(help="Exported models: onnxruntime or openvino (default: openvino for .xml, else onnxruntime)")
    ] = None,
    ort_spinning: Annotated[bool, typer.Option("--ort-spinning", help=ORT_SPINNING_HELP)] = False,
) -> None:
    """Image and pixel metrics of a model on a labelled test set.

    Besides the threshold-free metrics: what the model's thresholds (or --threshold,
    --pixel-threshold, --sigmas) decide: good images flagged (false alarms), defective ones
    flagged (per defect type), pixel precision / recall / F1; and the oracle operating points
    to choose a threshold by.

    An exported model (hrad export) is measured by the same code, through its runtime, so its
    metrics can be set beside those of the model directory it came from; its report shows the
    sidecar's model, geometry and postprocess in place of the fit config and has no training
    curve (a note in the report says so). It needs no torch: a runtime install
    (requirements-runtime.txt) evaluates an export on the machine that runs it.

    A test image that cannot be read or predicted (or whose mask cannot be read) is skipped with
    one warning line naming the file and the problem; the metrics cover the rest, metrics.json /
    metrics.md / report.html list the skipped files, and the exit status is 3.

    --out holds one report: an earlier report of hrad evaluate there is replaced whole once the
    new one is written (a failed run leaves it as it was); a folder holding anything else is
    refused before the model loads.
    """

    from hrad.data.datasets import load_dataset
    from hrad.evaluation import EVALUATION_REPORT, reported_model, result_lines
    from hrad.evaluation import evaluate as run_evaluation

    dataset = load_dataset(data, category=category, training=False)  # the model was fitted: the test part is all it needs
    samples = [s for s in dataset.test if s.label >= 0][:limit]
    if not samples:
        raise InputError(f"{data}: no labelled test images")
    EVALUATION_REPORT.check(out)  # before the model loads: new, empty or a previous report (replaced whole)
    fitted = load_predictor(model, None, runtime, ort_spinning)
    given = (threshold, pixel_threshold, sigmas) != (None, None, None)
    decision = fitted.decision_thresholds(threshold, pixel_threshold, sigmas) if given else None  # a bad value fails here
    warnings = _ConsoleWarnings()
    logging.getLogger("hrad.evaluation").addHandler(warnings)
    try:
        with tracking("evaluate", track, out.name) as run:
            with progress_bars() as progress:
                metrics = run_evaluation(
                    fitted, samples, out, protocol=protocol.value, progress=progress, score_bits=score_bits,
                    batch_images=batch_images, decision_thresholds=decision,
                )
            if run is not None:
                reported = reported_model(fitted)
                run.log_config(reported.config)
                run.log_metrics(metrics)
                run.log_history(reported.training_history)
                run.set_tags({"hrad.data": data, "hrad.model": model.resolve(), "hrad.protocol": protocol.value})
                run.log_artifacts(out, "report")
    finally:
        logging.getLogger("hrad.evaluation").removeHandler(warnings)
    # the command's result: stdout, like info, list and options (`hrad evaluate ... > metrics.txt` keeps it)
    typer.echo(strict_json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=1))  # undefined: null
    for line in result_lines(metrics):
        console.print(line, highlight=False)
    console.print(f"report written to {out}")
    if metrics.get("skipped"):
        console.print(
            Text.assemble((f"{len(metrics['skipped'])} of {len(samples)} test images skipped", "red"), f" (listed in {out / 'metrics.json'})")
        )
        sys.exit(EXIT_SOME_FAILED)


class _ConsoleWarnings(logging.Handler):
    """Log records (``hrad.evaluation``'s skipped images) as one ``hrad: warning:`` line each."""

    def emit(self, record: logging.LogRecord) -> None:
        print_warning(record.getMessage())
