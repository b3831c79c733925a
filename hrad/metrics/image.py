"""Image-level metrics: one score and one label per image.

The ROC and precision-recall curves are scikit-learn's algorithm (``roc_curve`` with its
collinear points dropped, ``auc``, ``precision_recall_curve``, ``average_precision_score``,
as of 1.9) in numpy, so ``hrad evaluate`` on an exported model runs on a torch-free runtime
install (requirements-runtime.txt), which has no scikit-learn; tests check they equal
scikit-learn's to the last bit, ties included.

``image_f1_max`` is an ORACLE number: it picks the best threshold with the test labels, so it
is an upper bound on what a deployed threshold reaches, not a deployable result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hrad.errors import InputError


def _counts_at_thresholds(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives (float64) at each distinct score, highest first (flagged: score >=
    it), and those scores: scikit-learn's ``confusion_matrix_at_thresholds``, unweighted."""
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_each_score = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_labels.size - 1]
    true_positives = np.cumsum(sorted_labels.astype(np.float64), dtype=np.float64)[last_of_each_score]
    false_positives = 1 + last_of_each_score.astype(np.float64) - true_positives
    return false_positives, true_positives, sorted_scores[last_of_each_score]


def roc_curve(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates of the image ROC curve from (0, 0), collinear points
    dropped (scikit-learn's ``roc_curve``); both classes must be present."""
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    label_array = np.asarray(labels).ravel().astype(bool)
    false_positives, true_positives, _ = _counts_at_thresholds(score_array, label_array)
    if false_positives.size > 2:
        corners = np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2))
        keep = np.nonzero(np.r_[True, corners, True])[0]
        false_positives, true_positives = false_positives[keep], true_positives[keep]
    false_positives, true_positives = np.r_[0.0, false_positives], np.r_[0.0, true_positives]
    return false_positives / false_positives[-1], true_positives / true_positives[-1]


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under :func:`roc_curve` with trapezoids (scikit-learn's ``roc_auc_score``)."""
    fpr, tpr = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _precision_recall(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall from the highest threshold to the lowest, ending at (1, 0)
    (scikit-learn's ``precision_recall_curve``); needs a defective image."""
    false_positives, true_positives, _ = _counts_at_thresholds(scores, labels)
    precision = true_positives / (true_positives + false_positives)  # at least one image is flagged at every threshold
    recall = true_positives / true_positives[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def image_metrics(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray
) -> dict[str, float]:
    """Image AUROC, AP and F1-max (oracle threshold) of ``scores`` against ``labels`` (1 = anomalous).

    Metrics that are undefined because one class is missing come back as NaN instead of raising,
    so a report over many categories still renders.
    """
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    label_array = np.asarray(labels).ravel().astype(bool)
    if score_array.shape != label_array.shape:
        raise InputError(f"image metrics: {score_array.size} scores but {label_array.size} labels")
    if not np.all(np.isfinite(score_array)):
        raise InputError("image metrics: scores contain NaN or infinite values")
    n_anomalous = int(label_array.sum())
    n_normal = label_array.size - n_anomalous
    nan = float("nan")
    result = {"image_auroc": nan, "image_ap": nan, "image_f1_max": nan}
    if n_anomalous > 0:
        precision, recall = _precision_recall(score_array, label_array)
        result["image_ap"] = float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))  # the step integral; -0.0 clipped
        denominator = precision + recall
        f1 = np.divide(
            2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
        )
        result["image_f1_max"] = float(f1.max())
        if n_normal > 0:
            result["image_auroc"] = _auroc(score_array, label_array)
    return result


def threshold_decisions(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | Sequence[int] | np.ndarray, threshold: float
) -> dict[str, float]:
    """What a deployed image threshold decides on a labelled set (``score > threshold`` flags an
    image, as :attr:`hrad.prediction.Prediction.is_anomalous` does): the share of good images
    flagged (false alarms: good parts rejected) and of defective ones flagged (recall: the rest
    escape), with their counts. NaN where a class is missing."""
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    label_array = np.asarray(labels).ravel().astype(bool)
    flagged = score_array > threshold
    good, defective = int((~label_array).sum()), int(label_array.sum())
    good_flagged, defective_flagged = int(flagged[~label_array].sum()), int(flagged[label_array].sum())
    return {
        "good_flagged": good_flagged / good if good else float("nan"),
        "defective_flagged": defective_flagged / defective if defective else float("nan"),
        "good_images_flagged": good_flagged,
        "defective_images_missed": defective - defective_flagged,
    }


def operating_points(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | Sequence[int] | np.ndarray) -> list[dict[str, float | str]]:
    """ORACLE (chosen with the test labels): the image thresholds at the two ends a user weighs
    when choosing one (``hrad predict --threshold``): the lowest that flags no good image of
    this set, and the highest that flags every defective one, each with what it decides
    (:func:`threshold_decisions`). Empty when a class is missing."""
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    label_array = np.asarray(labels).ravel().astype(bool)
    if label_array.all() or not label_array.any():
        return []
    no_false_alarm = float(score_array[~label_array].max())  # flags score > t: the best good image is not flagged
    lowest_defective = float(score_array[label_array].min())
    all_caught = float(np.nextafter(lowest_defective, -np.inf))  # just below it: every defective image flagged
    return [
        {"point": "no good image flagged", "threshold": no_false_alarm, **threshold_decisions(score_array, label_array, no_false_alarm)},
        {"point": "every defective image flagged", "threshold": all_caught, **threshold_decisions(score_array, label_array, all_caught)},
    ]


#: bootstrap resamples behind every interval; the percentile interval's ends move by about
#: 0.003 AUROC between seeds at this count (160 test images, AUROC 0.8)
BOOTSTRAP_RESAMPLES = 2000


def auroc_pairs(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | Sequence[int] | np.ndarray) -> np.ndarray:
    """``n_defective x n_good``: 1 where the defective image scores above the good one, 0.5 on a
    tie, 0 below. Its mean is the image AUROC (the Mann-Whitney statistic), and a resample's
    AUROC is a weighted mean of it, which is what makes :func:`bootstrap_auroc` cheap."""
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    label_array = np.asarray(labels).ravel().astype(bool)
    defective, good = score_array[label_array][:, None], score_array[~label_array][None, :]
    return (defective > good) + 0.5 * (defective == good)


def bootstrap_auroc(
    scores: Sequence[Sequence[float] | np.ndarray],
    labels: Sequence[bool] | Sequence[int] | np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """``resamples x models`` image AUROCs of test sets drawn from this one with replacement,
    the good and the defective images apart (stratified, so every resample has both and its
    class sizes), the same draws for every model: paired, so a difference between two models'
    columns is the difference on the same images. ``scores``: one score array per model, on the
    same images in the same order."""
    label_array = np.asarray(labels).ravel().astype(bool)
    defective, good = int(label_array.sum()), int((~label_array).sum())
    if defective == 0 or good == 0:
        raise InputError("bootstrap AUROC: the test set needs good and defective images")
    rng = np.random.default_rng(seed)
    # how often each image is drawn in each resample: multinomial counts per class
    defective_counts = rng.multinomial(defective, np.full(defective, 1.0 / defective), size=resamples).astype(np.float64)
    good_counts = rng.multinomial(good, np.full(good, 1.0 / good), size=resamples).astype(np.float64)
    result = np.empty((resamples, len(scores)), dtype=np.float64)
    for column, model_scores in enumerate(scores):
        pairs = auroc_pairs(model_scores, label_array)
        result[:, column] = ((defective_counts @ pairs) * good_counts).sum(axis=1) / (defective * good)
    return result


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``values`` (percentile method)."""
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
