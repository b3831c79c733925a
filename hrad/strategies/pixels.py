"""Images in their file's pixel type, converted to float a tile window (or a band) at a time.

Prediction keeps a decoded image as it came (``H x W x 3`` uint8, uint16, or float32 in [0, 1]:
:func:`hrad.data.images.as_pixels`), so a 16K x 16K 8-bit image costs its 805 MB, not the
3.2 GB of float32 RGB. :class:`PixelImage` is the strategies' view of it: a ``C x H x W`` image
in [0, 1] whose regions become float32 tensors only when a tile window is cut
(:meth:`PixelImage.region`, used by :meth:`hrad.strategies.tiling.TileGrid.window`).
:func:`resize_pixels` resizes one from its own pixel type without a float copy of the whole
image: the horizontal pass runs on bands of rows, each converted when it is read, then the
vertical pass on the (narrower) intermediate - the order PyTorch's own separable antialiased
resize uses, so the result equals ``F.interpolate`` on the float image (bit for bit on the CPU
when antialiased, within float rounding, 1e-7, for plain bilinear).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hrad.data.images import max_pixels, pixels_to_unit, unit_divisor
from hrad.errors import ConfigError
from hrad.hiad_math import bilinear_taps
from hrad.imaging import interpolate as bilinear
from hrad.imaging import shrinks

#: Pixels per band of rows converted at once by :func:`resize_pixels` (48 MB as float32 RGB).
BAND_PIXELS = 2**22
#: Source pixels per band of :func:`resize_pixels_by_rows` (12 MB as float32 RGB; its bands are
#: transient, so a smaller band keeps the allocator's high-water mark low)
ROW_BAND_PIXELS = 2**20


class PixelImage:
    """An ``H x W x C`` image in its own pixel type seen as a ``C x H x W`` float image in [0, 1].

    Nothing is converted up front; :meth:`region` converts the pixels it cuts (the value rule of
    :func:`~hrad.data.images.pixels_to_unit`: uint8 / 255, uint16 / 65535, floats as they are).
    ``padded_to`` extends the image with zeros to ``(height, width)`` without storing them (the
    ``edge="zeros"`` tile geometry).

    On an accelerator (``device`` not the CPU; ``resident`` overrides) the pixels are copied to
    the device once, still in their own type (3 bytes a pixel for 8-bit RGB), and every region is
    cut and converted there: otherwise each window, level and band would be converted to float32
    on the host and copied over at 4x the bytes (the level-0 windows alone, with their context
    margins, are twice the image), host work that a GPU's short compute cannot hide. On the CPU
    nothing is copied: regions are converted from the caller's array as they are cut.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        device: torch.device | str = "cpu",
        padded_to: tuple[int, int] | None = None,
        resident: bool | None = None,
    ) -> None:
        if pixels.ndim != 3:
            raise ValueError(f"expected an H x W x C image, got an array of shape {pixels.shape}")
        self.pixels = pixels
        self.device = torch.device(device)
        self.padded_to = self._checked_padding(padded_to)
        keep = self.device.type != "cpu" if resident is None else resident
        self._resident: tuple[Tensor, float | None] | None = device_pixels(pixels, self.device) if keep else None

    def zero_extended(self, padded_to: tuple[int, int]) -> PixelImage:
        """The same pixels (and device copy) seen as extended with zeros to ``padded_to``."""
        extended = copy.copy(self)
        extended.padded_to = self._checked_padding(padded_to)
        return extended

    def _checked_padding(self, padded_to: tuple[int, int] | None) -> tuple[int, int]:
        """``padded_to`` (the pixels' own size when None), refused when it would cut the image."""
        height, width = self.pixels.shape[:2]
        size = (height, width) if padded_to is None else padded_to
        if size[0] < height or size[1] < width:
            raise ValueError(f"cannot pad a {height}x{width} image to {size}")
        return size

    @property
    def shape(self) -> torch.Size:
        """``C x H x W`` of the (zero-extended) image, like a tensor's."""
        return torch.Size((self.pixels.shape[2], *self.padded_to))

    def region(self, top: int, bottom: int, left: int, right: int) -> Tensor:
        """Rows ``top:bottom`` and columns ``left:right`` as a float32 ``C x h x w`` tensor on the
        image's device (zeros where they pass the stored pixels)."""
        height, width = self.pixels.shape[:2]
        if self._resident is not None:
            stored, divisor = self._resident
            cut = stored[top : min(bottom, height), left : min(right, width)].permute(2, 0, 1)
            tensor = cut.to(torch.float32) if divisor is None else cut.to(torch.float32).div_(divisor)
        else:
            crop = self.pixels[top : min(bottom, height), left : min(right, width)]
            unit = pixels_to_unit(np.ascontiguousarray(crop.transpose(2, 0, 1)))
            tensor = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)).to(self.device)
        extra_h, extra_w = max(0, bottom - max(top, height)), max(0, right - max(left, width))
        if extra_h or extra_w:
            tensor = F.pad(tensor, (0, extra_w, 0, extra_h))
        return tensor

    def tensor(self) -> Tensor:
        """The whole image as a float32 ``C x H x W`` tensor (12 bytes a pixel for RGB: only for
        work that needs it whole)."""
        return self.region(0, self.shape[-2], 0, self.shape[-1])


def device_pixels(pixels: np.ndarray, device: torch.device) -> tuple[Tensor, float | None]:
    """``pixels`` on ``device`` in a type torch converts there (bools as uint8, negative values of
    signed types clipped to 0, floats as float32), and the divisor that brings them to [0, 1]
    (:func:`~hrad.data.images.unit_divisor`; None for floats)."""
    divisor = unit_divisor(pixels.dtype)
    if divisor is None:
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(device), None
    stored = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8 if pixels.dtype == np.bool_ else None)).to(device)
    if np.issubdtype(pixels.dtype, np.signedinteger):
        stored = stored.clamp_min_(0)
    return stored, divisor


#: What the tiling code accepts as an image: a float ``C x H x W`` tensor or a :class:`PixelImage`.
TileSource = Tensor | PixelImage


def as_tensor(image: TileSource) -> Tensor:
    """``image`` as a float ``C x H x W`` tensor (converted whole if it is a :class:`PixelImage`)."""
    return image.tensor() if isinstance(image, PixelImage) else image


def resize_pixels(image: PixelImage, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of a :class:`PixelImage` to a float32 ``C x h x w``
    tensor, equal to :func:`hrad.imaging.resize` on the float image (antialiased when shrinking
    along either axis, :func:`hrad.imaging.shrinks`; the flag is decided once for the whole
    resize, as PyTorch's separable kernel does, not per pass).

    The horizontal pass reads the image in bands of rows (:data:`BAND_PIXELS`), each converted
    to float when read; the vertical pass runs on the ``C x H x w`` intermediate. Peak memory: one
    band, the intermediate and the result, never the float image at its own size.
    """
    channels, height, width = image.shape
    out_h, out_w = size
    if (out_h, out_w) == (height, width):
        return image.tensor()
    antialias = shrinks((height, width), (out_h, out_w))

    def interpolate(tensor: Tensor, target: tuple[int, int]) -> Tensor:
        if tuple(tensor.shape[-2:]) == target:
            return tensor
        return bilinear(tensor, target, antialias)

    if out_w == width:
        middle = image.tensor()[None]
    else:
        middle = torch.empty((1, channels, height, out_w), dtype=torch.float32, device=image.device)
        rows = max(1, BAND_PIXELS // max(1, width))
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            middle[..., top:bottom, :] = interpolate(image.region(top, bottom, 0, width)[None], (bottom - top, out_w))
    return interpolate(middle, (out_h, out_w))[0]


def resize_pixels_by_rows(image: PixelImage, size: tuple[int, int]) -> Tensor:
    """:func:`resize_pixels` computed a band of output rows at a time: memory is the result plus one
    band, never the ``C x H x w`` intermediate (twice the result's size when halving an image).

    Each band's source rows are resized along the rows with ``F.interpolate`` (bit for bit as
    :func:`resize_pixels`), then combined down the columns with PyTorch's resampling weights
    (:func:`resampling_weights`) in float32; the result equals :func:`resize_pixels` to float32
    rounding (1e-6 on values in [0, 1]), not bit for bit.
    """
    channels, height, width = image.shape
    out_h, out_w = size
    if out_h == height:  # no vertical pass: resize_pixels is already banded
        return resize_pixels(image, size)
    antialias = shrinks((height, width), (out_h, out_w))
    starts, weights = resampling_weights(height, out_h, antialias)
    taps = weights.shape[1]
    result = torch.empty((channels, out_h, out_w), dtype=torch.float32, device=image.device)
    step = max(1, (ROW_BAND_PIXELS // max(1, width)) * out_h // height)  # output rows whose sources fill ~one band
    for top in range(0, out_h, step):
        bottom = min(out_h, top + step)
        first, last = int(starts[top]), min(height, int(starts[bottom - 1]) + taps)
        rows = image.region(first, last, 0, width)[None]
        along = rows if out_w == width else bilinear(rows, (last - first, out_w), antialias)
        band = result[:, top:bottom]
        for tap in range(taps):  # t = w0 * s0; t += wj * sj, as PyTorch's kernel accumulates
            index = torch.from_numpy(np.minimum(starts[top:bottom] + tap - first, last - first - 1)).to(image.device)
            weight = torch.from_numpy(weights[top:bottom, tap]).to(image.device)[None, :, None]
            term = along[0].index_select(1, index) * weight
            if tap == 0:
                band.copy_(term)
            else:
                band.add_(term)
    return result


def resampling_weights(size: int, output: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's bilinear resampling along one axis (``align_corners=False``; its antialiased kernel
    when ``antialias``): for each output index its first source index and ``output x taps`` float32
    weights (zero past the source's end). Antialiased, a source cell's weight is the triangle filter
    of width ``2 * max(1, scale)`` at its distance from the output cell's centre, normalised; plain
    bilinear has two taps at ``max(0, (i + 0.5) * scale - 0.5)``."""
    f32 = np.float32
    if not antialias:
        starts, _, second = bilinear_taps(output, size)
        return starts, np.stack([1 - second, second], axis=1).astype(f32)
    scale = f32(size) / f32(output)  # the ratio in float32, as PyTorch's kernels take it
    index = np.arange(output, dtype=np.float64)
    support = scale if scale >= 1 else f32(1)
    inverse = f32(1) / scale if scale >= 1 else f32(1)
    centre = scale * (index.astype(f32) + f32(0.5))
    starts = np.maximum((centre - support + f32(0.5)).astype(np.int64), 0)  # truncation, as the C++ cast
    counts = np.minimum((centre + support + f32(0.5)).astype(np.int64), size) - starts
    taps = int(counts.max())
    offsets = np.arange(taps, dtype=f32)[None, :]
    weights = np.clip(f32(1) - np.abs((offsets + starts[:, None].astype(f32) - centre[:, None] + f32(0.5)) * inverse), f32(0), None)
    weights[offsets >= counts[:, None]] = 0
    total = weights.sum(axis=1, keepdims=True, dtype=f32)
    return starts, (weights / np.where(total == 0, f32(1), total)).astype(f32)


def check_enlargement(image: tuple[int, int], size: tuple[int, int], how: str, advice: str) -> None:
    """Refuse, in one line, a setting that makes an ``image`` (height, width) into a working image
    of ``size`` over the pixel budget (:func:`~hrad.data.images.max_pixels`), larger than the image
    itself: a 100000-pixel ``image_size`` or tile over 1500x1000 capsules asked the allocator for
    120 GB and ended in a traceback (or, with the memory, in swap). ``how``: what made it
    ("resized to image_size"); ``advice``: the setting to change."""
    height, width = size
    limit = max_pixels()
    if height * width > max(limit, image[0] * image[1]):
        raise ConfigError(
            f"the {image[1]}x{image[0]} image {how} is {width}x{height} = {height * width} pixels, over the pixel budget "
            f"of {limit}: {advice} (or raise hrad --max-pixels)"
        )


def working_image(image: np.ndarray, size: tuple[int, int], device: torch.device | str = "cpu") -> TileSource:
    """An ``H x W x 3`` image (any pixel type) at ``size`` for tiling: a :class:`PixelImage`
    when no resize is needed (windows converted as they are cut), else the resized float tensor."""
    check_enlargement(image.shape[:2], size, "resized to image_size", "give a smaller image_size")
    pixels = PixelImage(image, device)
    if tuple(size) == tuple(image.shape[:2]):
        return pixels
    return resize_pixels(pixels, size)
