"""The trainable detectors plug into every strategy through the public model API."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import textured_image

from hrad.config import load_config
from hrad.model import AnomalyModel

STRATEGIES: dict[str, dict[str, Any]] = {
    "downsample": {"name": "downsample", "image_size": 56},
    "tiled": {"name": "tiled", "tile": 56},
    "hiad": {"name": "hiad", "patch_size": 56, "low_res_size": 56, "assignment": "o2o", "fusion_rates": [0]},
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("detector", ["students", "varad", "fastflow", "vitad"])
def test_fits_and_predicts_full_resolution_maps(detector: str, strategy: str, tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = [textured_image(rng, 84, 112) for _ in range(5)]
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-vit"},
            "detector": {"name": detector, "epochs": 1},
            "strategy": STRATEGIES[strategy],
            "device": "cpu",
        },
    )
    model = AnomalyModel(config).fit(images)
    prediction = model.predict(images[0])
    assert prediction.anomaly_map.shape == (84, 112)
    assert np.isfinite(prediction.anomaly_map).all() and np.isfinite(prediction.score)
    restored = AnomalyModel.load(model.save(tmp_path / "model"))
    np.testing.assert_allclose(restored.predict(images[0]).anomaly_map, prediction.anomaly_map, rtol=1e-5, atol=1e-6)


CNN_STRATEGIES: dict[str, dict[str, Any]] = {
    **STRATEGIES,
    "tiled-ensemble": {"name": "tiled-ensemble", "tile": 56, "stride": 56},
}


@pytest.mark.parametrize("strategy", sorted(CNN_STRATEGIES))
@pytest.mark.parametrize("detector", ["fastflow"])
def test_cnn_detectors_get_one_level_per_layer_in_every_strategy(detector: str, strategy: str, tmp_path) -> None:
    """On a CNN the layers differ in width: the strategy binds the split (bind_layout) before fit."""
    rng = np.random.default_rng(1)
    images = [textured_image(rng, 84, 112) for _ in range(5)]
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-cnn"},
            "detector": {"name": detector, "epochs": 1},
            "strategy": CNN_STRATEGIES[strategy],
            "device": "cpu",
        },
    )
    model = AnomalyModel(config).fit(images)
    assert model.strategy.detector_config.level_channels == (16, 32)  # type: ignore[attr-defined]
    prediction = model.predict(images[0])
    assert prediction.anomaly_map.shape == (84, 112) and np.isfinite(prediction.anomaly_map).all()
    restored = AnomalyModel.load(model.save(tmp_path / "model"))
    np.testing.assert_allclose(restored.predict(images[0]).anomaly_map, prediction.anomaly_map, rtol=1e-5, atol=1e-6)
