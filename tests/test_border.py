"""Image-border calibration (hrad.postprocess.border): the ring arithmetic against a brute-force
distance array, the ratios' rules, the score rule, and the model learning and applying it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import textured_image

import hrad
from hrad.config import load_config
from hrad.errors import ArtifactError
from hrad.model import AnomalyModel
from hrad.postprocess.border import BorderProfile, calibrate_border, profile_depth, ratio_table, rings
from hrad.postprocess.smoothing import PostprocessConfig, smooth_and_score
from hrad.prediction import Thresholds


def distance_to_border(height: int, width: int) -> np.ndarray:
    rows = np.minimum(np.arange(height), height - 1 - np.arange(height))[:, None]
    cols = np.minimum(np.arange(width), width - 1 - np.arange(width))[None, :]
    return np.minimum(rows, cols)


@pytest.mark.parametrize("shape", [(1, 7), (5, 3), (8, 8), (9, 12), (40, 64), (2, 2)])
def test_rings_hold_each_pixel_at_its_distance_once(shape: tuple[int, int]) -> None:
    index = np.arange(shape[0] * shape[1]).reshape(shape)
    distance = distance_to_border(*shape)
    depth = max(shape)
    seen: list[int] = []
    for d, views in rings(index, depth):
        ring = np.concatenate([view.ravel() for view in views])
        assert sorted(ring.tolist()) == sorted(index[distance == d].tolist())
        seen.extend(ring.tolist())
    assert sorted(seen) == list(range(index.size))  # every pixel once


def framed(height: int, width: int, frame: float, reach: int, rng: np.random.Generator) -> np.ndarray:
    """Normal-looking map: noise around 1, raised by ``frame`` (falling linearly) within ``reach`` of the border."""
    distance = distance_to_border(height, width)
    excess = frame * np.clip(1 - distance / reach, 0, None)
    return (1 + 0.05 * rng.standard_normal((height, width)) + excess).astype(np.float32)


def test_ratios_are_the_excess_over_the_inner_ring_brute_force() -> None:
    rng = np.random.default_rng(0)
    maps = [framed(64, 96, 0.3, 6, rng) for _ in range(3)]
    profile = BorderProfile()
    for anomaly_map in maps:
        profile.update(anomaly_map)
    ratios = profile.ratios()
    assert ratios is not None
    depth = profile_depth(64, 96)
    assert depth == 16
    distance = distance_to_border(64, 96)
    stacked = np.stack(maps).astype(np.float64)
    reference = stacked[:, (distance >= depth // 2) & (distance < depth)].mean()
    expected = [max(1.0, stacked[:, distance == d].mean() / reference) for d in range(depth // 2)]
    last = max(d for d, r in enumerate(expected) if r > 1)
    np.testing.assert_allclose(ratios, expected[: last + 1], rtol=1e-9)
    assert ratios[0] == pytest.approx(1.3, abs=0.02) and len(ratios) >= 5  # the frame, not the noise
    # applied: the same division through a distance array
    target = maps[0].copy()
    calibrate_border(target, ratios)
    divisor = np.ones_like(maps[0])
    for d, ratio in enumerate(ratios):
        divisor[distance == d] = ratio
    np.testing.assert_allclose(target, maps[0] / divisor, rtol=1e-6)
    corrected_border = target[distance == 0].mean() / target[distance >= depth // 2].mean()
    assert corrected_border == pytest.approx(1.0, abs=0.02)


def axis_distances(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's distance to the nearer of top / bottom and to the nearer of left / right."""
    rows = np.minimum(np.arange(height), height - 1 - np.arange(height))[:, None]
    cols = np.minimum(np.arange(width), width - 1 - np.arange(width))[None, :]
    return np.broadcast_to(rows, (height, width)), np.broadcast_to(cols, (height, width))


def cornered(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A normal-looking map whose frame adds up: raised by 0.4 (falling linearly over 6 px) from
    top / bottom plus 0.2 (over 5 px) from left / right, so corners get both."""
    rows, cols = axis_distances(height, width)
    excess = 1 + 0.4 * np.clip(1 - rows / 6, 0, None) + 0.2 * np.clip(1 - cols / 5, 0, None)
    return (excess * (1 + 0.05 * rng.standard_normal((height, width)))).astype(np.float32)


def test_corner_ratios_add_the_edge_profiles_excesses_brute_force() -> None:
    """The table against means over distance arrays, and applied against a division by a whole
    divisor array: a corner is divided by both profiles (the 1-D rule leaves it ~20% high)."""
    rng = np.random.default_rng(3)
    maps = [cornered(64, 96, rng) for _ in range(3)]
    profile = BorderProfile()
    for anomaly_map in maps:
        profile.update(anomaly_map)
    table = profile.corner_ratios()
    assert table is not None
    depth, half = profile_depth(64, 96), profile_depth(64, 96) // 2
    rows, cols = axis_distances(64, 96)
    stacked = np.stack(maps).astype(np.float64)
    nearest = np.minimum(rows, cols)
    reference = stacked[:, (nearest >= half) & (nearest < depth)].mean()
    row = [max(1.0, stacked[:, (rows == d) & (cols >= half)].mean() / reference) for d in range(half)]
    col = [max(1.0, stacked[:, (cols == d) & (rows >= half)].mean() / reference) for d in range(half)]
    k = 1 + max(d for d in range(half) if row[d] > 1 or col[d] > 1)
    row, col = [*row[:k], 1.0], [*col[:k], 1.0]
    expected = [[r + c - 1 for c in col] for r in row]
    np.testing.assert_allclose(table, expected, rtol=1e-9)
    assert len(table) == k + 1 and table[0][k] == pytest.approx(1.4, abs=0.03) and table[k][0] == pytest.approx(1.2, abs=0.03)
    divisor = np.asarray(table, dtype=np.float32)[np.minimum(rows, k), np.minimum(cols, k)]
    for anomaly_map in maps:
        np.testing.assert_array_equal(calibrate_border(anomaly_map.copy(), table), anomaly_map / divisor)
    corrected = calibrate_border(maps[0].copy(), table)
    nearest_only = calibrate_border(maps[0].copy(), profile.ratios())
    corners = (rows < 2) & (cols < 2)
    inside = corrected[nearest >= half].mean()
    assert corrected[corners].mean() / inside == pytest.approx(1.0, abs=0.05)
    assert nearest_only[corners].mean() / nearest_only[nearest >= half].mean() > 1.15


@pytest.mark.parametrize("shape", [(64, 96), (23, 40), (9, 12)])
def test_a_1d_list_divides_exactly_as_by_the_nearest_side(shape: tuple[int, int]) -> None:
    """Models saved before corner ratios: a 1-D list through the table divides each pixel by the
    ratio at its distance to the nearest side, bit for bit; a map too small for the list only as
    deep as its own profile's half (here (23, 40): 2 of 5 distances; (9, 12): none)."""
    ratios = [1.9, 1.6, 1.3, 1.2, 1.1]
    anomaly_map = np.random.default_rng(4).random(shape, dtype=np.float32) + 0.5
    k = min(len(ratios), profile_depth(*shape) // 2)
    divisor = np.ones(shape, dtype=np.float32)
    distance = distance_to_border(*shape)
    for d in range(k):
        divisor[distance == d] = np.float32(ratios[d])
    np.testing.assert_array_equal(calibrate_border(anomaly_map.copy(), ratios), anomaly_map / divisor)
    table = ratio_table(ratios)
    assert table.shape == (6, 6) and table[2, 4] == 1.3 and table[5, 0] == 1.9 and table[5, 5] == 1.0
    np.testing.assert_array_equal(calibrate_border(anomaly_map.copy(), table.tolist()), anomaly_map / divisor)
    for bad in ([[1.0, 1.2, 1.0]], [[[1.2]]], [[1.5]]):
        with pytest.raises(ValueError, match="border ratios"):
            ratio_table(bad)


def test_no_ratios_without_an_excess_with_negative_maps_or_tiny_maps() -> None:
    rng = np.random.default_rng(1)
    quiet = BorderProfile()  # border quieter than the inner ring (an object in the middle)
    quiet.update(2 - framed(64, 64, 0.3, 8, rng))
    assert quiet.ratios() is None
    negative = BorderProfile()
    negative.update(framed(64, 64, 0.3, 8, rng) - 1.5)
    assert negative.ratios() is None
    tiny = BorderProfile()
    tiny.update(framed(7, 40, 0.3, 2, rng))
    assert tiny.ratios() is None
    for profile in (quiet, negative, tiny):
        assert profile.corner_ratios() is None
    untouched = framed(7, 40, 0.3, 2, rng)
    np.testing.assert_array_equal(calibrate_border(untouched.copy(), [1.5, 1.2]), untouched)  # too small to correct


def test_the_strategy_score_loses_what_the_border_peak_lost() -> None:
    config = PostprocessConfig(sigma=0.0)
    inside = np.ones((40, 40), dtype=np.float32)
    inside[20, 20] = 4.0
    _, score = smooth_and_score(inside.copy(), 8.0, config, [2.0, 1.5])
    assert score == 8.0  # the peak lies inside: nothing taken off
    on_border = np.ones((40, 40), dtype=np.float32)
    on_border[0, 10] = 4.0
    smoothed, score = smooth_and_score(on_border.copy(), 8.0, config, [2.0, 1.5])
    assert smoothed[0, 10] == 2.0 and score == pytest.approx(8.0 * 2.0 / 4.0)
    readonly = on_border.copy()
    readonly.flags.writeable = False
    smoothed, _ = smooth_and_score(readonly, 8.0, config, [2.0])
    assert smoothed[0, 10] == 2.0 and readonly[0, 10] == 4.0
    _, score = smooth_and_score(on_border.copy(), 8.0, config.model_copy(update={"image_score": "max"}), [2.0, 1.5])
    assert score == 2.0


def test_stored_ratios_are_checked() -> None:
    base = {"image": 1.0, "pixel": 1.0, "validation_image_scores": [1.0]}
    assert Thresholds.from_json(base).border_ratios is None
    assert Thresholds.from_json({**base, "border_ratios": [1.2, 1.0]}).border_ratios == [1.2, 1.0]
    for bad in ([0.5], [float("nan")], ["x"], 3):
        with pytest.raises(ArtifactError, match="border_ratios"):
            Thresholds.from_json({**base, "border_ratios": bad})


def fitted_with_frame(frame: float, border_calibration: bool = True) -> AnomalyModel:
    """A tiny model whose strategy adds a bright frame to every map, as padding does to real ones."""
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-cnn"},
            "detector": {"name": "test-gaussian"},
            "strategy": {"name": "tiled", "tile": 64},
            "postprocess": {"border_calibration": border_calibration},
        },
    )
    model = add_frame(AnomalyModel(config), frame)
    rng = np.random.default_rng(2)
    return model.fit([textured_image(rng, 96, 128) for _ in range(8)])


def add_frame(model: AnomalyModel, frame: float) -> AnomalyModel:
    predict = model.strategy.predict

    def with_frame(image: np.ndarray):  # type: ignore[no-untyped-def]
        result = predict(image)
        height, width = result.anomaly_map.shape
        result.anomaly_map *= (1 + frame * np.clip(1 - distance_to_border(height, width) / 6, 0, None)).astype(np.float32)
        return result

    model.strategy.predict = with_frame  # type: ignore[method-assign]
    return model


def test_model_learns_the_frame_from_held_out_normals_and_divides_it_out(tmp_path: Path) -> None:
    model = fitted_with_frame(0.5)
    assert model.thresholds is not None and model.thresholds.border_ratios is not None
    assert model.thresholds.border_ratios[0] > 1.3
    image = textured_image(np.random.default_rng(9), 96, 128)
    prediction = model.predict(image)
    distance = distance_to_border(96, 128)
    raw = model.strategy.predict(image).anomaly_map
    raw_excess = raw[distance < 2].mean() / raw[distance >= 12].mean()
    excess = prediction.anomaly_map[distance < 2].mean() / prediction.anomaly_map[distance >= 12].mean()
    assert raw_excess > 1.3 and abs(excess - 1) < abs(raw_excess - 1) / 3
    off = fitted_with_frame(0.5, border_calibration=False)
    assert off.thresholds is not None and off.thresholds.border_ratios is None
    # the artifact keeps it; a plain load predicts the same map
    model.save(tmp_path / "model")
    loaded = add_frame(hrad.load(tmp_path / "model"), 0.5)
    assert loaded.thresholds is not None and loaded.thresholds.border_ratios == model.thresholds.border_ratios
    np.testing.assert_allclose(loaded.predict(image).anomaly_map, prediction.anomaly_map, rtol=1e-5, atol=1e-6)
