"""Exact streaming image and pixel metrics; they take arrays and know nothing of models."""

from hrad.metrics.image import (
    bootstrap_auroc,
    image_metrics,
    operating_points,
    percentile_interval,
    threshold_decisions,
)
from hrad.metrics.pixel import PROTOCOLS, PixelMetrics
from hrad.metrics.size_aware import cumulative_quartile_sets, robustness_rho

__all__ = [
    "PROTOCOLS", "PixelMetrics", "bootstrap_auroc", "cumulative_quartile_sets", "image_metrics", "operating_points", "percentile_interval",
    "robustness_rho", "threshold_decisions",
]
