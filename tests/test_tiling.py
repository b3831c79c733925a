"""Tiling geometry: exact to the pixel for random sizes, tiles and strides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrad.errors import ConfigError
from hrad.strategies.tiling import TileGrid, TileMerger


@pytest.mark.parametrize("seed", range(25))
def test_tile_untile_roundtrip_random_geometry(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tile = int(rng.integers(4, 40))
    stride = int(rng.integers(1, tile + 1))
    height, width = int(rng.integers(1, 120)), int(rng.integers(1, 120))
    image = torch.from_numpy(rng.normal(size=(2, height, width)).astype(np.float32))
    grid = TileGrid.square(height, width, tile, stride)
    tiles = grid.tile(image)
    assert tiles.shape == (len(grid), 2, tile, tile)
    assert grid.padded_height >= height and grid.padded_width >= width
    assert grid.padded_height - height < stride or height <= tile
    torch.testing.assert_close(grid.untile(tiles), image, rtol=0, atol=1e-6)


def test_untile_averages_overlaps_exactly() -> None:
    grid = TileGrid.square(6, 6, 4, 2)  # 2x2 tiles, overlap of 2 pixels in the middle
    tiles = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(4)])
    merged = grid.untile(tiles)[0].numpy()
    assert merged[0, 0] == 0 and merged[0, 5] == 1 and merged[5, 0] == 2 and merged[5, 5] == 3
    assert merged[2, 2] == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert merged[0, 2] == pytest.approx(0.5)
    np.testing.assert_array_equal(grid.coverage()[2:4, 2:4], 4)


def test_padding_is_zero_and_removed() -> None:
    grid = TileGrid.square(5, 7, 4, 4)
    assert (grid.rows, grid.cols, grid.padded_height, grid.padded_width) == (2, 2, 8, 8)
    tiles = grid.tile(torch.ones(1, 5, 7))
    assert tiles[3, 0, 1:, 3:].sum() == 0  # bottom-right tile is mostly padding
    assert grid.untile(tiles).shape == (1, 5, 7)


def test_merger_memory_is_one_map() -> None:
    grid = TileGrid.square(64, 64, 8, 4)
    merger = TileMerger(grid)
    assert merger.total.size == grid.padded_height * grid.padded_width  # independent of the tile count
    for position in grid.positions():
        merger.add(position, np.ones((8, 8)))
    np.testing.assert_allclose(merger.result(), 1.0)


def test_stride_larger_than_tile_is_refused() -> None:
    with pytest.raises(ConfigError, match="stride"):
        TileGrid.square(10, 10, 4, 5)


def test_seams_lie_between_tiles() -> None:
    grid = TileGrid.square(10, 12, 4, 4)
    rows, cols = grid.seams()
    assert rows == [4, 8] and cols == [4, 8]
