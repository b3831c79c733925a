"""HiAD's array arithmetic that needs no torch: level and low-branch sizes, where a patch's
feature cells sample a coarser level map, the pool's nearest-centroid assignment, min-max
calibration and the pooled image score.

Plain numpy, imports nothing of hrad, so the strategy (:mod:`hrad.strategies.hiad`) and the
torch-free runtime of an exported HiAD model (:mod:`hrad.export_runtime`) share one definition.
The meaning of each step is explained in :mod:`hrad.strategies.hiad.fusion` and
:mod:`hrad.strategies.hiad.strategy`.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
from scipy.ndimage import uniform_filter1d

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


def pooled_max(anomaly_map: np.ndarray, pool: int) -> float:
    """Max of the map averaged over ``pool x pool`` windows (stride 1, windows inside the map;
    a side shorter than ``pool`` is averaged whole): robust to single pixels."""
    array = np.asarray(anomaly_map, dtype=np.float32)
    for axis in (0, 1):
        size = min(pool, array.shape[axis])
        # centred running mean; keep the windows that lie wholly inside the map
        averaged = uniform_filter1d(array, size, axis=axis, mode="constant")
        start = size // 2  # scipy centres a window of size s on its element s // 2
        kept = averaged.shape[axis] - size + 1
        array = averaged[start : start + kept] if axis == 0 else averaged[:, start : start + kept]
    return float(array.max())
