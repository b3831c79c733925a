"""Full-resolution post-processing of anomaly maps: smoothing and image-score rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hrad.hiad_math import pooled_max, pooled_max_of_bands
from hrad.postprocess.border import calibrate_border
from hrad.postprocess.roi import RegionOfInterest


class PostprocessConfig(BaseModel):
    """Applied by the model to every strategy's full-resolution map."""

    #: inf and NaN refused: no setting means them, and hrad.json (strict JSON) cannot hold them
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: Gaussian sigma in full-resolution pixels (0 = off); HiAD's reference uses 4
    sigma: float = Field(4.0, ge=0)
    #: image score: the strategy's score, the map maximum, or the mean of the top fraction of pixels
    image_score: Literal["strategy", "max", "top-fraction"] = "strategy"
    #: fraction of the highest pixels averaged by image_score="top-fraction"
    top_fraction: float = Field(0.001, gt=0, le=1)
    #: divide out the held-out normal maps' excess along the image border (hrad.postprocess.border),
    #: learned when the model's thresholds are; models fitted before it, or with it off, have none
    border_calibration: bool = True


#: Values blurred at a time by :func:`gaussian_smooth` in place and :func:`blurred_bands` (16 MB of float32 rows).
_BAND_VALUES = 2**22


def blur_radius(sigma: float) -> int:
    """Half the side of the Gaussian kernel of ``sigma`` (+-4 sigma): the host blur's and the
    device blur's (:mod:`hrad.postprocess.device_maps`)."""
    return int(4 * sigma + 0.5)


def gaussian_smooth(anomaly_map: np.ndarray, sigma: float, in_place: bool = False) -> np.ndarray:
    """Gaussian blur with a kernel of +-4 sigma (OpenCV: fast at 8K), borders reflected.

    ``in_place`` writes the result into ``anomaly_map`` (when it is a writable, C-contiguous
    float32 ``H x W`` array; otherwise a new array is returned as without it) a band of rows at a
    time, each band blurred with ``radius`` original rows of context on both sides, so smoothing
    costs one band rather than a second full map (OpenCV's own in-place blur copies its input
    whole first). The result equals the out-of-place blur.
    """
    if sigma <= 0:
        return anomaly_map
    array = np.asarray(anomaly_map, dtype=np.float32)
    usable = array is anomaly_map and array.ndim == 2 and array.flags.c_contiguous and array.flags.writeable
    if not in_place or not usable:
        return _blur(array, sigma)
    for top, rows in blurred_bands(array, sigma):  # each band computed before its rows are written
        array[top : top + len(rows)] = rows
    return array


def _blur(array: np.ndarray, sigma: float) -> np.ndarray:
    radius = blur_radius(sigma)
    return cv2.GaussianBlur(array, (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def blurred_bands(anomaly_map: np.ndarray, sigma: float, band_values: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`gaussian_smooth` of an ``H x W`` map a band of rows at a time, without a second full
    map: yields ``(first row, blurred rows)`` top to bottom (about ``band_values`` values each,
    default 2^22); concatenated, the bands equal the whole blur. Each band is blurred with
    ``radius`` original rows of context on both sides (reflected at the map's own top and bottom
    as ``BORDER_REFLECT`` does). A band is computed, and the rows the next band needs above it
    copied, before it is yielded, so the caller may write it back into ``anomaly_map``
    (:func:`gaussian_smooth` in place). ``sigma <= 0`` yields the map's own rows (views)."""
    array = np.asarray(anomaly_map, dtype=np.float32)
    radius = blur_radius(sigma) if sigma > 0 else 0
    band = max(4 * radius, 1, (_BAND_VALUES if band_values is None else band_values) // max(1, array.shape[-1]))
    if sigma <= 0 or len(array) <= band:
        for top in range(0, len(array), band):
            yield top, (array[top : top + band] if sigma <= 0 else _blur(array, sigma))
        return
    above = array[:0].copy()  # the original rows just above the band being blurred
    for top in range(0, len(array), band):
        bottom = min(len(array), top + band)
        below = array[bottom : bottom + radius]  # not written yet: still the original rows
        block = np.concatenate([above, array[top:bottom], below])
        pad_top, pad_bottom = radius - len(above), radius - len(below)
        if pad_top or pad_bottom:  # the image's own top or bottom border: reflected as BORDER_REFLECT does
            block = np.pad(block, ((pad_top, pad_bottom), (0, 0)), mode="symmetric")
        above = array[max(top, bottom - radius) : bottom].copy()
        yield top, _blur(block, sigma)[radius : radius + bottom - top]


def top_count(size: int, fraction: float) -> int:
    """How many of ``size`` pixels the top-fraction score averages (at least one); the host's and
    the device's rule (:mod:`hrad.postprocess.device_maps`)."""
    return max(1, int(round(size * fraction)))


def top_fraction_mean(anomaly_map: np.ndarray, fraction: float) -> float:
    """Mean of the highest ``fraction`` of pixels (at least one)."""
    flat = anomaly_map.ravel()
    count = top_count(flat.size, fraction)
    return float(np.partition(flat, flat.size - count)[flat.size - count :].mean())


def score_rule(config: PostprocessConfig, roi: RegionOfInterest | None) -> Literal["strategy", "max", "top-fraction"]:
    """Which image score a finished map gets: the configured one, but ``max`` for ``strategy``
    with a region of interest (a strategy's score may come from outside it). Decided here once
    for the host's :func:`image_score` and the device's twin."""
    return "max" if roi is not None and config.image_score == "strategy" else config.image_score


def image_score(
    anomaly_map: np.ndarray, strategy_score: float, config: PostprocessConfig, roi: RegionOfInterest | None = None
) -> float:
    """The configured image score of a finished map; with a region of interest, of the map
    inside it (:func:`score_rule`)."""
    values = anomaly_map if roi is None else roi.inside(anomaly_map)
    rule = score_rule(config, roi)
    if rule == "max":
        return float(values.max())
    if rule == "top-fraction":
        return top_fraction_mean(values, config.top_fraction)
    return float(strategy_score)


@dataclass(frozen=True)
class MapScore:
    """A strategy's image score that is a function of its raw map (HiAD's reference rule): the
    max of the ``pool x pool`` mean (stride 1) of the map blurred with ``sigma``. Such a score can
    be taken again on the border-calibrated map instead of being scaled by the peak's ratio."""

    sigma: float
    pool: int

    def of(self, anomaly_map: np.ndarray) -> float:
        """The score of ``anomaly_map`` (not modified), blurred a band of rows at a time."""
        height = len(anomaly_map)
        return pooled_max_of_bands((rows for _, rows in blurred_bands(anomaly_map, self.sigma)), height, self.pool)


def score_after_border(map_score: MapScore | None, sigma: float) -> Literal["scaled", "smoothed", "own blur"]:
    """How a strategy's score follows its border-calibrated map (:func:`smooth_and_score`):
    ``scaled`` by what the calibration took off the map's peak (no ``map_score``), the pooled
    maximum of the ``smoothed`` map (``map_score``'s blur is the model's ``sigma``), or of the
    calibrated map under its ``own blur``. Decided here once for the host and the device path."""
    if map_score is None:
        return "scaled"
    return "smoothed" if map_score.sigma == sigma else "own blur"


def smooth_and_score(
    raw_map: np.ndarray,
    raw_score: float,
    config: PostprocessConfig,
    border_ratios: list[float] | None = None,
    roi: RegionOfInterest | None = None,
    map_score: MapScore | None = None,
) -> tuple[np.ndarray, float]:
    """What every predictor (the model, each exported runtime) ends with: the raw map calibrated
    at the image border (:func:`~hrad.postprocess.border.calibrate_border`, with the model's
    ``border_ratios``), blurred in place (the caller hands over a map it no longer needs, so no
    second full map is made), and the configured image score of the blurred map.

    A region of interest (:mod:`hrad.postprocess.roi`) then sets the map outside it to its
    lowest value inside and the score is taken inside it. The strategy's own score
    (``image_score="strategy"``, without a region) is scaled by what the border calibration
    took off the map's peak (``max after / max before``): 1 when the peak lies inside, the peak's
    own ratio when it lay on the border frame. A strategy whose score is a function of its map
    (``map_score``: HiAD's pooled maximum) is scored again on the calibrated map instead: scaling
    by the peak's ratio is right only when the pooled maximum lies where the map's peak does; a
    good image whose peak sat on the border frame kept its frame's score (``benchmarks/hiad_image_score.py``).
    ``config.border_calibration`` off: no calibration. A map the strategy left on its device
    (HiAD on a GPU) is finished there by the torch twin,
    :func:`hrad.postprocess.device_maps.smooth_and_score` (same rules, one copy back).
    """
    pool: int | None = None  # the score's pooling, taken on the smoothed map (the score's own blur)
    if border_ratios and config.border_calibration:
        if raw_map.dtype != np.float32 or not raw_map.flags.writeable:
            raw_map = raw_map.astype(np.float32)
        peak = float(raw_map.max())
        calibrate_border(raw_map, border_ratios)
        rule = score_after_border(map_score, config.sigma)
        if rule == "scaled":
            if peak > 0 and raw_score > 0:
                raw_score *= float(raw_map.max()) / peak
        elif rule == "smoothed":
            assert map_score is not None
            pool = map_score.pool
        else:  # its own blur, before the map is smoothed in place
            assert map_score is not None
            raw_score = map_score.of(raw_map)
    smoothed = gaussian_smooth(raw_map, config.sigma, in_place=True)
    if pool is not None:
        raw_score = pooled_max(smoothed, pool)
    if roi is not None:  # outside the region: the lowest value inside (hrad.postprocess.roi)
        if smoothed.dtype != np.float32 or not smoothed.flags.writeable:
            smoothed = smoothed.astype(np.float32)
        roi.apply(smoothed)
    return smoothed, image_score(smoothed, raw_score, config, roi)
