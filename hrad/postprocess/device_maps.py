"""The map post-processing of :mod:`hrad.postprocess.smoothing` on torch tensors, on the map's device.

A strategy whose maps come off an accelerator (HiAD's branches) can blur and score them there and
copy only the finished map to the host: on the host, OpenCV's blur and box filter of a 2K map
take tens of milliseconds that the device would spend idle. Same values as the host functions to
float32 rounding: the same kernel (OpenCV's ``getGaussianKernel``, its ``BORDER_REFLECT`` border)
and the same pooled maximum. Needs torch, so it is kept apart from ``smoothing`` (which the
torch-free export runtime imports).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hrad.postprocess.smoothing import blur_radius


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


__all__ = ["gaussian_blur", "pooled_max"]
