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
