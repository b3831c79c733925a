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
corrected. Computed and applied one ring of pixels at a time: no distance array, no copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: deepest distance from the border profiled, in pixels
MAX_DEPTH = 256


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

    def update(self, anomaly_map: np.ndarray) -> None:
        array = np.asarray(anomaly_map)
        depth = profile_depth(*array.shape)
        self.depth = min(self.depth, depth)
        self.negative = self.negative or bool(array.min() < 0)
        for d, views in rings(array, depth):
            self.sums[d] += sum(float(view.sum(dtype=np.float64)) for view in views)
            self.counts[d] += sum(view.size for view in views)

    def ratios(self) -> list[float] | None:
        """Per distance ``d`` (the first half of the profiled depth): ``max(1, mean(d) / mean of
        the inner ring)``; None when nothing was profiled, a map had negative values, or no
        distance exceeds the inner ring."""
        half = self.depth // 2
        if half < 2 or self.negative or not self.counts[: self.depth].all():
            return None
        reference = self.sums[half : self.depth].sum() / self.counts[half : self.depth].sum()
        if reference <= 0:
            return None
        means = self.sums[:half] / self.counts[:half]
        ratios = np.maximum(1.0, means / reference)
        if not (ratios > 1.0).any():
            return None
        # trailing ones carry nothing: stop at the last distance that is corrected
        last = int(np.flatnonzero(ratios > 1.0)[-1])
        return [float(r) for r in ratios[: last + 1]]


def calibrate_border(anomaly_map: np.ndarray, ratios: list[float] | None) -> np.ndarray:
    """Divide ``anomaly_map`` (``H x W`` float, in place) by ``ratios[d]`` at distance ``d`` from
    the image border; a map too small for the ratios is corrected as deep as its own profile
    would reach (:func:`profile_depth`, halved)."""
    if not ratios:
        return anomaly_map
    depth = min(len(ratios), profile_depth(*anomaly_map.shape[-2:]) // 2)
    for d, views in rings(anomaly_map, depth):
        for view in views:
            view /= np.asarray(ratios[d], dtype=anomaly_map.dtype)
    return anomaly_map
