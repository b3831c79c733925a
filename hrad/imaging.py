"""The one resize of image and map tensors, used by every strategy and the export runtimes.

Rule: bilinear, ``align_corners=False``, antialiased exactly when the output is smaller than the
input along either axis (so a small defect is averaged into the smaller image instead of being
skipped by the sampling grid), a no-op at the same size. Upsampling is plain bilinear:
PyTorch's antialiased kernel has the bilinear kernel's support when enlarging, so switching it on
there only changes float rounding (at most 1.6e-6 on values in [0, 1], measured on torch 2.13)
and costs time. Imports nothing of hrad, so any layer may use it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def shrinks(source: tuple[int, int], target: tuple[int, int]) -> bool:
    """The antialias rule: whether resizing ``source`` = (height, width) to ``target`` shrinks
    along either axis."""
    return target[0] < source[0] or target[1] < source[1]


def resize(tensor: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``B x C x H x W`` to ``size`` = (height, width), antialiased when
    shrinking along either axis; returns ``tensor`` itself when it already has that size."""
    height, width = int(size[0]), int(size[1])
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    antialias = shrinks((tensor.shape[-2], tensor.shape[-1]), (height, width))
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)


__all__ = ["resize", "shrinks"]
