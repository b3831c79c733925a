"""Image-border calibration: a model's excess along the image border, learned from held-out normals.

A feature whose receptive field crosses the image border sees padding (reflected context, a
backbone's zeros) where the interior sees more image. Training images show that pattern only
along their own borders, a few percent of the features a detector learns from, and
nearest-neighbour or density scores are higher where training data is sparse: the maps of
normal images get a bright frame a few tens of pixels wide, and an image's maximum, its score,
often lies on it (``hrad demo``'s textures: every held-out normal image's maximum lay on the
border, the border ring 20% above the interior). That frame is a property of the fitted model,
so the held-out normal images the model already predicts for its thresholds measure it: the
mean map value at each distance ``d`` from the image border, over the mean of an inner ring.
Maps are divided by that ratio where it exceeds 1, so a border pixel scores by how far it
exceeds what normal borders score. Only an excess is removed: where the border is quieter than
the inner ring (objects in the middle of the frame, as on VisA capsules) the ratio is 1 and
nothing changes. Maps with negative values (log-likelihoods) get no calibration: a ratio of
means says nothing there.

The profile covers distances up to :func:`profile_depth`, a quarter of the short side (at most
:data:`MAX_DEPTH` pixels); the inner ring, its second half, is the reference; the first half is
corrected. Computed one ring of pixels at a time, applied one band of rows at a time: no
distance array, no copy.

Corners (:meth:`BorderProfile.corner_ratios`): a cell near two sides sees padding from both, and
the 1-D ratio at its distance to the nearest side under-corrects it (HiAD's low branch on hrad's
gravel: the corner cell 2.2x the inner ring, an edge-middle cell 1.5x, so after the 1-D division
the corner keeps a 32-45% excess; ``benchmarks/results/hiad_border_corners.md``). Those ratios
are a table indexed by the pair (distance to the nearer of top / bottom, distance to the nearer of
left / right), each clipped to the corrected depth, built from two edge profiles: ``row`` (top and
bottom cells at least half the profiled depth from left and right) and ``col``; a cell gets both
excesses added, ``row[i] + col[j] - 1``. That rule is a choice the measurement made, not a law:
on good test images it predicted the corner cells better (rms 0.03-0.04 on gravel's low, high and
fused maps) than the nearest side's ratio (0.06-0.19), the product ``row * col`` (0.06-0.08,
over-correcting the corner to 0.85) or the larger of the two; and it is learned from the thousands
of edge cells rather than the few corner cells a handful of held-out images have. A 1-D list
(every model saved before) is the same table with ``ratio[min(row distance, column distance)]``:
one function applies both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

#: deepest distance from the border profiled, in pixels
MAX_DEPTH = 256

#: stored border ratios: per distance to the nearest side (1-D), or a square table per (row
#: distance, column distance), its last row and column for distances at or past the corrected depth
BorderRatios = Sequence[float] | Sequence[Sequence[float]] | np.ndarray


def profile_depth(height: int, width: int) -> int:
    """Distances profiled for an ``height x width`` map: a quarter of the short side, at most
    :data:`MAX_DEPTH`; under 4 (a map too small to have an inside) profiles nothing."""
    depth = min(MAX_DEPTH, min(height, width) // 4)
    return depth if depth >= 4 else 0


def rings(array: np.ndarray, depth: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(d, views)`` for ``d < depth``: views of ``array`` (``H x W``) that together hold each
    pixel at distance ``d`` from the nearest image border exactly once (the top and bottom rows
    of the ring whole, its columns without the corners)."""
    height, width = array.shape
    for d in range(depth):
        top, bottom, left, right = d, height - 1 - d, d, width - 1 - d
        if top > bottom or left > right:
            return
        views = [array[top, left : right + 1]]
        if bottom != top:
            views.append(array[bottom, left : right + 1])
        if bottom - top > 1:
            views.append(array[top + 1 : bottom, left])
            if right != left:
                views.append(array[top + 1 : bottom, right])
        yield d, views


class BorderProfile:
    """Sums of held-out normal maps at each distance from the image border, then the ratios."""

    def __init__(self) -> None:
        self.sums = np.zeros(MAX_DEPTH, dtype=np.float64)
        self.counts = np.zeros(MAX_DEPTH, dtype=np.float64)
        self.depth = MAX_DEPTH
        self.negative = False
        # edge middles: per distance from top / bottom (row) or left / right (col), the cells at
        # least half the map's profiled depth from the two other sides
        self.edge_sums = np.zeros((2, MAX_DEPTH // 2), dtype=np.float64)
        self.edge_counts = np.zeros((2, MAX_DEPTH // 2), dtype=np.float64)

    def update(self, anomaly_map: np.ndarray) -> None:
        array = np.asarray(anomaly_map)
        depth = profile_depth(*array.shape)
        self.depth = min(self.depth, depth)
        self.negative = self.negative or bool(array.min() < 0)
        for d, views in rings(array, depth):
            self.sums[d] += sum(float(view.sum(dtype=np.float64)) for view in views)
            self.counts[d] += sum(view.size for view in views)
        half = depth // 2
        height, width = array.shape
        for d in range(half):
            rows = (array[d, half : width - half], array[height - 1 - d, half : width - half])
            cols = (array[half : height - half, d], array[half : height - half, width - 1 - d])
            for axis, edge in enumerate((rows, cols)):
                self.edge_sums[axis, d] += sum(float(view.sum(dtype=np.float64)) for view in edge)
                self.edge_counts[axis, d] += sum(view.size for view in edge)

    def _reference(self) -> float | None:
        """Mean of the inner ring (the second half of the profiled depth); None when there is no
        usable one (nothing profiled, a negative map, a non-positive mean)."""
        half = self.depth // 2
        if half < 2 or self.negative or not self.counts[: self.depth].all():
            return None
        reference = float(self.sums[half : self.depth].sum() / self.counts[half : self.depth].sum())
        return reference if reference > 0 else None

    def ratios(self) -> list[float] | None:
        """Per distance ``d`` (the first half of the profiled depth): ``max(1, mean(d) / mean of
        the inner ring)``; None when nothing was profiled, a map had negative values, or no
        distance exceeds the inner ring."""
        reference = self._reference()
        if reference is None:
            return None
        half = self.depth // 2
        ratios = np.maximum(1.0, self.sums[:half] / self.counts[:half] / reference)
        if not (ratios > 1.0).any():
            return None
        # trailing ones carry nothing: stop at the last distance that is corrected
        last = int(np.flatnonzero(ratios > 1.0)[-1])
        return [float(r) for r in ratios[: last + 1]]

    def corner_ratios(self) -> list[list[float]] | None:
        """The 2-D table (module docstring): ``row[i] + col[j] - 1`` for a cell ``i`` from the
        nearer of top / bottom and ``j`` from the nearer of left / right, ``row`` and ``col`` the
        edge middles' ``max(1, mean / mean of the inner ring)``; the last row and column (index
        ``k``, the corrected depth) hold ``col`` and ``row`` alone, for cells at least ``k`` from
        the other sides. None when :meth:`ratios` would be."""
        reference = self._reference()
        half = self.depth // 2
        if reference is None or not self.edge_counts[:, :half].all():
            return None
        edges = np.maximum(1.0, self.edge_sums[:, :half] / self.edge_counts[:, :half] / reference)
        corrected = np.flatnonzero((edges > 1.0).any(axis=0))
        if not corrected.size:
            return None
        k = int(corrected[-1]) + 1
        row, col = np.append(edges[0, :k], 1.0), np.append(edges[1, :k], 1.0)
        return (row[:, None] + col[None, :] - 1.0).tolist()  # [k, k] = 1: the inside


def ratio_table(ratios: BorderRatios) -> np.ndarray:
    """Stored ratios as the square table :func:`calibrate_border` indexes by (row distance,
    column distance) clipped to its last index: a 1-D list ``r`` (models saved before corner
    ratios) becomes ``r[min(i, j)]``, 1 where that is past its end, which divides every pixel
    exactly as the 1-D rule did. ValueError for any other shape."""
    table = np.asarray(ratios, dtype=np.float64)
    if table.ndim == 1:
        k = table.size
        index = np.arange(k + 1)
        return np.append(table, 1.0)[np.minimum(index[:, None], index[None, :])]
    if table.ndim != 2 or table.shape[0] != table.shape[1] or table.shape[0] < 2:
        raise ValueError(
            f"border ratios must be a list or a square table of at least 2 x 2, got shape {table.shape}"
        )
    return table


def calibrate_border(anomaly_map: np.ndarray, ratios: BorderRatios | None) -> np.ndarray:
    """Divide ``anomaly_map`` (``H x W`` float, in place) by the ratio of each pixel's (row
    distance, column distance) from the image border (:func:`ratio_table`; a 1-D list: its
    distance to the nearest side); a map too small for the ratios is corrected as deep as its own
    profile would reach (:func:`profile_depth`, halved), its deeper pixels taking the table's last
    row or column. One band of rows at a time: the ``k`` rows at each of top and bottom, then the
    ``k`` columns at each side of the rows between (no distance array, no copy)."""
    if ratios is None or len(ratios) == 0:
        return anomaly_map
    table = ratio_table(ratios).astype(anomaly_map.dtype)
    height, width = anomaly_map.shape
    last = table.shape[0] - 1
    k = min(last, profile_depth(height, width) // 2)
    if k == 0:
        return anomaly_map
    cols = np.minimum(np.arange(width), np.arange(width)[::-1])
    cols[cols >= k] = last
    for d in range(k):  # 2 k <= height / 4: the top and bottom bands never meet
        divisor = table[d][cols]
        anomaly_map[d] /= divisor
        anomaly_map[height - 1 - d] /= divisor
    sides = anomaly_map[k : height - k]
    sides[:, :k] /= table[last, :k]
    sides[:, width - k :] /= table[last, k - 1 :: -1]
    return anomaly_map
