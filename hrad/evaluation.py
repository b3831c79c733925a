"""``hrad evaluate``: run a fitted model (or its export) over a labelled test set and measure it honestly.

Maps are scored one image at a time at full ground-truth resolution; the pixel metrics
accumulate in bounded memory (see :mod:`hrad.metrics`). Nothing here chooses anything from
the test data: thresholds come from the model's held-out normal images (or are given), and
what they decide is measured as it would be deployed: the good images flagged (false alarms),
the defective images flagged (per defect type too), and pixel precision, recall and F1 at the
pixel threshold. The two oracle operating points (the lowest threshold that flags no good test
image, the highest that flags every defective one) are reported as such, to choose a
threshold by, never as a result.

Precision: pixel metrics bin every score to its top ``score_bits`` bits (default 24, a relative
bin width of 2**-15 ~ 3e-5); ``score_bits=32`` is exact for any float32 map, at the cost of
more bins (memory and time). ``benchmarks/metric_precision.py`` measures the default's error
against that unbinned computation (``benchmarks/results/metric_precision.md``).

Outputs in ``out_dir``: ``metrics.json``, ``metrics.md``, ``cases.png``, ``scores.csv`` and
``report.html`` (self-contained: curves, AUPRO per defect size, training loss, cases, config),
written together (:data:`EVALUATION_REPORT`): a previous report there is replaced whole, a folder
holding anything else is refused before any image is predicted.

A test image that cannot be used (unreadable or corrupt file, unreadable mask, an input the
model refuses: any :class:`~hrad.errors.HradError`) is skipped: one warning line naming the file
and the problem (logger ``hrad.evaluation``), and the metrics cover the other images. The skipped
files are listed under ``skipped`` (path and reason) and counted in ``images_skipped`` in
``metrics.json`` (always) and the returned metrics (when any), in ``metrics.md`` and in
``report.html``.
``hrad evaluate`` exits with status 3 when any were skipped. Any other exception is a bug and
stops the evaluation.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hrad import strict_json
from hrad.comparison import (
    EVALUATION_COLUMNS,
    EVALUATION_SCORES,
    UNDEFINED_NOTE,
    undefined,
    write_evaluation_scores,
)
from hrad.data.datasets import Sample
from hrad.data.images import TEXT_ERRORS, read_pixels, thumbnail
from hrad.errors import HradError, InputError, naming_file
from hrad.export_runtime import ExportedPredictor, onnxruntime_module, openvino_module
from hrad.metrics import (
    PixelMetrics,
    bootstrap_auroc,
    cumulative_quartile_sets,
    image_metrics,
    operating_points,
    percentile_interval,
    threshold_decisions,
)
from hrad.metrics.image import BOOTSTRAP_RESAMPLES
from hrad.prediction import Prediction, Predictor
from hrad.profiling import PeakMemory
from hrad.progress import ProgressCallback, no_progress
from hrad.reports.figures import Case, case_grid, select_cases
from hrad.reports.folder import ReportFolder, first_line_is
from hrad.reports.html import ReportData, render_html
from hrad.reports.markdown import metrics_report, table

MetricProtocol = Literal["full", "hiad512"]
#: the default precision of pixel metrics (see the module docstring)
DEFAULT_SCORE_BITS = 24
#: the files of a report folder (``out_dir``): a previous report there is replaced whole, another folder refused
EVALUATION_REPORT = ReportFolder(
    "hrad evaluate",
    frozenset({"metrics.json", "metrics.md", EVALUATION_SCORES, "cases.png", "report.html"}),
    EVALUATION_SCORES,
    lambda folder: first_line_is(folder / EVALUATION_SCORES, ",".join(EVALUATION_COLUMNS)),
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportedModel:
    """What the reports say of the evaluated model: its parts (the title), its config, its
    training losses, and a note for what an export does not keep (no fit config, no losses)."""

    parts: str
    config: dict[str, Any]
    training_history: Mapping[str, list[float]]
    notes: tuple[str, ...] = ()


def reported_model(model: Predictor) -> ReportedModel:
    """A model's :class:`ReportedModel`; an export's from its sidecar (model, geometry, postprocess)."""
    if isinstance(model, ExportedPredictor):
        about = model.sidecar.get("model") or {}
        sidecar = model.onnx_path.with_suffix(".json")
        return ReportedModel(
            parts=" / ".join(str(about.get(part) or "?") for part in ("detector", "strategy", "backbone")),
            config={
                "export": {"sidecar": str(sidecar), "runtime": model.runtime},
                **{key: model.sidecar.get(key) for key in ("model", "geometry", "postprocess")},
            },
            training_history={},
            notes=(
                f"Exported model ({sidecar.name}, run by {model.runtime}): its sidecar keeps no fit config and no "
                "training losses, so the config shown is the sidecar's model, geometry and postprocess, without a training curve.",
            ),
        )
    from hrad.model import AnomalyModel  # not an export: a torch model, so torch is there

    if not isinstance(model, AnomalyModel):
        raise TypeError(f"cannot report on a {type(model).__name__}: an AnomalyModel or an exported model's predictor")
    config = model.config
    return ReportedModel(
        parts=f"{config.detector.name} / {config.strategy.name} / {config.backbone.name}",
        config=config.model_dump(mode="json"),
        training_history=model.training_history,
    )


def evaluate(
    model: Predictor,
    samples: Sequence[Sample],
    out_dir: Path | None = None,
    protocol: MetricProtocol = "full",
    progress: ProgressCallback = no_progress,
    cases_per_group: int = 3,
    score_bits: int = DEFAULT_SCORE_BITS,
    batch_images: int = 1,
    decision_thresholds: tuple[float | None, float | None] | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on labelled ``samples``; with ``out_dir`` writes metrics.json,
    metrics.md, cases.png, scores.csv and report.html. ``model``: a fitted model or an export's
    predictor (:class:`~hrad.prediction.Predictor`). ``score_bits`` (12..32) is the pixel
    metrics' precision: 32 = exact for float32 maps. Samples that fail with a
    :class:`~hrad.errors.HradError` are skipped and listed under ``skipped``.
    ``decision_thresholds``: the ``(image, pixel)`` thresholds whose decisions are measured
    (default: the model's, :meth:`AnomalyModel.decision_thresholds`).

    Runs on ``hrad predict``'s pipeline (:func:`hrad.pipeline.overlapped_batches`): images and
    masks are decoded in a loader thread, ``batch_images`` at a time go through
    :meth:`AnomalyModel.predict_batch`, and each map is added to the pixel metrics (and
    thumbnailed) in a writer thread, in order, while the next batch computes. Metrics do not
    depend on ``batch_images``; ``seconds_per_image`` is the model's compute time per image.
    """
    from hrad.pipeline import overlapped_batches

    if out_dir is not None:
        EVALUATION_REPORT.check(out_dir)  # before any image: a folder that is not a report is refused
    given = decision_thresholds is not None
    calibrated = model.thresholds is not None and model.thresholds.calibrated  # hrad calibrate's good images
    image_threshold, pixel_threshold = decision_thresholds if decision_thresholds is not None else model.decision_thresholds()
    # the pixel threshold's decisions are counted exactly, image by image, beside the binned metrics
    pixel = PixelMetrics(protocol=protocol, score_bits=score_bits, seg_thresholds=() if pixel_threshold is None else (pixel_threshold,))
    scores: list[float] = []
    labels: list[int] = []
    cases: list[Case] = []
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    seconds = 0.0

    def load(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image = read_pixels(sample.path)  # the file's pixel type; converted a tile window at a time
        return image, sample.load_mask(image.shape[:2])

    def compute(batch: list[Sample], loaded: list[tuple[np.ndarray, np.ndarray]]) -> list[Prediction]:
        nonlocal seconds
        start = time.perf_counter()
        predictions = model.predict_batch(
            [image for image, _ in loaded], threshold=image_threshold, pixel_threshold=pixel_threshold, names=[str(sample.path) for sample in batch]
        )
        seconds += time.perf_counter() - start
        return predictions

    def finish(sample: Sample, loaded: tuple[np.ndarray, np.ndarray], prediction: Prediction) -> tuple[float, Case | None]:
        image, mask = loaded
        pixel.add(prediction.anomaly_map, mask)  # one writer thread: maps are added in input order
        if out_dir is None:
            return prediction.score, None
        maps = (image_thumbnail(image), thumbnail(prediction.anomaly_map), thumbnail(mask))
        name = f"{sample.path.parent.name}/{sample.path.name}"  # defect folders repeat file names
        inspected = thumbnail(prediction.inspected) if prediction.inspected is not None else None
        return prediction.score, Case(name, sample.label, prediction.score, *maps, inspected=inspected)

    with PeakMemory() as memory:
        stages = overlapped_batches(list(samples), load, compute, finish, batch=batch_images, writers=1)
        for index, (sample, outcome) in enumerate(stages):
            if isinstance(outcome, HradError):  # the file's problem, not the evaluation's: skip it
                reason = naming_file(sample.path, outcome)
                skipped.append({"image": str(sample.path), "error": reason})
                logger.warning("skipped %s", reason)
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                score, case = outcome
                scores.append(score)
                labels.append(sample.label)
                rows.append({"image": str(sample.path), "defect_type": sample.defect_type, "label": sample.label, "score": score})
                if case is not None:
                    cases.append(case)
            progress(index + 1, len(samples), "evaluating")
    if not scores:
        first = f"; first: {skipped[0]['error']}" if skipped else ""
        raise InputError(f"no test image could be evaluated ({len(samples)} given, {len(skipped)} skipped{first})")
    # the curves and the report take a while on a large test set after the last image: a stage of
    # its own, so a log that stopped at 'evaluating: N/N' does not look stuck
    progress(0, 2, "metrics and report")
    metrics: dict[str, Any] = {}
    metrics.update(image_metrics(np.asarray(scores), np.asarray(labels)))
    if 0 < sum(labels) < len(labels):  # how far the image AUROC moves over resampled test sets
        interval = percentile_interval(bootstrap_auroc([scores], labels)[:, 0])
        metrics["image_auroc_ci95_low"], metrics["image_auroc_ci95_high"] = interval
    metrics.update(pixel.result())
    metrics.update(_decisions(scores, labels, rows, pixel, image_threshold, pixel_threshold, "given" if given else "calibrated" if calibrated else "model"))
    metrics["seconds_per_image"] = seconds / len(scores)
    metrics["peak_rss_mb"] = memory.peak_rss_mb
    if memory.peak_gpu_mb:
        metrics["peak_gpu_mb"] = memory.peak_gpu_mb
    metrics["images"] = len(scores)
    if skipped:
        metrics["images_skipped"] = len(skipped)
    metrics["protocol"] = protocol
    metrics["score_bits"] = score_bits
    progress(1, 2, "metrics and report")
    if out_dir is not None:
        measured_on = environment(model)  # once: metrics.json and report.html name the same date
        with EVALUATION_REPORT.staged(out_dir) as staging:  # the folder holds this run's report, whole, or the previous one
            write_evaluation(staging, metrics, rows, cases, cases_per_group, model, measured_on, skipped)
            write_html_report(
                staging / "report.html", metrics, np.asarray(scores), np.asarray(labels), pixel, cases, cases_per_group, model, measured_on, skipped
            )
    progress(2, 2, "metrics and report")
    if skipped:
        metrics["skipped"] = skipped
    return metrics


def _decisions(
    scores: list[float],
    labels: list[int],
    rows: list[dict[str, Any]],
    pixel: PixelMetrics,
    image_threshold: float | None,
    pixel_threshold: float | None,
    source: str,
) -> dict[str, Any]:
    """What the thresholds decide on this test set (none without thresholds), then the two
    oracle operating points; flat numbers first (the command line prints those), lists after."""
    decisions: dict[str, Any] = {}
    if image_threshold is not None or pixel_threshold is not None:
        decisions["thresholds_from"] = source  # given, model (held-out images) or calibrated (hrad calibrate)
    if image_threshold is not None:
        decisions["image_threshold"] = image_threshold
        decisions.update(threshold_decisions(scores, labels, image_threshold))
    if pixel_threshold is not None:
        decisions["pixel_threshold"] = pixel_threshold
        decisions.update({f"pixel_{name}_at_threshold": value for name, value in pixel.decisions_at(pixel_threshold).items()})
    if image_threshold is not None:
        flagged: dict[str, list[bool]] = {}
        for row in rows:
            flagged.setdefault(row["defect_type"], []).append(row["score"] > image_threshold)
        decisions["decisions_by_defect_type"] = [
            {"defect_type": kind, "images": len(marks), "flagged": sum(marks), "share_flagged": sum(marks) / len(marks)}
            for kind, marks in sorted(flagged.items(), key=lambda item: (item[0] != "good", item[0]))
        ]
    decisions["operating_points"] = operating_points(scores, labels)
    return decisions


def image_thumbnail(image: np.ndarray) -> np.ndarray:
    """:func:`~hrad.data.images.thumbnail` of an image in any pixel type, as float32 in [0, 1]
    (the thumbnail of its float twin: the area average commutes with the division)."""
    small = thumbnail(image).astype(np.float32, copy=False)
    if np.issubdtype(image.dtype, np.integer):
        small /= np.float32(np.iinfo(image.dtype).max)
    return small


def environment(model: Predictor | None = None) -> dict[str, str]:
    """Where the numbers were measured and what computed them: torch and its device, or for an
    exported model its runtime and version, without importing torch (a runtime install has none)."""
    machine = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": str(__import__("os").cpu_count()),
    }
    if isinstance(model, ExportedPredictor):
        runtime = openvino_module() if model.runtime == "openvino" else onnxruntime_module()
        return {**machine, "runtime": f"{model.runtime} {getattr(runtime, '__version__', '?')}", "device": "cpu"}
    import torch

    return {**machine, "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def model_notes(model: Predictor) -> list[str]:
    """What the model does to images and maps that changes what its metrics mean: the notes of
    ``metrics.md`` and ``report.html`` alike (a reader of either, or of a CI log, sees them)."""
    return [
        *([f"16-bit images were scaled to the full range from the {model.bit_depth} significant bits learned at fit (bit_depth)."]
          if model.bit_depth is not None else []),
        *([f"A region of interest was applied ({model.roi.inspected:.1%} of each image inspected): outside it the map takes "
           "its lowest value inside, so ground truth there counts as missed."] if model.roi is not None else []),
    ]  # fmt: skip


def write_evaluation(
    out_dir: Path,
    metrics: dict[str, Any],
    rows: list[dict[str, Any]],
    cases: list[Case],
    count: int,
    model: Predictor,
    measured_on: dict[str, str],
    skipped: Sequence[dict[str, str]] = (),
) -> None:
    """metrics.json, metrics.md, scores.csv and cases.png of one evaluation; ``measured_on``:
    :func:`environment`, taken once for these and report.html, so both name the same date."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reported = reported_model(model)
    payload = {
        **metrics,
        "images_skipped": len(skipped),
        "skipped": list(skipped),
        "bit_depth": model.bit_depth,  # learned at fit (the config says only "auto"); null: 16-bit as stored
        "roi_inspected": model.roi.inspected if model.roi is not None else None,  # null: the whole image
        "environment": measured_on,
        "config": reported.config,
    }
    (out_dir / "metrics.json").write_text(strict_json.dumps(payload, indent=2))  # undefined metrics as null
    report = metrics_report({key: value for key, value in metrics.items() if not isinstance(value, (list, dict))}, "hrad evaluate")
    report += "\nF1-max values use the best threshold chosen on the test set itself (oracle); AUROC/AP/AUPRO need no threshold.\n"
    if "image_auroc_ci95_low" in metrics:
        report += (
            f"\nimage_auroc_ci95_low/high: the central 95% of the image AUROC over {BOOTSTRAP_RESAMPLES} test sets drawn from "
            "this one with replacement (good and defective images apart); two models whose intervals overlap may not differ "
            "on this data (`hrad compare` tests the difference on the same images).\n"
        )
    report += "".join(f"\n{note}\n" for note in [*undefined_notes(metrics), *model_notes(model), *reported.notes])
    report += decisions_markdown(metrics)
    report += "\n![best and worst cases](cases.png)\n"
    worst = sorted(rows, key=lambda r: (-r["score"] if r["label"] == 0 else r["score"]))[: 2 * count]
    report += "\n## Worst cases\n\n" + table(worst, ["image", "defect_type", "label", "score"])
    if skipped:
        report += f"\n## Skipped images\n\n{len(skipped)} test images could not be evaluated and are not in the metrics:\n\n"
        report += table(list(skipped), ["image", "error"])
    (out_dir / "metrics.md").write_text(report, encoding="utf-8", errors=TEXT_ERRORS)
    write_evaluation_scores(out_dir / EVALUATION_SCORES, rows)
    if cases:
        from hrad.outputs import overlay_scale

        scale = overlay_scale(model.thresholds)  # the model's fixed scale, as in predict's overlays
        if scale is not None:
            low, high = scale.vmin, scale.vmax
        else:
            low = min(0.0, min(float(c.anomaly_map.min()) for c in cases))
            high = float(np.percentile([c.anomaly_map.max() for c in cases], 90))
        threshold, pixel_threshold = metrics.get("image_threshold"), metrics.get("pixel_threshold")
        case_grid(
            select_cases(cases, count), out_dir / "cases.png", vmin=low, vmax=high, title="hrad evaluate: worst and best cases",
            threshold=threshold if isinstance(threshold, float) and math.isfinite(threshold) else None,
            pixel_threshold=pixel_threshold if isinstance(pixel_threshold, float) and math.isfinite(pixel_threshold) else None,
        )


#: where the thresholds of ``metrics["thresholds_from"]`` came from, as the reports say it
THRESHOLD_SOURCES = {
    "given": "given on the command line",
    "model": "the model's, from held-out normal images",
    "calibrated": "the model's, from the good images given to hrad calibrate",
}


def decisions_text(metrics: dict[str, Any]) -> list[str]:
    """What the thresholds decided, in sentences (``metrics.md`` and ``report.html``)."""
    source = THRESHOLD_SOURCES[metrics.get("thresholds_from", "model")]
    lines = []
    if "image_threshold" in metrics:
        good, missed = metrics["good_images_flagged"], metrics["defective_images_missed"]
        good_share, defective_share = metrics["good_flagged"], metrics["defective_flagged"]
        lines.append(
            f"Image threshold {metrics['image_threshold']:.6g} ({source}): "
            + (f"{good} good image{'' if good == 1 else 's'} flagged (false alarms, {good_share:.1%} of the good ones), "
               if math.isfinite(good_share) else "no good test images, ")
            + (f"{missed} defective missed ({defective_share:.1%} of the defective ones flagged)."
               if math.isfinite(defective_share) else "no defective test images.")
        )
    if "pixel_threshold" in metrics:
        precision, recall, f1 = (metrics[f"pixel_{name}_at_threshold"] for name in ("precision", "recall", "f1"))
        lines.append(
            f"Pixel threshold {metrics['pixel_threshold']:.6g}: pixel precision {_share(precision, 'no pixel flagged')}, "
            f"recall {_share(recall, 'no defect pixels')}, F1 {_share(f1, 'no pixel flagged, no defect pixels')} over every test pixel "
            "(the deployed decision; pixel_f1_max is the oracle's)."
        )
    return lines


def _share(value: float, why: str) -> str:
    """A share of pixels for the reports' sentences; ``n/a (why)`` where it has no denominator."""
    return f"n/a ({why})" if undefined(value) else f"{value:.3f}"


def undefined_notes(metrics: dict[str, Any]) -> list[str]:
    """:data:`~hrad.comparison.UNDEFINED_NOTE` when a metric of the report's table is undefined
    (a one-class test set), so its ``n/a`` is explained rather than read as a failure."""
    return [UNDEFINED_NOTE] if any(isinstance(value, float) and undefined(value) for value in metrics.values()) else []


#: the threshold-free metrics ``hrad evaluate``'s closing lines name, with their names in words
HEADLINE_METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro_30": "AUPRO@30"}


def result_lines(metrics: dict[str, Any]) -> list[str]:
    """What ``hrad evaluate`` ends with, as messages: the headline metrics, what the image
    threshold decided (:func:`decisions_text`) and why a metric is n/a. The metrics' JSON goes to
    stdout, which a log file (``--log-file``, ``2> evaluate.log``) never sees: a long evaluation's
    log said only that the report was written, not how the model did."""
    shown = [
        f"{label} {'n/a' if undefined(metrics[key]) else f'{metrics[key]:.3f}'}" for key, label in HEADLINE_METRICS.items() if key in metrics
    ]
    return [f"{', '.join(shown)} over {metrics['images']} test images", *decisions_text(metrics)[:1], *undefined_notes(metrics)]


#: the oracle operating points' note, in metrics.md and report.html
OPERATING_POINTS_NOTE = (
    "Chosen with this test set's labels (oracle): where a threshold could go, to choose one "
    "(hrad predict --threshold, hrad evaluate --threshold); not a result."
)


def decisions_markdown(metrics: dict[str, Any]) -> str:
    """The ``metrics.md`` section of what the thresholds decide, per defect type, and the oracle operating points."""
    lines = decisions_text(metrics)
    if not (lines or metrics.get("operating_points")):
        return ""
    text = "\n## Decisions at the thresholds\n\n" + "".join(f"{line}\n\n" for line in lines)
    if metrics.get("decisions_by_defect_type"):
        text += table(metrics["decisions_by_defect_type"], ["defect_type", "images", "flagged", "share_flagged"])
    if metrics.get("operating_points"):
        text += f"\n### Operating points\n\n{OPERATING_POINTS_NOTE}\n\n"
        text += table(metrics["operating_points"], ["point", "threshold", "good_flagged", "defective_flagged"])
    return text


def write_html_report(
    path: Path,
    metrics: dict[str, Any],
    scores: np.ndarray,
    labels: np.ndarray,
    pixel: PixelMetrics,
    cases: list[Case],
    count: int,
    model: Predictor,
    measured_on: dict[str, str],
    skipped: Sequence[dict[str, str]] = (),
) -> Path:
    """The self-contained ``report.html`` of one evaluation (see :mod:`hrad.reports.html`);
    skipped images are listed in its notes. ``measured_on``: :func:`environment`, taken once
    for this report and its ``metrics.json``."""
    from hrad.outputs import overlay_scale

    areas = pixel.region_areas
    quartiles = cumulative_quartile_sets(areas)
    quartile_aupro = {
        f"AUPRO to FPR {limit:g}": [pixel.aupro(limit, chosen) if chosen.any() else float("nan") for chosen in quartiles]
        for limit in (0.3, 0.05)
    }
    thresholds = model.thresholds
    scale = overlay_scale(thresholds)
    precision = (
        "exact (every float32 score its own bin)"
        if metrics.get("score_bits", DEFAULT_SCORE_BITS) >= 32
        else f"scores binned to {metrics.get('score_bits')} bits (relative bin width 2^-{int(metrics.get('score_bits', 24)) - 9})"
    )
    reported = reported_model(model)
    data = ReportData(
        title=f"hrad evaluate: {reported.parts}, {len(scores)} images",
        metrics=metrics,
        image_scores=scores,
        image_labels=labels,
        pixel_roc=pixel.roc_curve(),
        pro=pixel.pro_curve(),
        quartile_aupro=quartile_aupro if areas.size else {},
        quartile_limits=[float(v) for v in np.percentile(areas, [25, 50, 75])] if areas.size else [],
        training_history=reported.training_history,
        image_threshold=metrics.get("image_threshold"),  # the thresholds whose decisions were measured
        overlay_range=(scale.vmin, scale.vmax) if scale else None,
        pixel_threshold=metrics.get("pixel_threshold"),
        cases=select_cases(cases, count),
        config=reported.config,
        environment=measured_on,
        decisions=decisions_text(metrics),
        operating_points_note=OPERATING_POINTS_NOTE,
        notes=(
            "F1-max values use the best threshold chosen on the test set itself (oracle); AUROC/AP/AUPRO need no threshold.",
            f"Pixel metrics at the ground truth's full resolution ({metrics.get('protocol')} protocol); {precision}.",
            {
                "given": "Thresholds (image score, pixel) were given on the command line.",
                "calibrated": "Thresholds (image score, pixel) come from the good images given to hrad calibrate, never from this test set.",
            }.get(metrics.get("thresholds_from", ""), "Thresholds (image score, pixel) come from held-out normal training images, never from this test set."),
            *undefined_notes(metrics),
            *model_notes(model),
            *reported.notes,
            *(
                [f"{len(skipped)} test images were skipped and are not in the metrics:"]
                + [f"skipped {entry['error']}" for entry in skipped]
                if skipped
                else []
            ),
        ),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8", errors=TEXT_ERRORS)
    return path
