"""Seam smoothing: exact band geometry and the blur inside it, against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from hrad.postprocess.seams import seam_mask, smooth_seams
from hrad.strategies.tiling import TileGrid


def brute_force_blur(values: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur with edge replication, summed pixel by pixel."""
    radius = int(truncate * sigma + 0.5)
    offsets = range(-radius, radius + 1)
    weights = np.array([math.exp(-0.5 * (o / sigma) ** 2) for o in offsets])
    weights /= weights.sum()
    height, width = values.shape
    out = np.zeros_like(values, dtype=np.float64)
    for y in range(height):
        for x in range(width):
            total = 0.0
            for wy, dy in zip(weights, offsets, strict=True):
                for wx, dx in zip(weights, offsets, strict=True):
                    total += wy * wx * values[min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)]
            out[y, x] = total
    return out


def test_band_geometry_non_overlapping() -> None:
    grid = TileGrid.square(20, 20, tile=10, stride=10)  # one seam at row 10 and at column 10
    mask = seam_mask(grid, band_fraction=0.2)  # 2 pixels on each side
    expected = np.zeros((20, 20), dtype=bool)
    expected[8:12, :] = True
    expected[:, 8:12] = True
    np.testing.assert_array_equal(mask, expected)


def test_band_geometry_overlapping_and_padded_grid() -> None:
    # tiles of 8 at stride 4 over 18 x 14: rows start 0,4,8,12 (ends 8,12,16,20), cols 0,4,8 (ends 8,12,16)
    grid = TileGrid.square(18, 14, tile=8, stride=4, edge="zeros")
    rows, cols = grid.seams()
    assert rows == [4, 8, 12, 16] and cols == [4, 8, 12]
    mask = seam_mask(grid, band_fraction=0.125)  # 1 pixel on each side
    expected = np.zeros((18, 14), dtype=bool)
    for y in rows:
        expected[y - 1 : y + 1, :] = True
    for x in cols:
        expected[:, x - 1 : x + 1] = True
    np.testing.assert_array_equal(mask, expected)
    assert not mask[0, 0] and not mask[17, 0] and not mask[0, 13]


def test_smoothing_only_inside_band_and_equals_brute_force_blur() -> None:
    rng = np.random.default_rng(3)
    values = rng.random((16, 12)).astype(np.float32)
    grid = TileGrid.square(16, 12, tile=8, stride=8, edge="zeros")
    smoothed = smooth_seams(values, grid, band_fraction=0.25, sigma=1.3)
    mask = seam_mask(grid, 0.25)
    assert mask.sum() == 4 * 12 + 4 * 16 - 16  # two 4-wide bands minus their crossing
    np.testing.assert_array_equal(smoothed[~mask], values[~mask])
    blurred = brute_force_blur(values.astype(np.float64), 1.3)
    np.testing.assert_allclose(smoothed[mask], blurred[mask], rtol=1e-5, atol=1e-6)
    assert smoothed.dtype == values.dtype


def test_banded_blur_equals_whole_map_blur_bit_for_bit() -> None:
    """Only strips around the bands are blurred; the band values equal those of the whole-map
    blur exactly (overlapping grid with shifted last tiles, bands at the image border too)."""
    rng = np.random.default_rng(5)
    values = rng.random((70, 53)).astype(np.float32)
    grid = TileGrid(70, 53, 20, 16, 15, 12, 0, "shift")
    assert grid.seams()[0] and grid.seams()[1]
    for sigma, band in ((2.0, 0.1), (1.3, 0.25), (3.0, 0.5)):
        mask = seam_mask(grid, band)
        blurred = gaussian_filter(values.astype(np.float64), sigma=sigma, mode="nearest")
        expected = np.where(mask, blurred, values).astype(np.float32)
        np.testing.assert_array_equal(smooth_seams(values, grid, band, sigma), expected)
        copy = values.copy()
        assert smooth_seams(copy, grid, band, sigma, inplace=True) is copy
        np.testing.assert_array_equal(copy, expected)


def test_single_tile_or_zero_band_leaves_map_unchanged() -> None:
    values = np.random.default_rng(0).random((10, 10))
    np.testing.assert_array_equal(smooth_seams(values, TileGrid.square(10, 10, 10), 0.1, 2.0), values)
    np.testing.assert_array_equal(smooth_seams(values, TileGrid.square(10, 10, 5), 0.0, 2.0), values)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match the grid"):
        smooth_seams(np.zeros((9, 10)), TileGrid.square(10, 10, 5), 0.1, 2.0)
