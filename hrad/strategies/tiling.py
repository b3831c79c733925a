"""Tiling geometry shared by every high-resolution strategy.

A :class:`TileGrid` covers an ``H x W`` image with tiles of ``tile`` pixels moved by
``stride``; where the grid does not fit exactly the image is zero-padded at the bottom and
right. Untiling averages overlapping pixels and removes the padding, exactly to the pixel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hrad.errors import ConfigError


def _count(size: int, tile: int, stride: int) -> int:
    return 1 if size <= tile else math.ceil((size - tile) / stride) + 1


@dataclass(frozen=True)
class TilePosition:
    index: int
    row: int
    col: int
    y: int
    x: int


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile_h: int
    tile_w: int
    stride_h: int
    stride_w: int

    def __post_init__(self) -> None:
        if min(self.tile_h, self.tile_w, self.stride_h, self.stride_w) <= 0:
            raise ConfigError("tile size and stride must be positive")
        if self.stride_h > self.tile_h or self.stride_w > self.tile_w:
            raise ConfigError(
                f"stride {self.stride_h}x{self.stride_w} is larger than tile {self.tile_h}x{self.tile_w}: "
                "pixels between tiles would never be scored"
            )

    @classmethod
    def square(cls, height: int, width: int, tile: int, stride: int | None = None) -> TileGrid:
        stride = tile if stride is None else stride
        return cls(height, width, tile, tile, stride, stride)

    @property
    def rows(self) -> int:
        return _count(self.height, self.tile_h, self.stride_h)

    @property
    def cols(self) -> int:
        return _count(self.width, self.tile_w, self.stride_w)

    @property
    def padded_height(self) -> int:
        return (self.rows - 1) * self.stride_h + self.tile_h

    @property
    def padded_width(self) -> int:
        return (self.cols - 1) * self.stride_w + self.tile_w

    def __len__(self) -> int:
        return self.rows * self.cols

    def positions(self) -> Iterator[TilePosition]:
        for row in range(self.rows):
            for col in range(self.cols):
                yield TilePosition(row * self.cols + col, row, col, row * self.stride_h, col * self.stride_w)

    def pad(self, image: Tensor) -> Tensor:
        """Zero-pad a ``... x H x W`` tensor to the padded grid size."""
        pad_h = self.padded_height - image.shape[-2]
        pad_w = self.padded_width - image.shape[-1]
        if pad_h == 0 and pad_w == 0:
            return image
        return torch.nn.functional.pad(image, (0, pad_w, 0, pad_h))

    def tile(self, image: Tensor) -> Tensor:
        """``C x H x W`` -> ``N x C x tile_h x tile_w`` in :meth:`positions` order."""
        padded = self.pad(image)
        return torch.stack([self.crop(padded, p) for p in self.positions()])

    def crop(self, padded: Tensor, position: TilePosition) -> Tensor:
        return padded[..., position.y : position.y + self.tile_h, position.x : position.x + self.tile_w]

    def untile(self, tiles: Tensor) -> Tensor:
        """``N x C x tile_h x tile_w`` -> ``C x H x W``, overlaps averaged, padding removed."""
        merger = TileMerger(self, channels=tiles.shape[1])
        for position, tile in zip(self.positions(), tiles, strict=True):
            merger.add(position, tile.detach().cpu().numpy())
        return torch.from_numpy(merger.result())

    def coverage(self) -> np.ndarray:
        """How many tiles cover each pixel of the padded image (``padded_h x padded_w``)."""
        counts = np.zeros((self.padded_height, self.padded_width), dtype=np.float32)
        for p in self.positions():
            counts[p.y : p.y + self.tile_h, p.x : p.x + self.tile_w] += 1
        return counts

    def seams(self) -> tuple[list[int], list[int]]:
        """Image coordinates where tile borders lie inside the image (rows, cols)."""
        ys = sorted({y for p in self.positions() for y in (p.y, p.y + self.tile_h)} - {0})
        xs = sorted({x for p in self.positions() for x in (p.x, p.x + self.tile_w)} - {0})
        return [y for y in ys if y < self.height], [x for x in xs if x < self.width]


class TileMerger:
    """Streams tile maps into one full-size map (host memory), averaging overlaps.

    Only the running sum and the coverage count are held, so merging N tiles costs the memory
    of one full-resolution map, not of N tiles.
    """

    def __init__(self, grid: TileGrid, channels: int = 1) -> None:
        self.grid = grid
        self.total = np.zeros((channels, grid.padded_height, grid.padded_width), dtype=np.float64)
        self.count = np.zeros((grid.padded_height, grid.padded_width), dtype=np.float64)

    def add(self, position: TilePosition, tile_map: np.ndarray) -> None:
        """Add a ``C x tile_h x tile_w`` (or ``tile_h x tile_w``) map at ``position``."""
        if tile_map.ndim == 2:
            tile_map = tile_map[None]
        ys = slice(position.y, position.y + self.grid.tile_h)
        xs = slice(position.x, position.x + self.grid.tile_w)
        self.total[:, ys, xs] += tile_map
        self.count[ys, xs] += 1

    def result(self) -> np.ndarray:
        """``C x H x W`` float32 average, cropped to the image."""
        if (self.count == 0).any():
            raise RuntimeError("tile merger: some pixels were never covered by a tile")
        merged = self.total / self.count
        return merged[:, : self.grid.height, : self.grid.width].astype(np.float32)
