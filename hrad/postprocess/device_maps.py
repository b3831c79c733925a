"""The map post-processing of :mod:`hrad.postprocess.smoothing` on torch tensors, on the map's device.

A strategy whose maps come off an accelerator (HiAD's branches) can blur and score them there and
copy only the finished map to the host: on the host, OpenCV's blur and box filter of a 2K map
take tens of milliseconds that the device would spend idle. The model finishes such a map there
too (:func:`smooth_and_score`: border calibration, blur, region of interest, image score), so a
GPU predict waits on the host once, for the finished map and score. Same values as the host
functions to float32 rounding: the same kernel (OpenCV's ``getGaussianKernel``, its
``BORDER_REFLECT`` border), the same pooled maximum, the border ratios as a factor map of
:func:`~hrad.postprocess.border.calibrate_border` itself. Needs torch, so it is kept apart from
``smoothing`` (which the torch-free export runtime imports). On a CPU the host functions are
faster (OpenCV's 33-tap blur of a 2K map: 30 ms against 0.9 s here), which is why the CPU keeps them.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hrad.postprocess.border import BorderRatios, calibrate_border
from hrad.postprocess.roi import RegionOfInterest
from hrad.postprocess.smoothing import (
    MapScore,
    PostprocessConfig,
    blur_radius,
    score_after_border,
    score_rule,
    top_count,
)


@lru_cache(maxsize=16)
def _kernel(sigma: float, device: torch.device) -> Tensor:
    """OpenCV's float32 Gaussian taps for ``sigma`` (the ones ``cv2.GaussianBlur`` applies to a
    float32 map), on ``device``: copied once per sigma and device, not once per map."""
    taps = cv2.getGaussianKernel(2 * blur_radius(sigma) + 1, sigma, ktype=cv2.CV_32F)[:, 0]
    return torch.from_numpy(np.ascontiguousarray(taps)).to(device)


def _reflected(size: int, radius: int, device: torch.device) -> Tensor:
    """Indices of a side of ``size`` extended by ``radius`` on both ends as OpenCV's
    ``BORDER_REFLECT`` does (``cba|abcd|dcb``, mirrored again past a side shorter than ``radius``),
    computed on ``device``."""
    index = torch.arange(-radius, size + radius, device=device).remainder(2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


def _filter(padded: Tensor, kernel: Tensor, size: int, dim: int) -> Tensor:
    """The 1-D ``kernel`` slid along ``dim`` of ``padded`` (``size + len(kernel) - 1`` long there):
    one multiply-add per tap over the whole map, in float32 (a convolution would leave the choice
    of algorithm, and TF32 on recent GPUs, to cuDNN), the taps' weights device tensors (no host
    value, so no wait)."""
    out = padded.narrow(dim, 0, size) * kernel[0]
    for tap in range(1, len(kernel)):
        out.addcmul_(padded.narrow(dim, tap, size), kernel[tap])
    return out


def gaussian_blur(anomaly_map: Tensor, sigma: float) -> Tensor:
    """:func:`~hrad.postprocess.smoothing.gaussian_smooth` of an ``H x W`` float32 tensor, on its
    device (a new tensor; ``anomaly_map`` itself when ``sigma <= 0``): separable, rows first as
    OpenCV, each pass over the map reflected as OpenCV's ``BORDER_REFLECT``. Elementwise passes
    made for a GPU (a 2K map at sigma 4: 2 x 33 memory-bound kernels); on a CPU OpenCV's blur is
    several times faster, which is why the host path uses it."""
    if sigma <= 0:
        return anomaly_map
    radius = blur_radius(sigma)
    device = anomaly_map.device
    kernel = _kernel(float(sigma), device)
    height, width = anomaly_map.shape
    along = _filter(anomaly_map.index_select(1, _reflected(width, radius, device)), kernel, width, 1)
    return _filter(along.index_select(0, _reflected(height, radius, device)), kernel, height, 0)


def pooled_max(anomaly_map: Tensor, pool: int) -> Tensor:
    """:func:`hrad.hiad_math.pooled_max` of an ``H x W`` tensor as a 0-d tensor on its device (read
    it with ``float()`` once the rest of the work is queued): the maximum of the ``pool x pool``
    means (stride 1, inside the map; a side shorter than ``pool`` averaged whole)."""
    height, width = anomaly_map.shape
    window = (min(pool, height), min(pool, width))
    return F.avg_pool2d(anomaly_map[None, None], window, stride=1).amax()


def border_factors(shape: tuple[int, int], ratios: BorderRatios, device: torch.device) -> Tensor:
    """``1 / ratio`` of every pixel of an ``H x W`` map (:func:`~hrad.postprocess.border.calibrate_border`
    of ones: the same rule, not a second one), on ``device``: a map times it is the map divided
    by its border ratios (to float32 rounding). Made and copied once per size, ratios and device."""
    table = np.asarray(ratios, dtype=np.float64)  # a 1-D list or a corner table
    return _border_factors((int(shape[0]), int(shape[1])), table.shape, table.tobytes(), device)


@lru_cache(maxsize=8)
def _border_factors(shape: tuple[int, int], table_shape: tuple[int, ...], table: bytes, device: torch.device) -> Tensor:
    ratios = np.frombuffer(table, dtype=np.float64).reshape(table_shape)
    return torch.from_numpy(calibrate_border(np.ones(shape, dtype=np.float32), ratios)).to(device)


@lru_cache(maxsize=8)
def _region(roi: RegionOfInterest, shape: tuple[int, int], device: torch.device) -> tuple[Tensor, int] | None:
    """The region stretched to ``shape`` on ``device`` and how many pixels it holds; None where it
    covers everything or nothing at that size (the map is then finished as without one, as
    :meth:`~hrad.postprocess.roi.RegionOfInterest.apply` does). Copied once per region, size and device."""
    inside = roi.at(shape)
    count = int(inside.sum())
    if count in (0, inside.size):
        return None
    return torch.from_numpy(np.ascontiguousarray(inside)).to(device), count


def smooth_and_score(
    raw_map: Tensor,
    raw_score: Tensor | float,
    config: PostprocessConfig,
    border_ratios: BorderRatios | None = None,
    roi: RegionOfInterest | None = None,
    map_score: MapScore | None = None,
) -> tuple[np.ndarray, float]:
    """:func:`hrad.postprocess.smoothing.smooth_and_score` of a strategy's ``H x W`` map on its
    device (``raw_score``: a 0-d tensor there, or a number): the same border calibration (a
    cached factor map, :func:`border_factors`), blur, region of interest and score rules
    (:func:`~hrad.postprocess.smoothing.score_after_border`, :func:`~hrad.postprocess.smoothing.score_rule`),
    every step queued on the device and no value read back until the end: the finished map and
    the score come to the host in ONE copy (the score appended to the map's values), so the host
    waits once. Returns the float32 numpy map and the score (float32 on the device: a number
    ``raw_score`` kept as the image score is rounded to float32).

    Deviation from the host function: it works in place on a map the caller hands over (one full
    map); this one makes new tensors (the calibrated map, the blur's padded passes, the packed
    copy: a few maps of the image's size in device memory, 16 MB each at 2K)."""
    anomaly_map = raw_map.float()
    device = anomaly_map.device
    shape = (int(anomaly_map.shape[0]), int(anomaly_map.shape[1]))
    score = raw_score.to(device, torch.float32) if isinstance(raw_score, Tensor) else anomaly_map.new_full((), float(raw_score))
    pool: int | None = None
    if border_ratios is not None and len(border_ratios) and config.border_calibration:
        peak = anomaly_map.amax()
        anomaly_map = anomaly_map * border_factors(shape, border_ratios, device)
        after = score_after_border(map_score, config.sigma)
        if after == "scaled":  # where either is not positive the score stays (torch.where: no host branch)
            score = torch.where((peak > 0) & (score > 0), score * (anomaly_map.amax() / peak), score)
        elif after == "smoothed":
            assert map_score is not None
            pool = map_score.pool
        else:
            assert map_score is not None
            score = pooled_max(gaussian_blur(anomaly_map, map_score.sigma), map_score.pool)
    smoothed = gaussian_blur(anomaly_map, config.sigma)
    if pool is not None:
        score = pooled_max(smoothed, pool)
    region = None if roi is None else _region(roi, shape, device)
    if region is not None:  # outside: the lowest value inside
        inside = region[0]
        smoothed = torch.where(inside, smoothed, torch.where(inside, smoothed, torch.inf).amin())
    rule = score_rule(config, roi)
    # outside the region every value is the lowest inside, so the whole map's maximum and its top
    # values (taken no deeper than the region's own count) are the region's
    if rule == "max":
        score = smoothed.amax()
    elif rule == "top-fraction":
        count = top_count(smoothed.numel() if region is None else region[1], config.top_fraction)
        score = torch.topk(smoothed.reshape(-1), count, sorted=False).values.mean()
    return to_host(smoothed, score)


def to_host(anomaly_map: Tensor, score: Tensor) -> tuple[np.ndarray, float]:
    """A device map (float32 numpy) and its 0-d score (a float) in ONE copy, the score appended
    to the map's values: the host waits once, where ``.cpu()`` of each would wait twice."""
    packed = torch.cat([anomaly_map.float().reshape(-1), score.to(anomaly_map.device, torch.float32).reshape(1)]).cpu().numpy()
    return packed[:-1].reshape(anomaly_map.shape), float(packed[-1])


__all__ = ["border_factors", "gaussian_blur", "pooled_max", "smooth_and_score", "to_host"]
