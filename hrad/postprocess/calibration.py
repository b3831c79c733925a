"""Score calibration from held-out good images, shared by every multi-detector strategy.

When one map is assembled from several detectors (HiAD's pool and low branch, tiled
ensembles), their raw scores live on unrelated scales: a max or an average over them is only
meaningful after each is mapped to a common range. :class:`MinMaxCalibration` stores, per
named detector, the min and max of its maps on validation images (good ones plus copies with
pseudo-anomalies from :func:`paste_pseudo_anomalies`) and maps scores with
``clip((s - min) / (max - min), 0, 1)``. The statistics are fixed after calibration, so a
single image's output never depends on which other images are predicted (the reference
evaluation's test-set min-max normalisation is deliberately not reproduced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hrad.errors import ArtifactError, ConfigError
from hrad.hiad_math import normalize_range

#: side ranges (pixels, at :data:`PSEUDO_REFERENCE_SIDE`) of the two rectangle families
SMALL_SIDES = (16, 40)
LARGE_SIDES = (80, 100)
#: accepted mean absolute colour difference to the covered pixels, in [0, 1] units (20..50 of 255)
DIFFERENCE_RANGE = (20 / 255, 50 / 255)
#: the paper's rectangles are sized for 2K images; images whose short side is below this get
#: proportionally smaller rectangles so a pseudo-anomaly stays a small part of the image
PSEUDO_REFERENCE_SIDE = 1024


def pseudo_anomaly_scale(height: int, width: int) -> float:
    """Factor applied to rectangle sides: 1 for images of >= 1024 px short side, less below."""
    return min(1.0, min(height, width) / PSEUDO_REFERENCE_SIDE)


def paste_pseudo_anomalies(
    image: np.ndarray,
    rng: np.random.Generator,
    max_count: int = 5,
    small_sides: tuple[int, int] = SMALL_SIDES,
    large_sides: tuple[int, int] = LARGE_SIDES,
    difference_range: tuple[float, float] = DIFFERENCE_RANGE,
    attempts: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste 1..``max_count`` random flat-colour rectangles into a copy of ``image``.

    Each rectangle's sides come from ``small_sides`` or ``large_sides`` (chosen at random,
    scaled by :func:`pseudo_anomaly_scale`, at least 2 px); its colour is drawn around the
    mean of the covered pixels with a random per-channel offset and kept only when the mean
    absolute difference to the covered pixels lies in ``difference_range`` -- visible, but not
    trivially so, like the paper's validation anomalies. Returns the new image and the bool
    mask of pasted pixels; the input is not modified.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"paste_pseudo_anomalies: expected an H x W x 3 image, got shape {image.shape}")
    height, width = image.shape[:2]
    out = np.array(image, dtype=np.float32, copy=True)
    mask = np.zeros((height, width), dtype=bool)
    scale = pseudo_anomaly_scale(height, width)
    low_diff, high_diff = difference_range
    count = int(rng.integers(1, max_count + 1))
    for _ in range(count):
        sides = small_sides if rng.random() < 0.5 else large_sides
        rect_h = _scaled_side(rng, sides, scale, height)
        rect_w = _scaled_side(rng, sides, scale, width)
        y = int(rng.integers(0, height - rect_h + 1))
        x = int(rng.integers(0, width - rect_w + 1))
        region = out[y : y + rect_h, x : x + rect_w]
        mean = region.reshape(-1, 3).mean(axis=0)
        for _ in range(attempts):
            offset = rng.uniform(low_diff, high_diff, size=3) * rng.choice([-1.0, 1.0], size=3)
            colour = np.clip(mean + offset, 0.0, 1.0).astype(np.float32)
            difference = float(np.abs(region - colour).mean())
            if low_diff <= difference <= high_diff:
                out[y : y + rect_h, x : x + rect_w] = colour
                mask[y : y + rect_h, x : x + rect_w] = True
                break
    return out, mask


def _scaled_side(rng: np.random.Generator, sides: tuple[int, int], scale: float, limit: int) -> int:
    side = int(rng.integers(sides[0], sides[1] + 1))
    return int(min(limit, max(2, round(side * scale))))


@dataclass
class Range:
    low: float = math.inf
    high: float = -math.inf

    @property
    def empty(self) -> bool:
        return self.low > self.high


class MinMaxCalibration:
    """Per-name min/max of validation maps; maps raw scores to [0, 1].

    ``update`` accumulates statistics (streaming: one map at a time), ``normalize`` applies
    them. A name never updated has no scale: ``normalize`` raises unless ``fallback`` names
    another one (e.g. the union of the pool, for a detector no validation patch reached).
    """

    def __init__(self) -> None:
        self._ranges: dict[str, Range] = {}

    def update(self, name: str, values: Tensor | np.ndarray) -> None:
        data = torch.as_tensor(values)
        if data.numel() == 0:
            return
        finite = data[torch.isfinite(data)]
        if finite.numel() == 0:
            return
        entry = self._ranges.setdefault(name, Range())
        entry.low = min(entry.low, float(finite.min()))
        entry.high = max(entry.high, float(finite.max()))

    def names(self) -> list[str]:
        return sorted(name for name, entry in self._ranges.items() if not entry.empty)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._ranges and not self._ranges[name].empty

    def range(self, name: str) -> tuple[float, float]:
        if name not in self:
            raise ConfigError(
                f"calibration has no statistics for {name!r}; run calibrate() on held-out images first"
            )
        entry = self._ranges[name]
        return entry.low, entry.high

    def union(self, names: list[str]) -> tuple[float, float]:
        """Smallest min and largest max over ``names`` that have statistics."""
        known = [self.range(name) for name in names if name in self]
        if not known:
            raise ConfigError(
                "calibration has no statistics at all; run calibrate() on held-out images first"
            )
        return min(low for low, _ in known), max(high for _, high in known)

    def set_range(self, name: str, low: float, high: float) -> None:
        self._ranges[name] = Range(low, high)

    def complete_pool(self, names: list[str], anomalous: set[str] | None = None) -> None:
        """Give every detector of a pool a range the others' can be compared with.

        A detector no validation map reached takes the pool's joint range. ``anomalous`` names
        the detectors whose validation maps covered pasted pseudo-anomalies: the max of such a
        detector is an anomalous response, while the max of one that no pseudo-anomaly reached is
        only its largest normal score, and min-max would lift its normal maps to where the others
        put anomalies (few held-out images, few patches per detector: one such detector lit every
        normal map of its patches). So, when ``anomalous`` names any, the others keep their
        minimum and take the largest maximum among them. Deviation from the HiAD paper, whose
        per-detector min-max has no such case at its data sizes.
        """
        joint = self.union(names)
        for name in names:
            if name not in self:
                self.set_range(name, *joint)
        reached = [name for name in names if name in (anomalous or set())]
        if not reached:
            return
        peak = max(self.range(name)[1] for name in reached)
        for name in names:
            if name not in reached:
                low, high = self.range(name)
                self.set_range(name, low, max(high, peak))

    def normalize(self, name: str, values: Tensor) -> Tensor:
        low, high = self.range(name)
        return normalize_range(values, low, high)

    def state_dict(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for name in self.names():
            low, high = self._ranges[name].low, self._ranges[name].high
            state[f"{name}.min"] = torch.tensor(low, dtype=torch.float64)
            state[f"{name}.max"] = torch.tensor(high, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._ranges = {}
        for key in state:
            if not key.endswith(".min"):
                continue
            name = key[: -len(".min")]
            if f"{name}.max" not in state:
                raise ArtifactError(
                    f"calibration state has {key} but no {name}.max; the artifact is incomplete"
                )
            self._ranges[name] = Range(float(state[key]), float(state[f"{name}.max"]))
