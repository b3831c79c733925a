"""The frozen-feature cache of multi-pass fits (tiled / downsample): float16 in RAM up to its
budget, the rest spilled to disk and read back memory-mapped, with the same training results."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import textured_image

from hrad.config import load_config
from hrad.errors import ConfigError
from hrad.model import AnomalyModel

pytestmark = pytest.mark.usefixtures("one_thread")

#: 84 x 112 images: in 56 px tiles one batch of 4 tiles per image; downsampled one batch of 1
IMAGES = 5


EPOCHS = 2


def build(strategy: dict[str, Any], budget_mb: float | None, work_dir: Path) -> AnomalyModel:
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-cnn"},
            "detector": {
                "name": "fastflow",
                "epochs": EPOCHS,
                "flow_steps": 2,
                "layers": ["layer2"],
                "hidden_ratio": 0.5,
            },
            "strategy": {**strategy, "feature_cache_mb": budget_mb, "work_dir": str(work_dir)},
            "threshold": {"validation_fraction": 0.0},
            "device": "cpu",
        },
    )
    return AnomalyModel(config)


def fit(strategy: dict[str, Any], budget_mb: float | None, work_dir: Path) -> tuple[AnomalyModel, list[int]]:
    """Fit FastFlow with the given cache budget; the spilled chunk count after every epoch."""
    rng = np.random.default_rng(0)
    images = [textured_image(rng, 84, 112) for _ in range(IMAGES)]
    model = build(strategy, budget_mb, work_dir)
    detector = model.strategy.detector  # type: ignore[attr-defined]
    assert detector.multi_pass
    chunks: list[int] = []

    def count_chunks(stage: object, epoch: int, loss: float) -> bool:
        chunks.append(len(list(work_dir.rglob("*.npy"))))
        return False

    detector.end_epoch = count_chunks
    model.fit(images)
    return model, chunks


@pytest.mark.parametrize(
    ("strategy", "labels"),
    [
        ({"name": "tiled", "tile": 56}, ("ram", "disk", "both")),
        ({"name": "downsample", "image_size": 112, "batch_size": 1}, ("ram", "disk")),
    ],
)
def test_spilled_cache_trains_exactly_as_the_in_ram_cache_and_is_removed(
    strategy: dict[str, Any], labels: tuple[str, ...], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe = build(strategy, None, tmp_path).strategy
    batches = list(probe.embed_image(textured_image(np.random.default_rng(0), 84, 112)))  # type: ignore[attr-defined]
    assert len(batches) == 1
    batch_mb = batches[0].numel() * 2 / 2**20  # float16
    runs = {}
    for label in labels:
        budget = {"ram": None, "disk": 0.0, "both": 2.5 * batch_mb}[label]
        work_dir = tmp_path / label
        work_dir.mkdir()
        with caplog.at_level(logging.INFO, logger="hrad.strategies.tiled"):
            caplog.clear()
            model, chunks = fit(strategy, budget, work_dir)
        spilled = [record for record in caplog.records if "spilling the rest" in record.getMessage()]
        # batches beyond the budget are on disk during training, and gone once the fit ends
        expected = {"ram": 0, "disk": IMAGES, "both": IMAGES - 2}[label]
        assert chunks == [expected] * EPOCHS and len(spilled) == (expected > 0)
        assert list(work_dir.iterdir()) == []
        runs[label] = model
    reference = runs["ram"]
    for label in labels[1:]:
        assert runs[label].training_history == reference.training_history
        state = runs[label].strategy.state_dict()
        for key, value in reference.strategy.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_cache_budget_option_is_validated() -> None:
    with pytest.raises(ConfigError, match="strategy.feature_cache_mb"):
        load_config(None, {"strategy": {"name": "tiled", "feature_cache_mb": -1}})
