"""The trainable detectors plug into every strategy through the public model API."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import textured_image

from hrad.config import load_config
from hrad.model import AnomalyModel

#: one short epoch each; RD++'s strided bottleneck needs more than the 4 x 4 token grid of a 56 px ViT input
DETECTOR_OPTIONS: dict[str, dict[str, Any]] = {
    "rdpp": {"epochs": 1, "bottleneck_stride": 1},
    "destseg": {"student_epochs": 1, "segmentation_epochs": 1, "student_stages": 1},
}

STRATEGIES: dict[str, dict[str, Any]] = {
    "downsample": {"name": "downsample", "image_size": 56},
    "tiled": {"name": "tiled", "tile": 56},
    "hiad": {"name": "hiad", "patch_size": 56, "low_res_size": 56, "assignment": "o2o", "fusion_rates": [0]},
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("detector", ["students", "varad", "fastflow", "vitad", "rdpp", "destseg", "realnet"])
def test_fits_and_predicts_full_resolution_maps(detector: str, strategy: str, tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = [textured_image(rng, 84, 112) for _ in range(5)]
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-vit"},
            "detector": {"name": detector, **DETECTOR_OPTIONS.get(detector, {"epochs": 1})},
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
@pytest.mark.parametrize("detector", ["fastflow", "rdpp", "destseg", "realnet"])
def test_cnn_detectors_get_one_level_per_layer_in_every_strategy(detector: str, strategy: str, tmp_path) -> None:
    """On a CNN the layers differ in width: the strategy binds the split (bind_layout) before fit."""
    rng = np.random.default_rng(1)
    images = [textured_image(rng, 84, 112) for _ in range(5)]
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-cnn"},
            "detector": {"name": detector, **DETECTOR_OPTIONS.get(detector, {"epochs": 1})},
            "strategy": CNN_STRATEGIES[strategy],
            "device": "cpu",
        },
    )
    model = AnomalyModel(config).fit(images)
    layers = model.strategy.embedder.layer_channels  # type: ignore[attr-defined]
    assert len(set(layers)) > 1 and model.strategy.detector_config.level_channels == layers  # type: ignore[attr-defined]
    prediction = model.predict(images[0])
    assert prediction.anomaly_map.shape == (84, 112) and np.isfinite(prediction.anomaly_map).all()
    restored = AnomalyModel.load(model.save(tmp_path / "model"))
    np.testing.assert_allclose(restored.predict(images[0]).anomaly_map, prediction.anomaly_map, rtol=1e-5, atol=1e-6)
