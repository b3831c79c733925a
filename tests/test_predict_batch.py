"""Strategy.predict_batch: every registered strategy answers a batch as it answers images one by one."""

from __future__ import annotations

import numpy as np
import pytest

from hrad.config import load_config
from hrad.model import AnomalyModel
from tests.conftest import textured_image, with_spot

pytestmark = pytest.mark.usefixtures("one_thread")

STRATEGIES = [
    {"name": "downsample", "image_size": 64},
    {"name": "tiled", "tile": 48},
    {"name": "tiled-ensemble", "tile": 48},
    {"name": "mrf", "pixel_budget": 12_000, "scales": (0.5, 1.0)},
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s["name"])
def test_predict_batch_equals_predict(strategy: dict, rng: np.random.Generator) -> None:
    backbone = "tiny-vit" if strategy["name"] == "mrf" else "tiny-cnn"
    train = [textured_image(rng, 96, 128) for _ in range(3)]
    test = [textured_image(rng, 96, 128), with_spot(textured_image(rng, 96, 128), 40, 60, 8)[0]]
    config = load_config(None, {"backbone": {"name": backbone}, "detector": {"name": "test-gaussian"}, "strategy": strategy, "threshold": {"validation_fraction": 0.0}})
    model = AnomalyModel(config).fit(train)
    batch = model.strategy.predict_batch(test)
    assert len(batch) == len(test)
    for image, result in zip(test, batch, strict=True):
        alone = model.strategy.predict(image)
        assert result.anomaly_map.shape == image.shape[:2]
        np.testing.assert_allclose(result.anomaly_map, alone.anomaly_map, rtol=1e-5, atol=1e-6)
        assert result.score == pytest.approx(alone.score, rel=1e-5)
