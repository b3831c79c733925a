"""Image-level metrics: one score and one label per image, so plain scikit-learn is enough.

``image_f1_max`` is an ORACLE number: it picks the best threshold with the test labels, so it
is an upper bound on what a deployed threshold reaches, not a deployable result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from hrad.errors import InputError


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
        result["image_ap"] = float(average_precision_score(label_array, score_array))
        precision, recall, _ = precision_recall_curve(label_array, score_array)
        denominator = precision + recall
        f1 = np.divide(
            2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
        )
        result["image_f1_max"] = float(f1.max())
        if n_normal > 0:
            result["image_auroc"] = float(roc_auc_score(label_array, score_array))
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
