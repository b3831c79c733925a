"""Image-space synthetic anomalies, DRAEM-style: thresholded Perlin-noise masks filled with a
blend of the image and a jittered donor image, and the exact mask fraction of every token.

The one place images are corrupted for training. Strategies call it when a detector asks for
image-space anomalies (``synthesis="image"``, :meth:`hrad.detectors.base.Detector.image_anomalies`):
they embed the corrupted copy through the same backbone and hand the detector the embeddings and
:func:`cell_fractions` of the mask, so detectors still never see images.

Rules (DRAEM, Zehnder et al. ICCV 2021, ``data_loader.py``; DeSTSeg uses the same):

- **noise**: 2-D Perlin (gradient) noise, :func:`perlin_noise`, with ``2^k`` lattice periods per
  ``unit`` pixels along each axis, ``k`` drawn independently per axis from 0..5 (DRAEM: ``2^0..2^5``
  periods over its 256-pixel image; here ``unit`` is the tile or patch a detector sees, so blobs
  have the same size relative to it);
- **mask**: the noise's superlevel set covering a fraction of ``region`` (the pixels a detector's
  tokens cover) drawn uniformly from ``fraction_range``; outside ``region`` the mask is empty.
  *Deviation*: DRAEM thresholds at 0.5, which leaves the covered fraction to chance (median 5.4 %,
  90 % between 0.1 % and 10 %, measured in :mod:`hrad.detectors.destseg`'s docstring); the
  quantile threshold keeps the same area law as the feature-space synthesis
  (:func:`hrad.detectors.synthetic.synthesise_anomalies`), so the two differ only in where the
  anomaly is made. A fraction ``clean_probability`` of the images stays clean (empty mask);
- **paste**: inside the mask the pixels become ``beta * image + (1 - beta) * donor``,
  ``beta ~ U(0, 0.8)`` (DRAEM's opacity). *Deviation*: DRAEM's donor is a DTD texture image; no
  external data is used here, so the donor is the *previous image of the stream* (the previous
  training tile / image of the fit; the first one is its own donor), flipped at random and
  colour-jittered with DRAEM's texture augmentations that need no library: gamma contrast
  ``U(0.5, 2)``, brightness ``* U(0.8, 1.2) + U(-30, 30) / 255``, clipped to [0, 1] (a CutPaste /
  NSA-like self-source). The donor is *not* shifted with wrap-around (``roll``): the wrap seam is
  a straight horizontal / vertical step that DRAEM's texture donors never have, and a
  discriminator trained on it fires on straight features that normal images have too (capsules,
  downsampling: the maxima of good images sat on lines along the bottom / right border, image
  AUROC below chance; ``benchmarks/results/realnet_synthesis_v2/``). DRAEM's random rotation of
  the noise is not applied (the per-axis scales already vary the blobs' shape).

Everything is drawn from one seeded ``torch.Generator`` in the order the images arrive, so a fit
is reproducible. Memory: the images of one call, a few float32 maps of their size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hrad.imaging import resize

#: DRAEM draws the Perlin periods per axis as 2^k, k in 0..5
PERLIN_MAX_POWER = 5
#: DRAEM's opacity of the original image inside the mask: U(0, 0.8)
MAX_OPACITY = 0.8
#: DRAEM's texture augmentations used on the donor
GAMMA_RANGE = (0.5, 2.0)
BRIGHTNESS_GAIN = (0.8, 1.2)
BRIGHTNESS_OFFSET = 30 / 255

#: (top, left, height, width) of the pixels a detector's tokens cover
Region = tuple[int, int, int, int]


def _fade(t: Tensor) -> Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    height: int, width: int, periods: tuple[float, float], generator: torch.Generator, device: torch.device | str = "cpu"
) -> Tensor:
    """``height x width`` Perlin noise with ``periods`` lattice cells along (rows, columns).

    DRAEM's ``rand_perlin_2d``: a random unit gradient at every lattice corner, the dot products
    of the four corners' gradients with the offsets to them, blended by the quintic fade
    ``6t^5 - 15t^4 + 10t^3`` and scaled by ``sqrt(2)`` (values within [-1, 1]). Pixel ``i`` sits at
    lattice coordinate ``i * periods / size``, so any size works (DRAEM needs the size to be a
    multiple of the periods).
    """
    device = torch.device(device)
    coords = []
    for size, period in zip((height, width), periods, strict=True):
        position = torch.arange(size, device=device, dtype=torch.float32) * (float(period) / size)
        cell = position.floor()
        coords.append((cell.long(), position - cell))
    (row, fy), (col, fx) = coords
    angles = 2 * math.pi * torch.rand(
        int(row.max()) + 2, int(col.max()) + 2, generator=generator, device=device
    )
    grad_y, grad_x = torch.sin(angles), torch.cos(angles)

    def corner(dy: int, dx: int) -> Tensor:
        rows, cols = (row + dy)[:, None], (col + dx)[None, :]
        return grad_y[rows, cols] * (fy - dy)[:, None] + grad_x[rows, cols] * (fx - dx)[None, :]

    uy, ux = _fade(fy)[:, None], _fade(fx)[None, :]
    top = torch.lerp(corner(0, 0), corner(0, 1), ux)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), ux)
    return math.sqrt(2) * torch.lerp(top, bottom, uy)


def perlin_mask(
    height: int,
    width: int,
    unit: tuple[int, int],
    fraction: float,
    generator: torch.Generator,
    region: Region | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Boolean ``height x width`` mask: the ``round(fraction * area)`` highest values of Perlin
    noise inside ``region`` (default: everything; at least one pixel), empty outside it; periods
    ``2^k`` per ``unit`` pixels per axis, ``k`` uniform in 0..5 per axis."""
    powers = torch.randint(PERLIN_MAX_POWER + 1, (2,), generator=generator, device=device).tolist()
    periods = (2 ** powers[0] * height / unit[0], 2 ** powers[1] * width / unit[1])
    noise = perlin_noise(height, width, periods, generator, device)
    top, left, rows, cols = region if region is not None else (0, 0, height, width)
    inside = noise[top : top + rows, left : left + cols].reshape(-1)
    count = min(inside.numel(), max(1, round(fraction * inside.numel())))
    mask = torch.zeros(height, width, dtype=torch.bool, device=noise.device)
    chosen = torch.zeros(inside.numel(), dtype=torch.bool, device=noise.device)
    chosen[inside.topk(count).indices] = True
    mask[top : top + rows, left : left + cols] = chosen.view(rows, cols)
    return mask


def jitter(image: Tensor, generator: torch.Generator) -> Tensor:
    """A donor ``3 x H x W`` in [0, 1] made different: random flips, gamma contrast and brightness
    (DRAEM's texture augmentations), clipped to [0, 1]; no shift, so no wrap seam (module docstring)."""
    flip_y, flip_x, gamma, gain, offset = torch.rand(5, generator=generator, device=image.device).tolist()
    dims = [dim for dim, draw in ((1, flip_y), (2, flip_x)) if draw < 0.5]
    if dims:
        image = image.flip(dims)
    low, high = GAMMA_RANGE
    image = image.clamp(0, 1).pow(low + gamma * (high - low))
    low, high = BRIGHTNESS_GAIN
    return (image * (low + gain * (high - low)) + (2 * offset - 1) * BRIGHTNESS_OFFSET).clamp(0, 1)


def blend(image: Tensor, donor: Tensor, mask: Tensor, opacity: float) -> Tensor:
    """DRAEM's paste: ``opacity * image + (1 - opacity) * donor`` inside ``mask`` (``H x W`` bool),
    ``image`` itself outside, bit for bit."""
    return torch.where(mask, opacity * image + (1 - opacity) * donor, image)


@dataclass(frozen=True)
class AnomalyRule:
    """What a detector asks of image-space anomalies: the seed of the stream, the range of the
    fraction of the detector's region a mask covers and the probability of a clean image."""

    seed: int
    fraction_range: tuple[float, float]
    clean_probability: float

    def synthesiser(self, unit: tuple[int, int], device: torch.device | str = "cpu") -> AnomalySynthesiser:
        """A fresh stream (restarted at the seed) for a fit whose detectors see ``unit``-pixel tiles."""
        return AnomalySynthesiser(self.seed, self.fraction_range, self.clean_probability, unit, device)


class AnomalySynthesiser:
    """The seeded stream of image-space anomalies of one fit (see the module docstring).

    Call it with every batch of training images (``B x 3 x H x W`` in [0, 1]) in fit order; each
    image's donor is the image before it in the stream (the first is its own donor). ``unit``:
    the pixels the Perlin periods are counted over (the tile / patch); ``region``: the pixels a
    detector's tokens cover (a tile without its context margin). Returns the corrupted images and
    the ``B x H x W`` bool masks.
    """

    def __init__(
        self,
        seed: int,
        fraction_range: tuple[float, float],
        clean_probability: float,
        unit: tuple[int, int],
        device: torch.device | str = "cpu",
    ) -> None:
        self.generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
        self.fraction_range = fraction_range
        self.clean_probability = clean_probability
        self.unit = unit
        self._previous: Tensor | None = None

    def __call__(self, images: Tensor, region: Region | None = None) -> tuple[Tensor, Tensor]:
        images = images.float()
        count, _, height, width = images.shape
        previous = images[:1] if self._previous is None else resize(self._previous, (height, width))
        donors = torch.cat([previous, images[:-1]])
        self._previous = images[-1:].clone()
        low, high = self.fraction_range
        corrupted = images.clone()
        masks = torch.zeros(count, height, width, dtype=torch.bool, device=images.device)
        for index in range(count):
            clean, fraction, opacity = torch.rand(3, generator=self.generator, device=images.device).tolist()
            if clean < self.clean_probability:
                continue
            masks[index] = perlin_mask(
                height, width, self.unit, low + fraction * (high - low), self.generator, region, images.device
            )
            donor = jitter(donors[index], self.generator)
            corrupted[index] = blend(images[index], donor, masks[index], opacity * MAX_OPACITY)
        return corrupted, masks


def _overlaps(size: int, cells: int) -> Tensor:
    """``cells x size`` float64: the fraction of cell ``i`` (``size / cells`` pixels wide) that
    pixel ``p`` (the interval ``[p, p + 1)``) covers."""
    edges = torch.arange(cells + 1, dtype=torch.float64) * (size / cells)
    pixels = torch.arange(size, dtype=torch.float64)
    start = torch.maximum(edges[:-1, None], pixels[None, :])
    stop = torch.minimum(edges[1:, None], pixels[None, :] + 1)
    return (stop - start).clamp(min=0) / (size / cells)


def cell_fractions(masks: Tensor, grid: Sequence[int]) -> Tensor:
    """``B x H x W`` masks -> ``B x h x w`` float32: the exact fraction of each token's cell (the
    image split into ``h x w`` equal cells) that the mask covers, for any sizes (cells need not
    be whole pixels)."""
    height, width = masks.shape[-2:]
    rows = _overlaps(height, int(grid[0])).to(masks.device)
    cols = _overlaps(width, int(grid[1])).to(masks.device)
    return (rows @ masks.double() @ cols.T).float()


def pad_to(masks: Tensor, height: int, width: int) -> Tensor:
    """``B x H x W`` masks extended with empty rows / columns at the bottom / right to ``height x width``."""
    return F.pad(masks.to(torch.uint8), (0, width - masks.shape[-1], 0, height - masks.shape[-2])).bool()
