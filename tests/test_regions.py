"""Defect regions against labelling the whole mask at once (OpenCV + scipy on the full array)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from hrad.postprocess.regions import Region, defect_regions


def whole_image_regions(anomaly_map: np.ndarray, threshold: float) -> list[Region]:
    count, labels, stats, _ = cv2.connectedComponentsWithStats((anomaly_map > threshold).astype(np.uint8), connectivity=8)
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        values = anomaly_map[labels == label]
        regions.append(Region(x, y, w, h, area, float(values.max()), float(values.astype(np.float64).mean())))
    return sorted(regions, key=lambda r: (-r.peak, r.y, r.x))


def assert_same(got: list[Region], expected: list[Region]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert (a.x, a.y, a.width, a.height, a.area, a.peak) == (b.x, b.y, b.width, b.height, b.area, b.peak)
        assert a.mean == pytest.approx(b.mean, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("band_rows", [1, 2, 5, 1000])
def test_banded_labelling_equals_the_whole_mask(seed: int, band_rows: int) -> None:
    """Random blobs, diagonal chains and regions spanning many bands: joined across every band
    border exactly as one labelling of the whole mask joins them."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((47, 61)), sigma=1.5 + seed % 3).astype(np.float32)
    threshold = float(np.quantile(noise, 0.8))
    width = noise.shape[1]
    assert_same(defect_regions(noise, threshold, band_values=band_rows * width), whole_image_regions(noise, threshold))


def test_diagonal_neighbours_across_a_band_border_are_one_region() -> None:
    anomaly_map = np.zeros((4, 6), np.float32)
    anomaly_map[1, 2] = 5.0  # last row of the first band
    anomaly_map[2, 3] = 3.0  # first row of the next band, diagonal to it
    anomaly_map[2, 0] = 2.0  # not touching
    regions = defect_regions(anomaly_map, 1.0, band_values=2 * 6)
    assert regions == [Region(2, 1, 2, 2, 2, 5.0, 4.0), Region(0, 2, 1, 1, 1, 2.0, 2.0)]


def test_no_pixel_over_the_threshold_is_no_region() -> None:
    assert defect_regions(np.zeros((5, 5), np.float32), 0.0) == []
    with pytest.raises(ValueError, match="H x W"):
        defect_regions(np.zeros((2, 5, 5), np.float32), 0.0)


@settings(max_examples=150, deadline=None, derandomize=True)  # the same cases on every run (CI)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    band_rows=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.05, 0.95),
)
def test_any_mask_in_any_bands_equals_the_whole_labelling(shape: tuple[int, int], band_rows: int, seed: int, density: float) -> None:
    """Fuzzed: masks of any density and shape (single rows and columns, checkerboard-like
    diagonal chains), any band height, distinct map values so the peaks are unambiguous."""
    rng = np.random.default_rng(seed)
    anomaly_map = rng.permutation(shape[0] * shape[1]).reshape(shape).astype(np.float32)
    mask = rng.random(shape) < density
    anomaly_map[~mask] = -1.0
    assert_same(defect_regions(anomaly_map, -0.5, band_values=band_rows * shape[1]), whole_image_regions(anomaly_map, -0.5))
