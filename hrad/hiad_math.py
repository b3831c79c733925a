"""HiAD's array arithmetic that needs no torch: level and low-branch sizes, where a patch's
feature cells sample a coarser level map, the pool's nearest-centroid assignment, min-max
calibration and the pooled image score.

numpy and OpenCV (its box filter pools the score), nothing of hrad, so the strategy (:mod:`hrad.strategies.hiad`) and the
torch-free runtime of an exported HiAD model (:mod:`hrad.export_runtime`) share one definition.
The meaning of each step is explained in :mod:`hrad.strategies.hiad.fusion` and
:mod:`hrad.strategies.hiad.strategy`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

import cv2
import numpy as np

ArrayT = TypeVar("ArrayT", bound=Any)


def level_size(height: int, width: int, rate: int) -> tuple[int, int]:
    """The image size at fusion level ``rate`` (downsampled by 2^rate)."""
    factor = 2**rate
    return max(1, round(height / factor)), max(1, round(width / factor))


def low_branch_size(height: int, width: int, target: int, multiple: int) -> tuple[int, int]:
    """Size whose long side is ~``target`` (never upscaled), sides rounded to ``multiple``."""
    scale = min(1.0, target / max(height, width))
    return (
        max(multiple, round(height * scale / multiple) * multiple),
        max(multiple, round(width * scale / multiple) * multiple),
    )


def valid_cells(size: int, cell: float) -> int:
    """Feature cells of a level map that are not wholly in the reflected padding past ``size`` pixels."""
    return math.ceil(size / cell - 1e-9)


def cell_centres(corner: int, cells: int, cell0: float, ratio: float, cell: float) -> np.ndarray:
    """Continuous level-map coordinates (cell edges at integers, float64) of the centres of the
    ``cells`` level-0 feature cells of a patch starting at pixel ``corner``: ``cell0`` level-0
    pixels per cell, ``ratio`` level-k pixels per level-0 pixel, ``cell`` level-k pixels per cell."""
    return (corner + (np.arange(cells, dtype=np.float64) + 0.5) * cell0) * ratio / cell


def bilinear_weights(coordinates: np.ndarray, size: int) -> np.ndarray:
    """``len(coordinates) x size`` matrix of bilinear weights at continuous ``coordinates`` (cell
    edges at integers) with border clamping: ``grid_sample(bilinear, border, align_corners=False)``
    along one axis. Sampling a map ``F`` (``size_y x size_x``) at a product grid is ``Wy F Wx^T``."""
    position = np.clip(np.asarray(coordinates, dtype=np.float64) - 0.5, 0.0, size - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    fraction = position - low
    rows = np.arange(len(position))
    weights = np.zeros((len(position), size), dtype=np.float64)
    np.add.at(weights, (rows, low), 1.0 - fraction)
    np.add.at(weights, (rows, high), fraction)
    return weights


def nearest_centroid(descriptors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared L2) for each row of ``descriptors``."""
    d = np.asarray(descriptors, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    distances = (d * d).sum(1)[:, None] - 2.0 * d @ c.T + (c * c).sum(1)[None, :]
    return distances.argmin(axis=1).astype(np.int64)


def normalize_range(values: ArrayT, low: float, high: float) -> ArrayT:
    """``clip((values - low) / (high - low), 0, 1)`` of a numpy array or torch tensor (same type
    and dtype back); a degenerate range maps to a step at ``low``."""
    span = high - low
    if span <= 0:
        above: Any = values > low
        step: Any = above.astype(values.dtype) if isinstance(above, np.ndarray) else above.to(values.dtype)
        return step
    return ((values - low) / span).clip(0.0, 1.0)


#: Values (rows x width) handled at a time by the banded map functions below (4 MB of float32).
BAND_VALUES = 2**20


def pooled_max(anomaly_map: np.ndarray, pool: int) -> float:
    """Max of the map averaged over ``pool x pool`` windows (stride 1, windows inside the map;
    a side shorter than ``pool`` is averaged whole): robust to single pixels. Computed a band of
    rows at a time (:func:`pooled_max_of_bands`), so it costs bands, not copies of the map."""
    array = np.asarray(anomaly_map, dtype=np.float32)
    band = max(1, BAND_VALUES // max(1, array.shape[1]))
    return pooled_max_of_bands((array[top : top + band] for top in range(0, len(array), band)), len(array), pool)


def pooled_max_of_bands(bands: Iterable[np.ndarray], height: int, pool: int) -> float:
    """:func:`pooled_max` of an ``height x W`` map given as consecutive bands of rows, top to bottom
    (any band heights): each band is box-filtered together with the last ``pool - 1`` rows of the
    bands before it and the maximum over its whole windows kept, so no full-size array is made.
    Equals the whole-map computation to float32 rounding."""
    size_y = min(pool, height)
    carry: np.ndarray | None = None  # the last size_y - 1 rows seen, the top of the next windows
    best = -np.inf
    for band in bands:
        rows = np.ascontiguousarray(band, dtype=np.float32)
        block = rows if carry is None or not len(carry) else np.concatenate([carry, rows])
        windows = len(block) - size_y + 1
        if windows > 0:
            # OpenCV's box filter (double sums for float32) anchors a window of size s on its
            # element s // 2; keep the windows that lie wholly inside (the border rule is unused)
            size_x = min(pool, block.shape[1])
            kept = block.shape[1] - size_x + 1
            averaged = cv2.boxFilter(block, -1, (size_x, size_y), normalize=True, borderType=cv2.BORDER_REPLICATE)
            start_y, start_x = size_y // 2, size_x // 2
            best = max(best, float(averaged[start_y : start_y + windows, start_x : start_x + kept].max()))
        carry = block[max(0, len(block) - (size_y - 1)) :]
    return float(best)


def bilinear_taps(output: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resampling ``size`` cells to ``output`` with plain bilinear weights (``align_corners=False``,
    no antialias, as :func:`hrad.imaging.resize` enlarges): for each output cell its two source
    cells and the second one's weight, in PyTorch's arithmetic (the float32 ratio ``size / output``,
    source = max(0, (i + 0.5) * ratio - 0.5) rounded once to float32, as its fused multiply-add)."""
    ratio = float(np.float32(size) / np.float32(output))
    source = np.maximum((ratio * (np.arange(output, dtype=np.float64) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    low = np.minimum(np.floor(source).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    fraction = np.where(low < size - 1, source - low.astype(np.float32), np.float32(0)).astype(np.float32)
    return low, high, fraction


def maximum_upsampled(target: np.ndarray, small: np.ndarray, band_values: int | None = None) -> np.ndarray:
    """``np.maximum(target, bilinear upsample of small to target's size)`` written into ``target``
    (a float32 ``H x W`` array) a band of rows at a time, so the upsampled map is never whole:
    each band's source rows are interpolated along the rows first, then down the columns, as
    PyTorch's bilinear kernel does. ``small`` (``h x w``) must not be larger than ``target`` along
    either axis (enlarging needs no antialias; a shrink would). Equals
    ``np.maximum(target, resize(small, target.shape))`` to float32 rounding."""
    height, width = target.shape
    source = np.asarray(small, dtype=np.float32)
    if source.shape[0] > height or source.shape[1] > width:
        raise ValueError(f"maximum_upsampled enlarges only: {source.shape} -> {target.shape}")
    y_low, y_high, y_fraction = bilinear_taps(height, source.shape[0])
    x_low, x_high, x_fraction = bilinear_taps(width, source.shape[1])
    band = max(1, (BAND_VALUES if band_values is None else band_values) // max(1, width))
    for top in range(0, height, band):
        bottom = min(height, top + band)
        first, last = int(y_low[top]), int(y_high[bottom - 1])
        rows = source[first : last + 1]
        along = _mix(rows[:, x_low], rows[:, x_high], x_fraction)  # the source rows at full width
        upsampled = _mix(along[y_low[top:bottom] - first], along[y_high[top:bottom] - first], y_fraction[top:bottom, None])
        np.maximum(target[top:bottom], upsampled, out=target[top:bottom])
    return target


def _mix(low: np.ndarray, high: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """``low * (1 - fraction) + high * fraction`` into ``low`` (fresh gathered arrays)."""
    low *= 1 - fraction
    high *= fraction
    low += high
    return low
