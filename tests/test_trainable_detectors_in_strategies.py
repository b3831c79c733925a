"""The trainable ViT detectors (students, VarAD) plug into every strategy through the public model API."""

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
@pytest.mark.parametrize("detector", ["students", "varad"])
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
