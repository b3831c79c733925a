"""``hrad compare``: models evaluated on the same test images, side by side, with how sure each
difference is.

It reads what ``hrad evaluate`` wrote into each report folder (``metrics.json`` and
``scores.csv``: image, defect type, label, score) and runs no model. A difference of 0.01 image
AUROC on 60 test images is often noise; the comparison says so: every model's image AUROC on the
images all reports share, and each model's difference from the first (the baseline) with a 95%
interval from a paired bootstrap (:func:`hrad.metrics.bootstrap_auroc`: the same resampled test
sets for both models, good and defective images apart). An interval that excludes 0 is a
difference this test set supports; one that includes 0 is not. Pixel metrics (AUPRO, pixel AP)
come from each report as they are: a pixel-level bootstrap would need every map again.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hrad.data.images import TEXT_ERRORS, atomic_write_bytes, text_bytes
from hrad.errors import InputError
from hrad.metrics import bootstrap_auroc, image_metrics, percentile_interval
from hrad.metrics.image import BOOTSTRAP_RESAMPLES
from hrad.reports.folder import ReportFolder, json_object_with
from hrad.reports.markdown import format_value, table

#: ``hrad evaluate``'s per-image file and its columns
EVALUATION_SCORES = "scores.csv"
EVALUATION_COLUMNS = ("image", "defect_type", "label", "score")
#: the report's metrics shown side by side (those a report lacks are left blank)
SHOWN_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05", "seconds_per_image", "peak_rss_mb")
#: ``hrad compare --out``: a previous comparison there is replaced whole, another folder refused
COMPARISON_REPORT = ReportFolder(
    "hrad compare",
    frozenset({"comparison.md", "comparison.json"}),
    "comparison.json",
    lambda folder: json_object_with(folder / "comparison.json", ("models", "differences")),
)
#: what an ``n/a`` in a report's tables means (metrics.md, report.html, comparison.md)
UNDEFINED_NOTE = (
    "n/a: undefined on this test set (null in the JSON files): the image AUROC needs good and defective test images, "
    "image AP and F1 defective ones, the pixel metrics defect pixels in the ground truth."
)


def undefined(value: Any) -> bool:
    """Whether ``value`` is a metric undefined on its test set: NaN as computed, ``null`` as read back."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_evaluation_scores(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``hrad evaluate``'s ``scores.csv`` (a CSV writer: an image path may hold a comma)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(EVALUATION_COLUMNS)
    writer.writerows([row["image"], row["defect_type"], row["label"], f"{row['score']:.9g}"] for row in rows)
    atomic_write_bytes(path, text_bytes(buffer.getvalue()))


@dataclass(frozen=True)
class Evaluation:
    """One ``hrad evaluate`` report folder: its name, metrics and per-image labels and scores."""

    name: str
    folder: Path
    metrics: Mapping[str, Any]
    labels: Mapping[str, int]
    scores: Mapping[str, float]


def read_evaluation(folder: Path, name: str | None = None) -> Evaluation:
    """A report folder written by ``hrad evaluate``; a one-line :class:`InputError` naming the
    file when it is not one."""
    metrics_path, scores_path = folder / "metrics.json", folder / EVALUATION_SCORES
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (give the --out folders of hrad evaluate)")
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{metrics_path}: missing (is {folder} a report folder of hrad evaluate?)") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{metrics_path}: unreadable ({' '.join(str(error).split())})") from None
    if not isinstance(metrics, dict):
        raise InputError(f"{metrics_path}: not the metrics of hrad evaluate (a JSON object)")
    labels: dict[str, int] = {}
    scores: dict[str, float] = {}
    try:
        with scores_path.open(newline="", encoding="utf-8", errors=TEXT_ERRORS) as handle:
            reader = csv.reader(handle)
            if tuple(next(reader, ())) != EVALUATION_COLUMNS:
                raise InputError(f"{scores_path}: not the scores.csv of hrad evaluate (columns {', '.join(EVALUATION_COLUMNS)})")
            for line, row in enumerate(reader, start=2):
                try:
                    image, label, score = row[0], int(row[2]), float(row[3])
                except (IndexError, ValueError):
                    raise InputError(f"{scores_path}: line {line} is not image,defect_type,label,score") from None
                if label not in (0, 1) or not math.isfinite(score):
                    raise InputError(f"{scores_path}: line {line}: label must be 0 or 1 and the score a finite number")
                labels[image], scores[image] = label, score
    except FileNotFoundError:
        raise InputError(f"{scores_path}: missing (is {folder} a report folder of hrad evaluate?)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{scores_path}: unreadable ({' '.join(str(error).split())})") from None
    if not scores:
        raise InputError(f"{scores_path}: no images")
    return Evaluation(name or folder.resolve().name, folder, metrics, labels, scores)


def _shown_metric(metrics: Mapping[str, Any], key: str) -> Any:
    """A report's metric as the comparison shows it: None when the report lacks it (left blank),
    NaN when it has it as ``null`` (undefined on its test set: hrad writes NaN as null, and older
    reports wrote a bare NaN, which reads as NaN too)."""
    if key not in metrics:
        return None
    return math.nan if metrics[key] is None else metrics[key]


def _path_parts(image: str) -> tuple[str, ...]:
    """An image's path as folders and name, without a leading ``/``, ``.`` or ``..``: what stays
    of it whichever working folder ``hrad evaluate`` ran in."""
    parts = Path(os.path.normpath(image)).parts
    while parts and (parts[0] in (os.sep, "/", ".", "..") or Path(parts[0]).anchor == parts[0]):
        parts = parts[1:]
    return parts


def same_images(baseline: Iterable[str], other: Iterable[str]) -> tuple[dict[str, str], int]:
    """``other``'s images named as in ``baseline`` (an image of ``other`` -> the same image of
    ``baseline``), and how many of them only by the end of their path: ``hrad evaluate`` writes the
    test images' paths as ``--data`` gave them, so one test set evaluated with ``--data
    data/capsules`` and with ``--data /srv/data/capsules`` (or from another folder) has paths
    where one is the other with leading folders left off. Such an image is matched when exactly
    one image of the other report ends so (two or more path parts: a test folder and a name)."""
    baseline = list(baseline)
    exact = set(baseline)
    whole = {_path_parts(image): image for image in baseline}
    endings: dict[tuple[str, ...], list[str]] = {}
    for parts, image in whole.items():
        for start in range(len(parts) - 1):
            endings.setdefault(parts[start:], []).append(image)
    matched: dict[str, str] = {}
    for image in other:
        if image in exact:
            matched[image] = image
            continue
        parts = _path_parts(image)
        candidates = set(endings.get(parts, [])) if len(parts) >= 2 else set()
        candidates |= {whole[parts[start:]] for start in range(1, len(parts) - 1) if parts[start:] in whole}
        if len(candidates) == 1:
            matched[image] = candidates.pop()
    claimed = Counter(matched.values())
    matched = {image: target for image, target in matched.items() if claimed[target] == 1}  # two for one image: neither
    return matched, sum(image != target for image, target in matched.items())


def compare(evaluations: Sequence[Evaluation], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The comparison as plain data (``comparison.json``): per model its report's metrics and the
    image AUROC on the shared images with its 95% interval; per model after the first, the
    paired difference from the first with its interval."""
    if len(evaluations) < 2:
        raise InputError("hrad compare needs two or more report folders")
    names = [evaluation.name for evaluation in evaluations]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InputError(f"two reports are both named {twice!r}: every report needs a name of its own (--names A,B,...)")
    # every report's images named as in the first's (the same test set may be spelled otherwise)
    named: list[tuple[dict[str, int], dict[str, float]]] = [(dict(evaluations[0].labels), dict(evaluations[0].scores))]
    by_ending = 0
    for evaluation in evaluations[1:]:
        matched, count = same_images(evaluations[0].scores, evaluation.scores)
        by_ending = max(by_ending, count)
        named.append(
            ({matched[image]: label for image, label in evaluation.labels.items() if image in matched},
             {matched[image]: score for image, score in evaluation.scores.items() if image in matched})
        )
    shared = sorted(set.intersection(*(set(scores) for _, scores in named)))
    if not shared:
        raise InputError(f"{evaluations[0].folder} and {evaluations[1].folder} share no test image (compare reports of the same test set)")
    labels = np.array([evaluations[0].labels[image] for image in shared])
    for evaluation, (their_labels, _) in zip(evaluations[1:], named[1:], strict=True):
        differing = next((image for image in shared if their_labels[image] != evaluations[0].labels[image]), None)
        if differing is not None:
            raise InputError(f"{evaluation.folder / EVALUATION_SCORES}: {differing} is labelled otherwise than in {evaluations[0].folder}")
    scores = [np.array([their_scores[image] for image in shared]) for _, their_scores in named]
    both = 0 < int(labels.sum()) < labels.size
    draws = bootstrap_auroc(scores, labels, resamples=resamples, seed=seed) if both else None
    models: list[dict[str, Any]] = []
    for column, evaluation in enumerate(evaluations):
        entry: dict[str, Any] = {
            "name": evaluation.name,
            "folder": str(evaluation.folder),
            "images": len(evaluation.scores),
            "image_auroc_shared": image_metrics(scores[column], labels)["image_auroc"],
            **{key: _shown_metric(evaluation.metrics, key) for key in SHOWN_METRICS},
        }
        if draws is not None:
            entry["image_auroc_shared_ci95"] = list(percentile_interval(draws[:, column]))
        models.append(entry)
    differences: list[dict[str, Any]] = []
    for column in range(1, len(evaluations)):
        difference: dict[str, Any] = {
            "model": names[column],
            "baseline": names[0],
            "image_auroc_difference": models[column]["image_auroc_shared"] - models[0]["image_auroc_shared"],
        }
        if draws is not None:
            low, high = percentile_interval(draws[:, column] - draws[:, 0])
            difference["ci95"] = [low, high]
            difference["supported"] = bool(low > 0 or high < 0)
        differences.append(difference)
    return {
        "shared_images": len(shared),
        "matched_by_path_ending": by_ending,
        "defective": int(labels.sum()),
        "good": int(labels.size - labels.sum()),
        "resamples": resamples if both else 0,
        "seed": seed,
        "models": models,
        "differences": differences,
    }


def _interval(values: Sequence[float] | None) -> str:
    return "" if not values else f"{format_value(values[0])} to {format_value(values[1])}"


def differences_markdown(result: Mapping[str, Any]) -> str:
    """Each model's image AUROC against the first's on the shared images, in words (a sentence
    per model), with how the interval was drawn."""
    if not result["resamples"]:
        return "The shared images are all of one class: no AUROC and no interval.\n"
    text = (
        f"Paired bootstrap: {result['resamples']} test sets drawn from the {result['shared_images']} shared images with "
        f"replacement (good and defective apart, seed {result['seed']}), each scored by every model; the interval holds "
        "the central 95% of the differences. An interval that excludes 0 is a difference this test set supports.\n\n"
    )
    for difference in result["differences"]:
        sign = "above" if difference["image_auroc_difference"] >= 0 else "below"
        verdict = "supported" if difference["supported"] else "not supported: the interval includes 0"
        text += (
            f"- **{difference['model']}**: {format_value(abs(difference['image_auroc_difference']))} {sign} "
            f"{difference['baseline']} (95% interval {_interval(difference['ci95'])}): {verdict}.\n"
        )
    return text


def comparison_markdown(result: Mapping[str, Any]) -> str:
    """``comparison.md``: the models' metrics, then the differences from the first, in words."""
    models = result["models"]
    rows = [
        {
            "model": model["name"],
            "images": model["images"],
            "image AUROC (shared)": "n/a (one class)" if undefined(model["image_auroc_shared"]) else model["image_auroc_shared"],
            "95% interval": _interval(model.get("image_auroc_shared_ci95")),
            **{key: "" if model.get(key) is None else model[key] for key in SHOWN_METRICS},
        }
        for model in models
    ]
    text = "# hrad compare\n\n"
    text += (
        f"{result['shared_images']} test images in every report ({result['defective']} defective, {result['good']} good). "
        "Image AUROC (shared) is on those images; the other columns are each report's own, on all of its images.\n\n"
    )
    if result.get("matched_by_path_ending"):
        text += (
            f"{result['matched_by_path_ending']} of them matched by the end of their path: the reports name the test "
            f"folder otherwise (hrad evaluate --data given another way, or run from another folder); see {EVALUATION_SCORES}.\n\n"
        )
    text += table(rows, list(rows[0]))
    if any(isinstance(value, float) and math.isnan(value) for row in rows for value in row.values()):
        text += f"\n{UNDEFINED_NOTE}\n"
    text += f"\n## Image AUROC against {models[0]['name']}\n\n" + differences_markdown(result)
    return text


__all__ = [
    "COMPARISON_REPORT",
    "EVALUATION_COLUMNS",
    "EVALUATION_SCORES",
    "UNDEFINED_NOTE",
    "Evaluation",
    "compare",
    "comparison_markdown",
    "differences_markdown",
    "read_evaluation",
    "same_images",
    "undefined",
    "write_evaluation_scores",
]
