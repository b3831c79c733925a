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
from hrad.postprocess.border import BorderProfile, calibrate_border, profile_depth, rings
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
