"""Full-resolution post-processing of anomaly maps: smoothing and image-score rules."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class PostprocessConfig(BaseModel):
    """Applied by the model to every strategy's full-resolution map."""

    model_config = ConfigDict(extra="forbid")

    #: Gaussian sigma in full-resolution pixels (0 = off); HiAD's reference uses 4
    sigma: float = Field(4.0, ge=0)
    #: image score: the strategy's score, the map maximum, or the mean of the top fraction of pixels
    image_score: Literal["strategy", "max", "top-fraction"] = "strategy"
    #: fraction of the highest pixels averaged by image_score="top-fraction"
    top_fraction: float = Field(0.001, gt=0, le=1)


def gaussian_smooth(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a kernel of +-4 sigma (OpenCV: fast at 8K)."""
    if sigma <= 0:
        return anomaly_map
    radius = int(4 * sigma + 0.5)
    return cv2.GaussianBlur(np.asarray(anomaly_map, dtype=np.float32), (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def top_fraction_mean(anomaly_map: np.ndarray, fraction: float) -> float:
    """Mean of the highest ``fraction`` of pixels (at least one)."""
    flat = anomaly_map.ravel()
    count = max(1, int(round(flat.size * fraction)))
    return float(np.partition(flat, flat.size - count)[flat.size - count :].mean())


def image_score(anomaly_map: np.ndarray, strategy_score: float, config: PostprocessConfig) -> float:
    if config.image_score == "max":
        return float(anomaly_map.max())
    if config.image_score == "top-fraction":
        return top_fraction_mean(anomaly_map, config.top_fraction)
    return float(strategy_score)
