"""Where tiles lie on an image: origins, padding, seams. Plain arithmetic, no torch, so the
strategies' :class:`~hrad.strategies.tiling.TileGrid` and the torch-free runtime of exported
models (:mod:`hrad.export_runtime`) share one definition. The rules (context margins, shifted
last tiles) are explained in :mod:`hrad.strategies.tiling`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from hrad.errors import ConfigError

Edge = Literal["shift", "reflect", "zeros"]
GeometryT = TypeVar("GeometryT", bound="TileGeometry")
ArrayT = TypeVar("ArrayT", bound=Any)


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
class TileGeometry:
    """Tiles of ``tile_h x tile_w`` moved by ``stride`` over an ``height x width`` image."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    stride_h: int
    stride_w: int
    #: context pixels around each tile (each side) that the backbone sees but the map never shows
    margin: int = 0
    edge: Edge = "shift"

    def __post_init__(self) -> None:
        if min(self.tile_h, self.tile_w, self.stride_h, self.stride_w) <= 0:
            raise ConfigError("tile size and stride must be positive")
        if self.stride_h > self.tile_h or self.stride_w > self.tile_w:
            raise ConfigError(
                f"stride {self.stride_h}x{self.stride_w} is larger than tile {self.tile_h}x{self.tile_w}: "
                "pixels between tiles would never be scored"
            )
        if self.margin < 0:
            raise ConfigError(f"tile context margin must be >= 0, got {self.margin}")

    @classmethod
    def square(
        cls: type[GeometryT],
        height: int,
        width: int,
        tile: int,
        stride: int | None = None,
        margin: int = 0,
        edge: Edge = "shift",
    ) -> GeometryT:
        stride = tile if stride is None else stride
        return cls(height, width, tile, tile, stride, stride, margin, edge)

    @property
    def rows(self) -> int:
        return _count(self.height, self.tile_h, self.stride_h)

    @property
    def cols(self) -> int:
        return _count(self.width, self.tile_w, self.stride_w)

    @property
    def padded_height(self) -> int:
        """Height of the image the tiles are cut from (larger than the image only where padded)."""
        if self.edge == "shift":
            return max(self.height, self.tile_h)
        return (self.rows - 1) * self.stride_h + self.tile_h

    @property
    def padded_width(self) -> int:
        if self.edge == "shift":
            return max(self.width, self.tile_w)
        return (self.cols - 1) * self.stride_w + self.tile_w

    def __len__(self) -> int:
        return self.rows * self.cols

    def _origin(self, index: int, stride: int, tile: int, padded: int) -> int:
        start = index * stride
        return min(start, padded - tile) if self.edge == "shift" else start

    def positions(self) -> Iterator[TilePosition]:
        for row in range(self.rows):
            y = self._origin(row, self.stride_h, self.tile_h, self.padded_height)
            for col in range(self.cols):
                x = self._origin(col, self.stride_w, self.tile_w, self.padded_width)
                yield TilePosition(row * self.cols + col, row, col, y, x)

    def seams(self) -> tuple[list[int], list[int]]:
        """Image coordinates where tile borders lie inside the image (rows, cols)."""
        ys = sorted({y for p in self.positions() for y in (p.y, p.y + self.tile_h)} - {0})
        xs = sorted({x for p in self.positions() for x in (p.x, p.x + self.tile_w)} - {0})
        return [y for y in ys if y < self.height], [x for x in xs if x < self.width]

    def assemble(self, embeddings: ArrayT) -> ArrayT:
        """``N x C x h x w`` embeddings (numpy array or torch tensor) of a regular non-overlapping
        grid (stride = tile, no shifted tiles), in :meth:`positions` order -> one
        ``C x rows*h x cols*w`` map of the same type."""
        if self.stride_h != self.tile_h or self.stride_w != self.tile_w or self.edge == "shift" and (
            self.height % self.tile_h or self.width % self.tile_w
        ):
            raise ValueError("assemble needs non-overlapping tiles on a regular grid")
        _, channels, cells_h, cells_w = embeddings.shape
        grid: Any = embeddings.reshape(self.rows, self.cols, channels, cells_h, cells_w)
        order = (2, 0, 3, 1, 4)
        grid = grid.transpose(order) if isinstance(grid, np.ndarray) else grid.permute(*order)
        return grid.reshape(channels, self.rows * cells_h, self.cols * cells_w)

    def border_distance(self) -> np.ndarray:
        """``H x W`` distance (pixels) from each pixel centre to the nearest tile border inside the image.

        Used to profile seams: a seam-free map has the same statistics at every distance.
        """
        return seam_distance(self.height, self.width, *self.seams())


def seam_distance(height: int, width: int, rows: list[int], cols: list[int]) -> np.ndarray:
    """``H x W`` distance (pixels) from each pixel centre to the nearest of the given row and
    column lines (``H + W`` where there are none)."""
    far = float(height + width)

    def along(size: int, lines: list[int]) -> np.ndarray:
        if not lines:
            return np.full(size, far)
        centres = np.arange(size, dtype=np.float64)[:, None] + 0.5
        return np.abs(centres - np.asarray(lines, dtype=np.float64)[None, :]).min(axis=1)

    return np.minimum(along(height, rows)[:, None], along(width, cols)[None, :])
