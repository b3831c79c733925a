"""The one resize of image and map tensors, used by every strategy, the image-space anomaly
synthesis and the RD++ / DeSTSeg decoders (the torch-free export runtime mirrors it with Pillow).

Rule: bilinear, ``align_corners=False``, antialiased exactly when the output is smaller than the
input along either axis (so a small defect is averaged into the smaller image instead of being
skipped by the sampling grid), a no-op at the same size. Upsampling is plain bilinear:
PyTorch's antialiased kernel has the bilinear kernel's support when enlarging, so switching it on
there only changes float rounding (at most 1.6e-6 on values in [0, 1], measured on torch 2.13)
and costs time. Imports nothing of hrad, so any layer may use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def shrinks(source: Sequence[int], target: Sequence[int]) -> bool:
    """The antialias rule: whether resizing ``source`` = (height, width) to ``target`` shrinks
    along either axis."""
    return target[0] < source[0] or target[1] < source[1]


def interpolate(tensor: Tensor, size: Sequence[int], antialias: bool) -> Tensor:
    """``F.interpolate`` bilinear (``align_corners=False``) of ``B x C x H x W`` to ``size``.

    One PyTorch case is mended: an antialiased resize to width 1 that also changes the height
    gives every output row the value of the first (torch 2.13 on the CPU: a 6 x 8 ramp resized to
    3 x 1 came out 9.2, 9.2, 9.2 instead of 9.2, 23.5, 37.8), which would flatten a line-scan strip
    shrunk to one column. Resizing the transpose to height 1 is right (the two axes are separable).
    """
    height, width = size
    if antialias and width == 1 and height != tensor.shape[-2]:
        flipped = F.interpolate(tensor.transpose(-1, -2), size=(1, height), mode="bilinear", align_corners=False, antialias=True)
        return flipped.transpose(-1, -2).contiguous()
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)


def resize(tensor: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``B x C x H x W`` to ``size`` = (height, width), antialiased when
    shrinking along either axis; returns ``tensor`` itself when it already has that size."""
    height, width = int(size[0]), int(size[1])
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    return interpolate(tensor, (height, width), shrinks((tensor.shape[-2], tensor.shape[-1]), (height, width)))


__all__ = ["interpolate", "resize", "shrinks"]
