"""ViTAD detector: embedding defaults, layout, training, localisation, state, batch independence."""

from __future__ import annotations

import pytest
import torch

from hrad.detectors.vitad import (
    ViTAD,
    ViTADConfig,
    decoder_taps,
    default_blocks,
    default_heads,
    sincos_position_embedding,
)
from hrad.errors import ArtifactError, ConfigError, InputError, NotFittedError
from hrad.features import BackboneConfig, Embedder, build_backbone

#: tiny layout: three 8-channel levels + an 8-channel neck, decoder width 8, 2 heads
TINY = {"decoder_depth": 3, "heads": 2}
CHANNELS = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_pattern(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A fixed spatially smooth ``1 x C x h x w`` map: the normal class."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    columns = torch.arange(width, dtype=torch.float32)[None, :]
    frequency = torch.rand(channels, 2, generator=generator) * 0.8
    phase = torch.rand(channels, generator=generator) * 6.28
    waves = torch.sin(frequency[:, 0, None, None] * rows + frequency[:, 1, None, None] * columns + phase[:, None, None])
    return (waves + 0.5 * torch.randn(channels, 1, 1, generator=generator)).unsqueeze(0)


def normal_batches(count: int, size: int, seed: int, height: int = 6, width: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pattern = smooth_pattern(CHANNELS, height, width, seed=0)
    return [pattern + 0.05 * torch.randn(size, CHANNELS, height, width, generator=generator) for _ in range(count)]


def fitted(epochs: int = 2, **options: object) -> tuple[ViTAD, torch.Tensor]:
    config = ViTADConfig.model_validate({**TINY, "epochs": epochs, **options})
    detector = ViTAD(config)
    batches = normal_batches(2, 3, seed=5)
    detector.fit(batches)
    return detector, torch.cat(batches)


def test_default_embedding_takes_quarter_depth_blocks_and_the_neck() -> None:
    assert default_blocks(12) == ("block3", "block6", "block9", "block12")
    assert default_blocks(12, neck=False) == ("block3", "block6", "block9")
    assert decoder_taps(9, 3) == [3, 6, 9]
    assert [default_heads(width) for width in (16, 200, 384, 768, 1024)] == [1, 2, 6, 12, 16]
    vit = build_backbone(BackboneConfig(name="tiny-vit"))
    spec = ViTAD.default_embedding(vit)
    assert spec.layers == ("block1", "block2", "block3", "block4") and spec.aggregation == 1
    # fusing the levels themselves needs no neck block
    levels_only = ViTAD.embedding_spec(ViTADConfig(fuser_input="levels"), vit)
    assert levels_only.layers == ("block1", "block2", "block3")
    explicit = ViTAD.embedding_spec(ViTADConfig(layers=("block2", "block4")), vit)
    assert explicit.layers == ("block2", "block4")
    with pytest.raises(ConfigError, match="ViT"):
        ViTAD.default_embedding(build_backbone(BackboneConfig(name="tiny-cnn")))
    with pytest.raises(ConfigError, match="ViT"):
        ViTAD.embedding_spec(ViTADConfig(layers=("layer1",)), build_backbone(BackboneConfig(name="tiny-cnn")))


def test_bind_layout_fills_level_channels_once() -> None:
    bound = ViTAD.bind_layout(ViTADConfig(), (384, 384, 384, 384))
    assert bound.level_channels == (384, 384, 384, 384)
    explicit = ViTADConfig(level_channels=(8, 8, 16))
    assert ViTAD.bind_layout(explicit, (16, 16)).level_channels == (8, 8, 16)
    detector = ViTAD(ViTAD.bind_layout(ViTADConfig(epochs=1, **TINY), (4, 12, 8, 8)))
    detector.fit([torch.randn(1, CHANNELS, 3, 3)])
    assert detector.layout == [4, 12, 8, 8]
    # the decoder width follows the neck; widths that differ get a linear output map
    assert [r.shape[1] for r in detector.reconstructions(torch.randn(1, CHANNELS, 3, 3))] == [4, 12, 8]
    # as a strategy wires it: default embedding of tiny-vit -> bind_layout -> fit / predict
    vit = build_backbone(BackboneConfig(name="tiny-vit"))
    embedder = Embedder(vit, ViTAD.default_embedding(vit))
    config = ViTAD.bind_layout(ViTADConfig(epochs=1), embedder.layer_channels)
    assert config.level_channels == (16, 16, 16, 16)
    embeddings = embedder(torch.rand(2, 3, 56, 56))
    wired = ViTAD(config)
    wired.fit([embeddings])
    assert wired.predict(embeddings).maps.shape == (2, 4, 4)


def test_training_reduces_the_loss() -> None:
    detector = ViTAD(ViTADConfig(**TINY, epochs=8, lr=3e-3))  # few steps: a larger lr than the paper's
    detector.fit(normal_batches(2, 2, seed=1))
    assert len(detector.loss_history) == 8
    assert detector.loss_history[-1] < 0.8 * detector.loss_history[0]


@pytest.mark.parametrize("fuser_input", ["neck", "levels"])
def test_out_of_distribution_token_scores_highest(fuser_input: str) -> None:
    detector = ViTAD(ViTADConfig.model_validate({**TINY, "epochs": 100, "lr": 3e-3, "fuser_input": fuser_input}))
    channels = CHANNELS if fuser_input == "neck" else 24
    batches = [batch[:, :channels] for batch in normal_batches(2, 4, seed=2)]
    detector.fit(batches)
    test = normal_batches(1, 4, seed=3)[0][:, :channels].clone()
    generator = torch.Generator().manual_seed(4)
    test[3, :, 2, 4] = 2.0 * torch.randn(channels, generator=generator)  # every layer of token (2, 4)
    output = detector.predict(test)
    assert output.maps.shape == (4, 6, 6)
    assert divmod(int(output.maps[3].argmax()), 6) == (2, 4)
    assert output.scores[3] > output.scores[:3].max()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "fuser_input": "levels",
            "level_channels": (8, 8, 16),
            "projection": "linear",
            "loss": "token+flat",
            "image_score": "top_mean",
            "decoder_dim": 12,
        },
    ],
)
def test_state_round_trip_restores_predictions_exactly(options: dict) -> None:
    detector, embeddings = fitted(**options)
    state = detector.state_dict()
    assert state["layer_channels"].dtype == torch.int64 and state["architecture"].dtype == torch.int64
    restored = ViTAD(ViTADConfig.model_validate({**TINY, "epochs": 2, **options}))
    restored.load_state_dict({key: value.clone() for key, value in state.items()})
    first, second = detector.predict(embeddings), restored.predict(embeddings)
    assert torch.equal(first.maps, second.maps) and torch.equal(first.scores, second.scores)
    assert restored.layout == detector.layout


def test_an_image_scores_the_same_alone_or_in_a_batch() -> None:
    detector, embeddings = fitted()
    assert detector.network is not None
    detector.network.train()  # predict must switch to eval itself
    together = detector.predict(embeddings)
    for index in (0, 4):
        alone = detector.predict(embeddings[index : index + 1])
        assert torch.equal(alone.maps[0], together.maps[index])
        assert torch.equal(alone.scores[0], together.scores[index])


def test_chunked_attention_matches_full_attention() -> None:
    detector, embeddings = fitted()
    chunked = ViTAD(detector.config.model_copy(update={"attention_chunk": 5}))
    chunked.load_state_dict(detector.state_dict())
    torch.testing.assert_close(chunked.predict(embeddings).maps, detector.predict(embeddings).maps)


def test_position_embeddings_follow_the_grid() -> None:
    small, large = sincos_position_embedding(6, 6, 8), sincos_position_embedding(5, 9, 8)
    assert large.shape == (45, 8)
    # absolute positions: a token keeps its embedding when the grid changes
    assert torch.equal(small.view(6, 6, 8)[:5, :6], large.view(5, 9, 8)[:, :6])
    assert len(torch.unique(large, dim=0)) == 45
    assert sincos_position_embedding(2, 2, 10)[:, 8:].abs().max() == 0  # padding beyond 4k channels
    detector, _ = fitted()  # trained on 6 x 6 grids
    output = detector.predict(torch.randn(2, CHANNELS, 5, 9))
    assert output.maps.shape == (2, 5, 9) and torch.isfinite(output.maps).all()


def test_user_mistakes_raise_hrad_errors() -> None:
    with pytest.raises(NotFittedError, match="not been fitted"):
        ViTAD(ViTADConfig()).predict(torch.randn(1, CHANNELS, 4, 4))
    with pytest.raises(ConfigError, match="equal layers"):
        ViTAD(ViTADConfig(epochs=1, **TINY)).fit([torch.randn(1, 30, 4, 4)])
    with pytest.raises(ConfigError, match="sum to 24"):
        ViTAD(ViTADConfig(epochs=1, level_channels=(8, 8, 8), **TINY)).fit([torch.randn(1, CHANNELS, 4, 4)])
    with pytest.raises(ConfigError, match="divisible"):
        ViTAD(ViTADConfig(epochs=1, decoder_depth=3, heads=3)).fit([torch.randn(1, CHANNELS, 4, 4)])
    with pytest.raises(ConfigError, match="distinct outputs"):
        ViTAD(ViTADConfig(epochs=1, decoder_depth=2, heads=2)).fit([torch.randn(1, CHANNELS, 4, 4)])
    with pytest.raises(InputError, match="no embedding batches"):
        ViTAD(ViTADConfig(epochs=1, **TINY)).fit([])
    detector, _ = fitted(epochs=1)
    with pytest.raises(InputError, match="32-channel"):
        detector.predict(torch.randn(1, 24, 4, 4))
    with pytest.raises(InputError, match="B x C x h x w"):
        detector.predict(torch.randn(CHANNELS, 4, 4))
    state = detector.state_dict()
    with pytest.raises(ArtifactError, match="lacks layer_channels"):
        ViTAD(detector.config).load_state_dict({k: v for k, v in state.items() if k != "layer_channels"})
    with pytest.raises(ArtifactError, match="does not match"):
        broken = dict(state)
        broken["net.fuser.weight"] = torch.zeros(3, 3)
        ViTAD(detector.config).load_state_dict(broken)
    with pytest.raises(ArtifactError, match="does not match"):
        ViTAD(detector.config).load_state_dict({k: v for k, v in state.items() if k != "net.fuser.bias"})
    with pytest.raises(ArtifactError, match="trained with"):
        ViTAD(detector.config.model_copy(update={"decoder_depth": 6})).load_state_dict(state)
    with pytest.raises(ArtifactError, match="trained with"):
        ViTAD(detector.config.model_copy(update={"heads": 4})).load_state_dict(state)
    with pytest.raises(ArtifactError, match="does not fit the config"):
        ViTAD(detector.config.model_copy(update={"fuser_input": "levels"})).load_state_dict(state)
