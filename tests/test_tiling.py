"""Tiling geometry: exact to the pixel for random sizes, tiles and strides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrad.errors import ConfigError
from hrad.strategies.tiling import TileGrid, TileMerger


@pytest.mark.parametrize("edge", ["shift", "zeros"])
@pytest.mark.parametrize("seed", range(25))
def test_tile_untile_roundtrip_random_geometry(seed: int, edge: str) -> None:
    rng = np.random.default_rng(seed)
    tile = int(rng.integers(4, 40))
    stride = int(rng.integers(1, tile + 1))
    margin = int(rng.integers(0, 12))
    height, width = int(rng.integers(1, 120)), int(rng.integers(1, 120))
    image = torch.from_numpy(rng.normal(size=(2, height, width)).astype(np.float32))
    grid = TileGrid.square(height, width, tile, stride, margin=margin, edge=edge)  # type: ignore[arg-type]
    windows = grid.tile(image)
    assert windows.shape == (len(grid), 2, tile + 2 * margin, tile + 2 * margin)
    tiles = windows[..., margin : margin + tile, margin : margin + tile]
    assert grid.padded_height >= height and grid.padded_width >= width
    if edge == "zeros":
        assert grid.padded_height - height < stride or height <= tile
    else:  # nothing is padded unless the image is smaller than one tile
        assert grid.padded_height == max(height, tile) and grid.padded_width == max(width, tile)
    torch.testing.assert_close(grid.untile(tiles), image, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_windows_carry_the_real_neighbourhood_and_reflect_only_past_the_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tile, margin = int(rng.integers(6, 20)), int(rng.integers(1, 6))
    height, width = int(rng.integers(tile, 70)), int(rng.integers(tile, 70))
    image = rng.normal(size=(3, height, width)).astype(np.float32)
    grid = TileGrid.square(height, width, tile, int(rng.integers(1, tile + 1)), margin=margin)
    reflected = np.pad(image, ((0, 0), (margin, margin), (margin, margin)), mode="reflect")
    windows = grid.tile(torch.from_numpy(image)).numpy()
    for position, window in zip(grid.positions(), windows, strict=True):
        # window pixel (i, j) is image pixel (y - margin + i, x - margin + j), reflected past the border
        expected = reflected[:, position.y : position.y + tile + 2 * margin, position.x : position.x + tile + 2 * margin]
        np.testing.assert_array_equal(window, expected)


def test_last_tiles_shift_inward_to_end_at_the_border() -> None:
    grid = TileGrid.square(10, 13, 4, 4)
    assert [p.y for p in grid.positions() if p.col == 0] == [0, 4, 6]
    assert [p.x for p in grid.positions() if p.row == 0] == [0, 4, 8, 9]
    assert max(p.y + 4 for p in grid.positions()) == 10 and max(p.x + 4 for p in grid.positions()) == 13
    np.testing.assert_array_equal(grid.coverage()[:, 9:12].min(), 2)  # the shifted column overlaps its neighbour


def test_image_smaller_than_a_tile_is_reflect_padded_and_cropped() -> None:
    image = torch.arange(20, dtype=torch.float32).reshape(1, 4, 5)
    grid = TileGrid.square(4, 5, 6)
    padded = grid.pad(image)
    assert padded.shape == (1, 6, 6)
    torch.testing.assert_close(padded[0, 4], torch.tensor([10.0, 11, 12, 13, 14, 13]))  # row 4 mirrors row 2
    tiny = TileGrid.square(1, 1, 3).pad(torch.ones(1, 1, 1))  # too small to reflect: replicated
    torch.testing.assert_close(tiny, torch.ones(1, 3, 3))
    torch.testing.assert_close(grid.untile(grid.tile(image)), image)


def test_border_distance_counts_from_pixel_centres() -> None:
    grid = TileGrid.square(8, 8, 4, 4)
    distance = grid.border_distance()
    assert distance[3, 0] == 0.5 and distance[4, 0] == 0.5 and distance[0, 0] == 3.5
    assert distance[1, 1] == 2.5


def test_untile_averages_overlaps_exactly() -> None:
    grid = TileGrid.square(6, 6, 4, 2)  # 2x2 tiles, overlap of 2 pixels in the middle
    tiles = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(4)])
    merged = grid.untile(tiles)[0].numpy()
    assert merged[0, 0] == 0 and merged[0, 5] == 1 and merged[5, 0] == 2 and merged[5, 5] == 3
    assert merged[2, 2] == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert merged[0, 2] == pytest.approx(0.5)
    np.testing.assert_array_equal(grid.coverage()[2:4, 2:4], 4)


def test_zeros_edge_pads_with_zeros_and_removes_them() -> None:
    grid = TileGrid.square(5, 7, 4, 4, edge="zeros")
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
    assert rows == [4, 6, 8] and cols == [4, 8]  # the last row is shifted to start at 6
