"""Tiling geometry shared by every high-resolution strategy (and the ONNX export).

A :class:`TileGrid` covers an ``H x W`` image with tiles of ``tile`` pixels moved by
``stride``. Two rules keep tile borders out of the anomaly map (the overlap-tile strategy of
U-Net, Ronneberger et al. 2015, and of sliding-window inference in segmentation toolkits):

- **Context.** Each tile is cut with a ``margin`` of real neighbouring pixels on every side
  (:meth:`TileGrid.windows`); the backbone sees tile + margin and :class:`ContextEmbedder` crops
  the embedding back to the tile, so a feature near a tile border sees the pixels that are
  really there instead of the backbone's zero padding. Only where a window crosses the image's
  own border is the image reflected.
- **Edges.** With ``edge="shift"`` (the default) the last row and column of tiles are shifted
  inward to end at the image border, so no padded pixel is ever scored; only an image smaller
  than a tile is reflect-padded up to one tile, and that padding is cropped off the map.
  ``edge="reflect"`` keeps the regular grid and reflect-pads bottom/right (HiAD's coarse level
  maps, which must be assembled from equally spaced tiles); ``edge="zeros"`` is the geometry of
  hrad 0.1 (zero padding), kept for comparisons.

Untiling averages overlapping pixels (the shifted last tiles overlap their neighbours) and
removes any padding, exactly to the pixel. Windows are cut a batch at a time, so memory is
bounded by one tile batch, never by the whole image plus margins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from hrad.data.anomalies import AnomalySynthesiser, cell_fractions
from hrad.detectors.base import pack_anomalies
from hrad.errors import ConfigError
from hrad.imaging import resize
from hrad.strategies.base import StrategyConfig
from hrad.strategies.pixels import PixelImage, TileSource, check_enlargement
from hrad.tile_geometry import Edge, TileGeometry, TilePosition

if TYPE_CHECKING:
    from hrad.features.base import Embedder, FeatureExtractor

def reflect_pad(image: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Pad the last two dims of ``... x H x W`` by reflection (edge replication where a side is
    too short to reflect, as for a 1-pixel image)."""
    if not (top or bottom or left or right):
        return image
    height, width = image.shape[-2:]
    mode = "reflect" if max(top, bottom) < height and max(left, right) < width else "replicate"
    padded = F.pad(image.reshape(1, -1, height, width), (left, right, top, bottom), mode=mode)
    return padded.reshape(*image.shape[:-2], *padded.shape[-2:])


class TileGrid(TileGeometry):
    """A :class:`~hrad.tile_geometry.TileGeometry` that cuts, pads and merges tensors."""

    @overload
    def pad(self, image: Tensor) -> Tensor: ...

    @overload
    def pad(self, image: TileSource) -> TileSource: ...

    def pad(self, image: TileSource) -> TileSource:
        """Pad a ``... x H x W`` tensor to the size the tiles are cut from (zeros or reflection).

        A :class:`~hrad.strategies.pixels.PixelImage` (an image kept in its file's pixel type)
        stays one: zeros are added virtually, and only a reflect-padded one (an image smaller than
        a tile, or ``edge="reflect"``) is converted to float whole.
        """
        pad_h = self.padded_height - image.shape[-2]
        pad_w = self.padded_width - image.shape[-1]
        if pad_h == 0 and pad_w == 0:
            return image
        if self.tile_h > image.shape[-2] or self.tile_w > image.shape[-1]:  # else under a tile of padding: the image's own scale
            padded = (self.padded_height, self.padded_width)
            check_enlargement((image.shape[-2], image.shape[-1]), padded, f"padded to a {self.tile_w}x{self.tile_h} tile", "give a tile within the image")
        if isinstance(image, PixelImage):
            if self.edge == "zeros":
                return image.zero_extended((self.padded_height, self.padded_width))
            image = image.tensor()
        if self.edge == "zeros":
            return F.pad(image, (0, pad_w, 0, pad_h))
        return reflect_pad(image, 0, pad_h, 0, pad_w)

    def window(self, padded: TileSource, position: TilePosition) -> Tensor:
        """Tile at ``position`` plus ``margin`` context pixels on each side, from :meth:`pad`'s output.

        Context comes from the real neighbouring pixels; only beyond the image's own border is
        it reflected (zeros with ``edge="zeros"``). A :class:`~hrad.strategies.pixels.PixelImage`
        is converted to float here, one window at a time.
        """
        m = self.margin
        height, width = padded.shape[-2:]
        top, left = position.y - m, position.x - m
        bottom, right = position.y + self.tile_h + m, position.x + self.tile_w + m
        if isinstance(padded, PixelImage):
            crop = padded.region(max(0, top), min(height, bottom), max(0, left), min(width, right))
        else:
            crop = padded[..., max(0, top) : min(height, bottom), max(0, left) : min(width, right)]
        pads = (max(0, -top), max(0, bottom - height), max(0, -left), max(0, right - width))
        if self.edge == "zeros":
            return F.pad(crop, (pads[2], pads[3], pads[0], pads[1]))
        return reflect_pad(crop, *pads)

    def windows(self, padded: TileSource, positions: Sequence[TilePosition]) -> Tensor:
        """``N x C x (tile_h + 2 margin) x (tile_w + 2 margin)`` for ``positions`` of a ``C x H x W`` padded image."""
        return torch.stack([self.window(padded, p) for p in positions])

    def batches(self, padded: TileSource, batch_size: int) -> Iterator[tuple[list[TilePosition], Tensor]]:
        """Positions and their windows, ``batch_size`` at a time (memory: one batch of windows)."""
        positions = list(self.positions())
        for start in range(0, len(positions), max(1, batch_size)):
            chunk = positions[start : start + batch_size]
            yield chunk, self.windows(padded, chunk)

    def tile(self, image: TileSource) -> Tensor:
        """``C x H x W`` -> ``N`` windows (tile + margin on each side) in :meth:`positions` order (all at once)."""
        return self.windows(self.pad(image), list(self.positions()))

    def crop(self, padded: Tensor, position: TilePosition) -> Tensor:
        """The tile itself (no context) at ``position``."""
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

class TileMerger:
    """Streams tile maps into one full-size map (host memory), averaging overlaps.

    Only a float32 running sum (4 bytes a pixel) and how often each tile position was added are
    held, so merging N tiles costs one full-resolution map, not N tiles. No per-pixel count is
    stored: a grid's tiles are the product of its row and column origins, so where every
    position was added once a pixel's coverage is (tiles over its row) x (tiles over its column).
    :meth:`result` divides the sum in place and returns it.
    """

    def __init__(self, grid: TileGrid, channels: int = 1) -> None:
        self.grid = grid
        self.total = np.zeros((channels, grid.padded_height, grid.padded_width), dtype=np.float32)
        self.hits = np.zeros((grid.rows, grid.cols), dtype=np.int64)
        self._result: np.ndarray | None = None

    def add(self, position: TilePosition, tile_map: np.ndarray) -> None:
        """Add a ``C x tile_h x tile_w`` (or ``tile_h x tile_w``) map at ``position``."""
        if self._result is not None:
            raise RuntimeError("tile merger: add() after result()")
        if tile_map.ndim == 2:
            tile_map = tile_map[None]
        ys = slice(position.y, position.y + self.grid.tile_h)
        xs = slice(position.x, position.x + self.grid.tile_w)
        self.total[:, ys, xs] += tile_map
        self.hits[position.row, position.col] += 1

    def _axis_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Tiles over each row and over each column of the padded image."""
        grid = self.grid
        rows = np.zeros(grid.padded_height, dtype=np.float32)
        cols = np.zeros(grid.padded_width, dtype=np.float32)
        for position in grid.positions():
            if position.col == 0:
                rows[position.y : position.y + grid.tile_h] += 1
            if position.row == 0:
                cols[position.x : position.x + grid.tile_w] += 1
        return rows, cols

    def result(self) -> np.ndarray:
        """``C x H x W`` float32 average, cropped to the image (computed once, in place)."""
        if self._result is not None:
            return self._result
        grid = self.grid
        if (self.hits == 1).all():
            rows, cols = self._axis_counts()
            if not (rows.all() and cols.all()):
                raise RuntimeError("tile merger: some pixels were never covered by a tile")
            band = max(1, 2**20 // max(1, grid.padded_width))
            for top in range(0, grid.padded_height, band):  # the count, a band of rows at a time
                self.total[:, top : top + band] /= rows[top : top + band, None] * cols[None, :]
        else:  # some position added twice or never: count pixel by pixel
            count = np.zeros((grid.padded_height, grid.padded_width), dtype=np.float32)
            for position in grid.positions():
                hits = self.hits[position.row, position.col]
                count[position.y : position.y + grid.tile_h, position.x : position.x + grid.tile_w] += hits
            if (count == 0).any():
                raise RuntimeError("tile merger: some pixels were never covered by a tile")
            self.total /= count
        merged = self.total
        if merged.shape[1:] != (grid.height, grid.width):
            merged = np.ascontiguousarray(merged[:, : grid.height, : grid.width])
        self._result = merged
        return merged


class ContextTilingConfig(StrategyConfig):
    """Options every tiling strategy shares (tiled, tiled-ensemble, HiAD's high branch)."""

    #: context pixels cut around each tile (each side): the backbone sees them, the map never
    #: does. None = the backbone's default (its measured effective receptive field,
    #: ``FeatureExtractor.default_context``); 0 = tiles alone, as in hrad 0.1
    context: int | None = Field(None, ge=0)
    #: "shift": the last row/column of tiles ends at the image border, nothing padded is scored;
    #: "zeros": hrad 0.1's zero padding at the bottom/right (for comparisons)
    tile_edge: Literal["shift", "zeros"] = "shift"

    def resolve_context(self, extractor: FeatureExtractor) -> int:
        return extractor.default_context if self.context is None else self.context


def round_to_multiple(size: int, multiple: int) -> int:
    return max(multiple, int(round(size / multiple)) * multiple)


class ContextEmbedder:
    """Tile windows (tile + context margin) -> embeddings of the tile alone.

    The window goes through the backbone whole; the margin's feature cells are cropped off, so
    detectors still see one ``C x h x w`` embedding per tile, exactly as without context.

    Geometry. A tile that is not a multiple of the backbone's input multiple (ViT: 14) is resized
    to the nearest multiple, as before; the margin is resized by the same factor and rounded up
    to whole *cells*, where a cell is the least common multiple of the input multiple and the
    largest stride among the embedding's layers. Whole cells keep every layer's grid aligned
    between the window and the whole image, so for a CNN with a margin of at least its receptive
    field (and tile origins on the cell grid) the cropped embedding equals the whole image's
    embedding at those pixels (``tests/test_context_tiling.py``). ``margin`` (image pixels) is the
    context actually cut, ``requested`` what was asked.
    """

    def __init__(self, embedder: Embedder, tile_h: int, tile_w: int, context: int) -> None:
        if context < 0:
            raise ConfigError(f"tile context must be >= 0 pixels, got {context}")
        self.embedder = embedder
        extractor = embedder.extractor
        multiple = extractor.input_multiple
        max_stride = max(extractor.layer_strides[name] for name in embedder.spec.layers)
        self.cell = math.lcm(multiple, max_stride)
        self.tile_size = (tile_h, tile_w)
        self.input_size = tuple(side if side % multiple == 0 else round_to_multiple(side, multiple) for side in (tile_h, tile_w))
        scale = max(size / side for size, side in zip(self.input_size, self.tile_size, strict=True))
        self.requested = context
        self.input_margin = math.ceil(context * scale / self.cell) * self.cell if context > 0 else 0
        self.margin = int(round(self.input_margin / scale))
        stride = embedder.stride
        if self.input_margin % stride:
            raise ConfigError(f"tile context {self.input_margin} is not a multiple of the embedding stride {stride}")
        self.crop_cells = self.input_margin // stride

    def grid(self, height: int, width: int, stride_h: int, stride_w: int, edge: Edge = "shift") -> TileGrid:
        """The tile grid over an ``height x width`` image with this embedder's margin."""
        return TileGrid(height, width, *self.tile_size, stride_h, stride_w, self.margin, edge)

    @property
    def window_input_size(self) -> tuple[int, int]:
        """Backbone input size of one window."""
        return (self.input_size[0] + 2 * self.input_margin, self.input_size[1] + 2 * self.input_margin)

    def resize_windows(self, windows: Tensor) -> Tensor:
        """Windows at image scale -> the backbone's input size (a no-op for CNNs)."""
        return resize(windows, self.window_input_size)

    def crop(self, embedding: Tensor) -> Tensor:
        """Drop the margin's cells of a window embedding."""
        c = self.crop_cells
        return embedding if c == 0 else embedding[..., c:-c, c:-c]

    def __call__(self, windows: Tensor) -> Tensor:
        return self.crop(self.embedder(self.resize_windows(windows)))

    def training_rows(self, windows: Tensor, margin: int, synthesiser: AnomalySynthesiser | None) -> Tensor:
        """What a detector's ``fit`` gets for these windows: their embeddings, or, for a detector
        that asked for image-space anomalies (``synthesiser`` given), each window also corrupted
        (the mask inside the tile, not its ``margin``), both through the backbone, packed with the
        mask's exact fraction per token (:func:`~hrad.detectors.base.pack_anomalies`)."""
        clean = self(windows)
        if synthesiser is None:
            return clean
        height, width = self.tile_size
        corrupted, masks = synthesiser(windows, (margin, margin, height, width))
        inside = masks[:, margin : margin + height, margin : margin + width]
        return pack_anomalies(clean, self(corrupted), cell_fractions(inside, clean.shape[-2:]))
