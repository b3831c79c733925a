"""Strategy.predict_batch: every registered strategy answers a batch as it answers images one by one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import textured_image, with_spot

from hrad.config import load_config
from hrad.model import AnomalyModel
from hrad.strategies.tiled import TiledStrategy

pytestmark = pytest.mark.usefixtures("one_thread")

STRATEGIES = [
    {"name": "downsample", "image_size": 64},
    {"name": "tiled", "tile": 48},
    {"name": "tiled-ensemble", "tile": 48},
    {"name": "mrf", "pixel_budget": 12_000, "scales": (0.5, 1.0)},
    {"name": "hiad", "patch_size": 32, "low_res_size": 32, "fusion_rates": [0, 1]},
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s["name"])
def test_predict_batch_equals_predict(strategy: dict, rng: np.random.Generator) -> None:
    backbone = "tiny-vit" if strategy["name"] == "mrf" else "tiny-cnn"
    train = [textured_image(rng, 96, 128) for _ in range(3)]
    test = [textured_image(rng, 96, 128), with_spot(textured_image(rng, 96, 128), 40, 60, 8)[0]]
    held_out = 0.34 if strategy["name"] == "hiad" else 0.0  # HiAD calibrates on held-out normals
    config = load_config(
        None,
        {"backbone": {"name": backbone}, "detector": {"name": "test-gaussian"}, "strategy": strategy, "threshold": {"validation_fraction": held_out}},
    )
    model = AnomalyModel(config).fit(train)
    batch = model.strategy.predict_batch(test)
    assert len(batch) == len(test)
    for image, result in zip(test, batch, strict=True):
        alone = model.strategy.predict(image)
        assert result.anomaly_map.shape == image.shape[:2]
        np.testing.assert_allclose(result.anomaly_map, alone.anomaly_map, rtol=1e-5, atol=1e-6)
        assert result.score == pytest.approx(alone.score, rel=1e-5)


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "tiled", "tile": 32, "batch_size": 3},
        {"name": "tiled", "tile": 32, "stride": 24, "batch_size": 2, "score": "max"},
        {"name": "downsample", "image_size": 48, "pad_to_square": True, "batch_size": 2},
    ],
    ids=["tiled", "tiled-overlap", "downsample-pad"],
)
def test_tiled_batch_shares_backbone_batches_across_images_of_different_sizes(
    strategy: dict, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of several images (different sizes, more tiles than the batch) go through the
    backbone in full batches across image boundaries; PatchCore scores them in few searches;
    every image's map and score equal predicting it alone, and the per-window-batch scoring of
    old (``predict`` with ``score_windows``)."""
    train = [textured_image(rng, 80, 96) for _ in range(2)]
    test = [
        textured_image(rng, 80, 96),
        with_spot(textured_image(rng, 64, 112), 30, 50, 6)[0],
        (textured_image(rng, 45, 70) * 255).astype(np.uint8),  # smaller than two tiles, 8-bit
        textured_image(rng, 100, 64),
    ]
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-cnn"},
            "detector": {"name": "patchcore", "coreset_ratio": 1.0},
            "strategy": strategy,
            "threshold": {"validation_fraction": 0.0},
        },
    )
    model = AnomalyModel(config).fit(train)
    tiled = model.strategy
    assert isinstance(tiled, TiledStrategy)
    backbone_batches: list[int] = []
    searches: list[int] = []
    embedder, detector = tiled.tiles.embedder, tiled.detector
    embed, search = embedder.__call__, detector.predict

    def counting_embed(windows: torch.Tensor) -> torch.Tensor:
        backbone_batches.append(len(windows))
        return embed(windows)

    def counting_search(embeddings: torch.Tensor) -> Any:
        searches.append(len(embeddings))
        return search(embeddings)

    monkeypatch.setattr(tiled.tiles, "embedder", counting_embed)
    monkeypatch.setattr(detector, "predict", counting_search)
    batch = tiled.predict_batch(test)
    monkeypatch.undo()
    total_tiles = sum(searches)
    size = strategy["batch_size"]
    assert total_tiles > size and len(test) > size
    assert backbone_batches == [size] * (total_tiles // size) + ([total_tiles % size] if total_tiles % size else [])
    assert len(searches) < len(backbone_batches)  # several backbone batches per search
    for image, result in zip(test, batch, strict=True):
        alone = tiled.predict(image)
        per_window_batch = tiled.predict(image, score_windows=tiled.score_windows)
        assert result.anomaly_map.shape == image.shape[:2] and result.anomaly_map.dtype == np.float32
        for reference in (alone, per_window_batch):
            np.testing.assert_allclose(result.anomaly_map, reference.anomaly_map, rtol=1e-5, atol=1e-5)
            assert result.score == pytest.approx(reference.score, rel=1e-5, abs=1e-6)
    assert batch[1].score > batch[0].score  # the spot is found through the batch too
    assert tiled.predict_batch([]) == []
