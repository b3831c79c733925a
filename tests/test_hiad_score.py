"""HiAD's image score on a border-calibrated map: the pooled maximum of the finished map, not the
strategy's score scaled by the peak's border ratio (hrad.postprocess.smoothing.MapScore)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from hrad.hiad_math import pooled_max
from hrad.postprocess.border import calibrate_border
from hrad.postprocess.smoothing import MapScore, PostprocessConfig, smooth_and_score


def framed_map() -> np.ndarray:
    """A flat 10 along the top 8 rows (a border frame) and a single 6 inside: raw pooled score 10."""
    raw = np.zeros((64, 64), dtype=np.float32)
    raw[:8, 8:40] = 10.0
    raw[40, 30] = 6.0
    return raw


def test_a_map_score_is_taken_again_on_the_calibrated_map() -> None:
    """Ratio 2 on the frame: the frame's windows pool to 5, the lone 6 inside to 6/16. The score
    is 5; scaling the raw score 10 by max after / max before (6 / 10) gave 6, the inside pixel's
    value although no 4 x 4 window inside comes near it."""
    config = PostprocessConfig(sigma=0)
    raw = framed_map()
    assert pooled_max(raw, 4) == 10.0
    _, scaled = smooth_and_score(raw.copy(), 10.0, config, [2.0] * 8)
    assert scaled == pytest.approx(6.0)  # the rule without map_score, kept for the detector's own scores
    finished, score = smooth_and_score(raw.copy(), 10.0, config, [2.0] * 8, map_score=MapScore(0.0, 4))
    assert score == pytest.approx(5.0)
    assert score == pooled_max(finished, 4)


@pytest.mark.parametrize("score_sigma", [4.0, 2.0])
def test_the_score_blurs_at_its_own_sigma(score_sigma: float) -> None:
    """The score's blur equals the map's (one blur, the finished map pooled) or not (the calibrated
    raw map blurred at the score's sigma): both equal the rule computed whole."""
    config = PostprocessConfig(sigma=4.0)
    raw = framed_map()
    calibrated = calibrate_border(raw.copy(), [2.0] * 8)
    radius = int(4 * score_sigma + 0.5)
    blurred = cv2.GaussianBlur(calibrated, (2 * radius + 1,) * 2, sigmaX=score_sigma, sigmaY=score_sigma, borderType=cv2.BORDER_REFLECT)
    _, score = smooth_and_score(raw.copy(), 10.0, config, [2.0] * 8, map_score=MapScore(score_sigma, 4))
    assert score == pytest.approx(pooled_max(blurred, 4), rel=1e-6)


def test_no_calibration_keeps_the_strategy_score() -> None:
    _, score = smooth_and_score(framed_map(), 10.0, PostprocessConfig(sigma=0), None, map_score=MapScore(0.0, 4))
    assert score == 10.0
    off = PostprocessConfig(sigma=0, border_calibration=False)
    assert smooth_and_score(framed_map(), 10.0, off, [2.0] * 8, map_score=MapScore(0.0, 4))[1] == 10.0


def test_a_hiad_model_scores_its_border_calibrated_map_by_its_own_rule(tmp_path) -> None:
    """Through AnomalyModel, an artifact and an ONNX export: with border ratios the score is the
    pooled maximum of the finished map (16 x 16, the map already at the score's sigma 4)."""
    from hrad.config import ModelConfig
    from hrad.features import BackboneConfig
    from hrad.model import AnomalyModel
    from hrad.strategies import strategy_config

    config = ModelConfig(
        backbone=BackboneConfig(name="tiny-cnn"),
        detector={"name": "patchcore", "coreset_ratio": 0.5},  # type: ignore[arg-type]
        strategy=strategy_config({"name": "hiad", "patch_size": 32, "low_res_size": 32, "assignment": "a2o"}),
        device="cpu",
    )
    rng = np.random.default_rng(3)
    images = [np.clip(0.5 + rng.normal(0, 0.1, (64, 64, 3)), 0, 1).astype(np.float32) for _ in range(6)]
    model = AnomalyModel(config).fit(images)
    assert model.thresholds is not None
    model.thresholds = dataclasses.replace(model.thresholds, border_ratios=[3.0] * 12)
    image = np.clip(0.5 + rng.normal(0, 0.1, (64, 64, 3)), 0, 1).astype(np.float32)
    prediction = model.predict(image)
    assert prediction.score == pooled_max(prediction.anomaly_map, 16)
    restored = AnomalyModel.load(model.save(tmp_path / "hiad"))
    assert restored.predict(image).score == prediction.score
    pytest.importorskip("onnxruntime")
    from hrad.export import export_onnx
    from hrad.export_runtime import open_predictor

    exported = open_predictor(export_onnx(model, tmp_path / "m.onnx").with_suffix(".onnx"))
    assert exported.predict(image).score == pytest.approx(prediction.score, rel=1e-4)
