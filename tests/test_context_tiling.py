"""Context-aware tiling: tile embeddings with enough context equal the whole image's embedding.

The overlap-tile rule (:class:`hrad.strategies.tiling.ContextEmbedder`): each tile goes
through the backbone with a margin of real neighbouring pixels, and the margin's cells are
cropped off. With a margin of the backbone's full receptive field and tile origins on the
embedding's cell grid, the tile embeddings placed side by side are the embedding of the whole
image computed at once, everywhere farther than the margin from the image border (there the
whole-image pass sees the convolutions' zero padding, the tiles a reflection).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrad.detectors.base import detector_class, detector_config
from hrad.errors import ConfigError
from hrad.features.base import BackboneConfig, Embedder, EmbeddingSpec, build_backbone
from hrad.strategies.tiling import ContextEmbedder, TileGrid


def assemble(tiles: ContextEmbedder, image: torch.Tensor, tile: int) -> torch.Tensor:
    """Tile embeddings (non-overlapping tiles) placed side by side: ``C x h x w``."""
    grid = tiles.grid(*image.shape[-2:], tile, tile)
    return grid.assemble(torch.cat([tiles(windows) for _, windows in grid.batches(grid.pad(image), 4)]))


def interior(tensor: torch.Tensor, cells: int) -> torch.Tensor:
    return tensor[..., cells:-cells, cells:-cells]


@pytest.fixture(scope="module")
def lite0_patchcore_embedder() -> Embedder:
    extractor = build_backbone(BackboneConfig(name="efficientnet-lite0"))
    spec = detector_class("patchcore").embedding_spec(detector_config({"name": "patchcore"}), extractor)
    return Embedder(extractor, spec)


@pytest.mark.slow
def test_full_receptive_field_margin_reproduces_the_whole_image_embedding(lite0_patchcore_embedder: Embedder) -> None:
    """Real EfficientNet-Lite0 weights, PatchCore's layer2+layer3 with 3x3 aggregation."""
    embedder = lite0_patchcore_embedder
    torch.manual_seed(0)
    image = torch.rand(3, 512, 512)
    whole = embedder(image[None])[0]  # cells of 8 px: 64 x 64
    margin = 224  # >= the theoretical receptive field (192 px, benchmarks/results/receptive_field.md), whole cells
    tiles = ContextEmbedder(embedder, 128, 128, context=margin)
    assert tiles.margin == margin and tiles.crop_cells == margin // 8
    assembled = assemble(tiles, image, 128)
    far = margin // 8  # cells farther than the margin from the image border
    torch.testing.assert_close(interior(assembled, far), interior(whole, far), rtol=1e-4, atol=1e-4)
    # without context the tile borders differ: that is the seam
    alone = assemble(ContextEmbedder(embedder, 128, 128, context=0), image, 128)
    assert (interior(alone, far) - interior(whole, far)).abs().max() > 0.1


@pytest.mark.slow
def test_default_margin_residual_is_small_and_measured(lite0_patchcore_embedder: Embedder) -> None:
    """With the default (95% ERF) margin the residual is small next to having no context."""
    embedder = lite0_patchcore_embedder
    extractor = embedder.extractor
    assert extractor.default_context == 96
    torch.manual_seed(1)
    image = torch.rand(3, 512, 512)
    whole = interior(embedder(image[None])[0], 24)
    residual = {}
    for context in (0, extractor.default_context):
        assembled = interior(assemble(ContextEmbedder(embedder, 128, 128, context), image, 128), 24)
        residual[context] = float((assembled - whole).abs().mean() / whole.abs().mean())
    assert residual[extractor.default_context] < 0.25 * residual[0]


def test_vit_context_keeps_the_token_grid_and_crops_whole_tokens() -> None:
    """Global attention: a ViT window is never equal to the whole image (every token sees the
    whole window), so only the geometry is exact: margins are whole 14-pixel tokens, the crop
    leaves the tile's own token grid, and a tile that is not a multiple of 14 is resized with its
    margin by the same factor."""
    extractor = build_backbone(BackboneConfig(name="tiny-vit"))
    embedder = Embedder(extractor, EmbeddingSpec(layers=("block4",)))
    tiles = ContextEmbedder(embedder, 56, 56, context=20)
    assert (tiles.input_margin, tiles.margin, tiles.crop_cells) == (28, 28, 2)
    windows = TileGrid.square(100, 100, 56, 56, margin=tiles.margin).tile(torch.rand(3, 100, 100))
    assert tiles(windows).shape[-2:] == (4, 4)
    resized = ContextEmbedder(embedder, 50, 50, context=10)  # tile 50 -> 56 at the input, 10 -> 11.2 -> 14
    assert resized.input_size == (56, 56) and resized.input_margin == 14 and resized.margin == 12
    assert resized(torch.rand(1, 3, 50 + 24, 50 + 24)).shape[-2:] == (4, 4)


def test_margin_rounds_up_to_whole_cells_of_the_deepest_layer() -> None:
    extractor = build_backbone(BackboneConfig(name="tiny-cnn"))
    embedder = Embedder(extractor, EmbeddingSpec(layers=("layer2", "layer3")))  # strides 8 and 16
    tiles = ContextEmbedder(embedder, 64, 64, context=20)
    assert (tiles.margin, tiles.crop_cells) == (32, 4)
    assert ContextEmbedder(embedder, 64, 64, context=0).margin == 0
    with pytest.raises(ConfigError, match="context"):
        ContextEmbedder(embedder, 64, 64, context=-1)


def test_strategies_take_the_backbone_default_and_zero_turns_it_off() -> None:
    from hrad.config import load_config
    from hrad.model import AnomalyModel

    config = load_config(None, {"backbone": {"name": "tiny-cnn"}, "strategy": {"name": "tiled", "tile": 64}})
    model = AnomalyModel(config)
    assert model.strategy.tiles.requested == model.extractor.default_context  # type: ignore[attr-defined]
    off = AnomalyModel(load_config(None, {"backbone": {"name": "tiny-cnn"}, "strategy": {"name": "tiled", "tile": 64, "context": 0}}))
    assert off.strategy.tiles.margin == 0  # type: ignore[attr-defined]
    image = np.random.default_rng(0).random((100, 130, 3)).astype(np.float32)
    fitted = AnomalyModel(load_config(None, {"backbone": {"name": "tiny-cnn"}, "strategy": {"name": "tiled", "tile": 64, "context": 16}}))
    fitted.fit([image, image[::-1].copy(), image[:, ::-1].copy()], validation=[image])
    prediction = fitted.predict(image)
    assert prediction.anomaly_map.shape == (100, 130) and np.isfinite(prediction.anomaly_map).all()

