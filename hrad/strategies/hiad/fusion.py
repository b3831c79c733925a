"""HiAD's multi-resolution feature fusion (paper Sec. III-B, Eq. 3).

For every rate k the whole image is downsampled by 2^k, cut into patch-sized tiles, embedded
and reassembled into one feature map ``x^k`` (once per image, not per patch). A level-0 patch's
fused feature is ``sum_k w_k Up(x^k, 2^k)`` restricted to the patch: each level-k map is
sampled bilinearly at the centres of the patch's own feature cells. That equals upsampling the
whole level-k map by 2^k (``align_corners=False``, border clamping) and cropping the patch's
window, without ever materialising the full-resolution feature map. The level-k region that
feeds a patch is the aligned ``patch * 2^k`` block containing it, as in the reference code's
``low_resolution_indexes``.

Every tile, at every level, is embedded with ``margin`` context pixels around it (see
:mod:`hrad.strategies.tiling`), so neither the level-0 patches nor the assembled level maps
carry tile seams. Level-0 patches follow the shared grid (the last row and column shifted to end
at the image border); level-k maps are assembled from a regular grid, reflect-padded past the
image border and cut back to the image, so samples beyond it clamp to the border cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hrad.hiad_math import cell_centres, level_size, valid_cells
from hrad.imaging import resize
from hrad.strategies.pixels import PixelImage, TileSource, resize_pixels, resize_pixels_by_rows
from hrad.strategies.tiling import Edge, TileGrid, TilePosition

Embed = Callable[[Tensor], Tensor]


def auto_fusion_rates(height: int, width: int, base: int = 1024) -> tuple[int, ...]:
    """``0..K`` with K the halvings that bring the image (side ``sqrt(H*W)``) down to ~``base``.

    2048 x 2048 -> (0, 1), 4096 x 4096 -> (0, 1, 2), anything up to ~2K side -> (0,). The
    geometric-mean side keeps long line-scan strips from being halved into slivers.
    """
    side = math.sqrt(height * width)
    halvings = max(0, math.floor(math.log2(side / base) + 1e-9)) if side > 0 else 0
    return tuple(range(halvings + 1))


def resolve_fusion(
    rates: tuple[int, ...] | None, weights: tuple[float, ...] | None, height: int, width: int, base: int
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Configured or automatic rates (sorted) with their weights (equal by default)."""
    from hrad.strategies.hiad.config import check_weights

    chosen = auto_fusion_rates(height, width, base) if rates is None else tuple(rates)
    if weights is None:
        weights = tuple(1.0 / len(chosen) for _ in chosen)
    check_weights(weights, len(chosen))
    order = sorted(range(len(chosen)), key=lambda index: chosen[index])
    return tuple(chosen[i] for i in order), tuple(float(weights[i]) for i in order)


def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A small host array on ``device`` without waiting for the device: a plain ``.to(cuda)`` of
    pageable memory synchronises the stream (the host stops queueing work until every kernel
    before it has run), so the per-patch coordinates and index lists of a predict, copied that
    way, made the host wait dozens of times per image. Pinned, the copy is queued like a kernel."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def resize_level(image: Tensor | PixelImage, size: tuple[int, int]) -> Tensor:
    """``image`` (``1 x 3 x H x W`` or a :class:`~hrad.strategies.pixels.PixelImage`) resized to
    ``size`` as a float32 ``3 x h x w`` tensor (the fusion levels and the low branch). In host
    memory a band of output rows at a time (:func:`~hrad.strategies.pixels.resize_pixels_by_rows`:
    no ``C x H x w`` intermediate); on an accelerator the pixels are already there and memory is
    not the limit, so :func:`~hrad.strategies.pixels.resize_pixels` runs two ``F.interpolate``
    passes there instead of copying each band's resampling weights over (a host wait per band and
    tap). Equal to float32 rounding (1e-6)."""
    if not isinstance(image, PixelImage):
        return resize(image, size)[0]
    if image.device.type != "cpu":
        return resize_pixels(image, size)
    return resize_pixels_by_rows(image, size)


@dataclass
class LevelMap:
    """A level-k feature map over the zero-padded level-k image, and its scale to level 0."""

    features: Tensor  # C x h x w
    ratio_y: float  # level-k pixels per level-0 pixel (~2^-k)
    ratio_x: float
    cell: float  # level-k pixels per feature cell


def embed_level(
    embed: Embed, image: Tensor | PixelImage, rate: int, patch: int, batch_size: int, margin: int = 0
) -> LevelMap:
    """Embed ``image`` (``1 x 3 x H x W``, or a :class:`~hrad.strategies.pixels.PixelImage`, read in
    bands: :func:`~hrad.strategies.pixels.resize_pixels_by_rows`, equal to resizing the float image
    to float32 rounding) downsampled by 2^rate, tile by tile, as one map.

    ``embed`` takes windows of ``patch + 2 * margin`` pixels and returns the patch's cells only.
    """
    height, width = image.shape[-2:]
    size = level_size(height, width, rate)
    small = resize_level(image, size)
    grid = TileGrid.square(size[0], size[1], patch, patch, margin=margin, edge="reflect")
    features = torch.cat([embed(windows) for _, windows in grid.batches(grid.pad(small), batch_size)])
    grid_h = features.shape[-2]
    assembled = grid.assemble(features)
    cell = patch / grid_h
    # drop the cells that lie wholly in the reflected padding, so sampling clamps at the image border
    valid_h, valid_w = valid_cells(size[0], cell), valid_cells(size[1], cell)
    return LevelMap(assembled[:, :valid_h, :valid_w], size[0] / height, size[1] / width, cell)


def sample_patch_windows(
    level: LevelMap, corners: list[tuple[int, int]], grid_h: int, grid_w: int, cell0: float
) -> Tensor:
    """Level-k features at the centres of each patch's level-0 feature cells: ``n x C x gh x gw``.

    ``corners`` are the patches' top-left level-0 pixels; ``cell0`` the level-0 pixels per
    feature cell. Bilinear with border clamping (= ``F.interpolate`` then crop).
    """
    features = level.features
    _, map_h, map_w = features.shape
    rows = []
    for y, x in corners:
        # continuous map coordinate (cell edges at integers) -> grid_sample's [-1, 1]
        gy = 2.0 * cell_centres(y, grid_h, cell0, level.ratio_y, level.cell) / map_h - 1.0
        gx = 2.0 * cell_centres(x, grid_w, cell0, level.ratio_x, level.cell) / map_w - 1.0
        rows.append(np.stack(np.meshgrid(gx, gy, indexing="xy"), axis=-1))  # gh x gw x 2 (x, y)
    # every patch's sampling grid in one copy to the features' device (float64 until there, as before)
    grid = to_device(np.concatenate(rows), features.device)[None].to(features.dtype)  # 1 x (n*gh) x gw x 2
    sampled = F.grid_sample(features[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    channels = features.shape[0]
    return sampled[0].reshape(channels, len(corners), grid_h, grid_w).permute(1, 0, 2, 3)


@dataclass
class ImageLevels:
    """One image prepared for fusion: its level-0 patch grid and its coarser level maps."""

    grid: TileGrid
    padded: TileSource  # 3 x H x W level-0 image (reflect-padded only when smaller than a patch)
    levels: dict[int, LevelMap]


class MultiResolutionFusion:
    """Fused patch features of one image at a time (level maps computed once per image).

    ``embed`` maps ``B x 3 x (patch + 2 margin)^2`` windows to the patches' own embeddings
    (:class:`~hrad.strategies.tiling.ContextEmbedder`); ``margin`` 0 embeds patches alone.
    """

    def __init__(
        self,
        embed: Embed,
        patch: int,
        stride: int,
        rates: tuple[int, ...],
        weights: tuple[float, ...],
        batch_size: int = 4,
        margin: int = 0,
        edge: Edge = "shift",
    ) -> None:
        if 0 not in rates:
            raise ValueError("fusion rates must include 0")
        self.embed = embed
        self.patch = patch
        self.stride = stride
        self.rates = rates
        self.weights = dict(zip(rates, weights, strict=True))
        self.batch_size = max(1, batch_size)
        self.margin = margin
        self.edge: Edge = edge

    def grid(self, height: int, width: int) -> TileGrid:
        """The level-0 patch grid of an ``height x width`` image."""
        return TileGrid.square(height, width, self.patch, self.stride, margin=self.margin, edge=self.edge)

    def prepare(self, image: Tensor | PixelImage) -> ImageLevels:
        """``image``: ``1 x 3 x H x W``, or a :class:`~hrad.strategies.pixels.PixelImage` (level-0
        windows converted to float as they are cut); embeds every coarser level of it once."""
        height, width = image.shape[-2:]
        grid = self.grid(height, width)
        levels = {
            rate: embed_level(self.embed, image, rate, self.patch, self.batch_size, self.margin)
            for rate in self.rates
            if rate > 0 and self.weights[rate] > 0
        }
        return ImageLevels(grid, grid.pad(image if isinstance(image, PixelImage) else image[0]), levels)

    def batches(self, prepared: ImageLevels) -> Iterator[tuple[list[TilePosition], Tensor]]:
        """Fused features of the image's patches, ``batch_size`` positions at a time."""
        positions = list(prepared.grid.positions())
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start : start + self.batch_size]
            yield chunk, self.fuse(prepared, chunk)

    def fuse(self, prepared: ImageLevels, positions: list[TilePosition]) -> Tensor:
        base = self.embed(prepared.grid.windows(prepared.padded, positions))
        fused = base * self.weights[0] if len(self.rates) > 1 else base
        grid_h, grid_w = base.shape[-2:]
        cell0 = self.patch / grid_h
        corners = [(p.y, p.x) for p in positions]
        for rate, level in prepared.levels.items():
            window = sample_patch_windows(level, corners, grid_h, grid_w, cell0)
            fused = fused + self.weights[rate] * window
        return fused

    def all_patches(self, image: Tensor | PixelImage) -> tuple[list[TilePosition], Tensor]:
        """Every patch of ``image`` fused at once (tests, small images)."""
        prepared = self.prepare(image)
        positions: list[TilePosition] = []
        parts = []
        for chunk, features in self.batches(prepared):
            positions.extend(chunk)
            parts.append(features)
        return positions, torch.cat(parts)
