"""Pseudo-anomaly pasting and min-max calibration (hrad.postprocess.calibration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from hrad.errors import ArtifactError, ConfigError
from hrad.postprocess.calibration import (
    DIFFERENCE_RANGE,
    MinMaxCalibration,
    normalize_range,
    paste_pseudo_anomalies,
    pseudo_anomaly_scale,
)


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.2, 0.8, size=(height, width, 3)).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_pasted_rectangles_follow_the_paper_rules(seed: int) -> None:
    image = _textured(1200, 1100, seed)
    out, mask = paste_pseudo_anomalies(image, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.float32 and mask.dtype == bool
    np.testing.assert_array_equal(out[~mask], image[~mask])  # nothing outside the mask changes
    assert mask.any()
    labels, count = ndimage.label(mask)
    assert 1 <= count <= 5  # (touching rectangles merge, so this is an upper bound check)
    for index in range(1, count + 1):
        ys, xs = np.nonzero(labels == index)
        # each pasted region is flat-coloured where it was not overpainted by another one
        colours = np.unique(out[ys, xs].reshape(-1, 3), axis=0)
        assert len(colours) <= 5
    # one rectangle alone: accepted colour difference within [20, 50] / 255
    single, single_mask = paste_pseudo_anomalies(image, np.random.default_rng(100 + seed), max_count=1)
    ys, xs = np.nonzero(single_mask)
    side_h, side_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert single_mask.sum() == side_h * side_w  # a rectangle
    assert 16 <= side_h <= 40 or 80 <= side_h <= 100
    difference = np.abs(single[single_mask] - image[single_mask]).mean()
    assert DIFFERENCE_RANGE[0] - 1e-6 <= difference <= DIFFERENCE_RANGE[1] + 1e-6
    assert len(np.unique(single[single_mask], axis=0)) == 1


def test_pseudo_anomalies_are_deterministic_and_scaled_for_small_images() -> None:
    image = _textured(128, 160)
    a, mask_a = paste_pseudo_anomalies(image, np.random.default_rng(7))
    b, mask_b = paste_pseudo_anomalies(image, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert pseudo_anomaly_scale(128, 160) == pytest.approx(0.125)
    for seed in range(10):
        _, mask = paste_pseudo_anomalies(image, np.random.default_rng(seed), max_count=1)
        ys, xs = np.nonzero(mask)
        assert ys.max() - ys.min() + 1 <= 13 and xs.max() - xs.min() + 1 <= 13  # 100 px * 0.125
    with pytest.raises(ConfigError):
        paste_pseudo_anomalies(image[..., 0], np.random.default_rng(0))


def test_calibration_puts_detectors_with_different_raw_scales_on_one_scale() -> None:
    rng = np.random.default_rng(0)
    calibration = MinMaxCalibration()
    small = torch.from_numpy(rng.uniform(0.0, 0.1, size=(8, 8)))  # detector A: tiny raw distances
    large = torch.from_numpy(rng.uniform(200.0, 900.0, size=(8, 8)))  # detector B: huge ones
    calibration.update("a", small)
    calibration.update("b", large)
    normal_a, normal_b = calibration.normalize("a", small), calibration.normalize("b", large)
    assert float(normal_a.min()) == 0.0 and float(normal_a.max()) == 1.0
    assert float(normal_b.min()) == 0.0 and float(normal_b.max()) == 1.0
    # same relative position in each range -> the same calibrated score
    low_a, high_a = calibration.range("a")
    low_b, high_b = calibration.range("b")
    mid_a = torch.tensor([low_a + 0.3 * (high_a - low_a)])
    mid_b = torch.tensor([low_b + 0.3 * (high_b - low_b)])
    assert float(calibration.normalize("a", mid_a)) == pytest.approx(0.3)
    assert float(calibration.normalize("b", mid_b)) == pytest.approx(0.3)
    # out-of-range scores are clipped, never rescaled by the batch they come with
    assert calibration.normalize("a", torch.tensor([-5.0, 5.0])).tolist() == [0.0, 1.0]
    assert float(calibration.normalize("b", torch.tensor([500.0]))) == float(
        calibration.normalize("b", torch.tensor([500.0, 1e9, -1e9]))[0]
    )


def test_streaming_updates_equal_one_update_and_state_round_trips() -> None:
    rng = np.random.default_rng(1)
    maps = [torch.from_numpy(rng.normal(size=(4, 5))) for _ in range(5)]
    streamed, whole = MinMaxCalibration(), MinMaxCalibration()
    for item in maps:
        streamed.update("high.0", item)
    streamed.update("high.0", torch.tensor([float("nan")]))  # ignored
    whole.update("high.0", torch.stack(maps))
    assert streamed.range("high.0") == whole.range("high.0")
    restored = MinMaxCalibration()
    restored.load_state_dict(streamed.state_dict())
    assert restored.range("high.0") == streamed.range("high.0")
    assert restored.names() == ["high.0"]
    with pytest.raises(ConfigError):
        restored.range("low")
    with pytest.raises(ArtifactError):
        MinMaxCalibration().load_state_dict({"x.min": torch.tensor(0.0)})


def test_degenerate_range_is_a_step() -> None:
    values = torch.tensor([0.0, 1.0, 2.0])
    assert normalize_range(values, 1.0, 1.0).tolist() == [0.0, 0.0, 1.0]
    assert normalize_range(values, 0.0, 2.0).tolist() == [0.0, 0.5, 1.0]


def test_complete_pool_fills_unreached_detectors_and_lifts_the_ones_no_anomaly_reached() -> None:
    calibration = MinMaxCalibration()
    calibration.update("high.0", torch.tensor([1.0, 10.0]))  # a pseudo-anomaly reached it: max 10
    calibration.update("high.1", torch.tensor([2.0, 8.0]))  # reached: max 8
    calibration.update("high.2", torch.tensor([0.5, 3.0]))  # only normal patches: max 3
    names = ["high.0", "high.1", "high.2", "high.3"]  # high.3: no validation patch at all
    paper = MinMaxCalibration()
    paper.load_state_dict(calibration.state_dict())
    paper.complete_pool(names)  # no anomalous names: every detector keeps its own range
    assert [paper.range(n) for n in names] == [(1.0, 10.0), (2.0, 8.0), (0.5, 3.0), (0.5, 10.0)]
    calibration.complete_pool(names, {"high.0", "high.1"})
    assert [calibration.range(n) for n in names] == [(1.0, 10.0), (2.0, 8.0), (0.5, 10.0), (0.5, 10.0)]
    # an own max above the reached ones' stays; an empty set changes nothing
    other = MinMaxCalibration()
    other.update("high.0", torch.tensor([0.0, 4.0]))
    other.update("high.1", torch.tensor([0.0, 6.0]))
    other.complete_pool(["high.0", "high.1"], {"high.0"})
    assert other.range("high.1") == (0.0, 6.0)
    other.complete_pool(["high.0", "high.1"], set())
    assert other.range("high.0") == (0.0, 4.0)
