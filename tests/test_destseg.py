"""DeSTSeg detector: feature-space anomaly synthesis, focal loss, training, localisation, state,
batch independence, errors and level layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from hrad.detectors.destseg import DeSTSeg, DeSTSegConfig
from hrad.detectors.synthetic import focal_loss, synthesise_anomalies
from hrad.errors import ArtifactError, ConfigError, InputError, NotFittedError
from hrad.features import BackboneConfig, Embedder, build_backbone

CHANNELS, HEIGHT, WIDTH = 8, 8, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def structured(count: int, mixing: Tensor, generator: torch.Generator) -> Tensor:
    """Normal embeddings: every token lies near a 2D subspace of the channels (rank-2 mixing)."""
    latent = torch.randn(count, mixing.shape[1], HEIGHT, WIDTH, generator=generator)
    noise = 0.05 * torch.randn(count, mixing.shape[0], HEIGHT, WIDTH, generator=generator)
    return torch.einsum("cd,ndhw->nchw", mixing, latent) + noise


def small_config(**changes: object) -> DeSTSegConfig:
    """Narrow networks and dilations that fit an 8 x 8 grid; larger lr for the few steps."""
    options: dict[str, object] = {
        "level_channels": (4, 4),
        "student_channels": 16,
        "segmentation_channels": 16,
        "aspp_rates": (1, 2),
        "student_lr": 1e-2,
        "segmentation_lr": 1e-2,
        "anomaly_fraction": (0.05, 0.2),
        **changes,
    }
    return DeSTSegConfig.model_validate(options)


@pytest.fixture(scope="module")
def trained() -> tuple[DeSTSeg, Tensor, Tensor]:
    """A DeSTSeg fitted on structured normal embeddings (two levels of 4 channels), shared by the
    training and localisation tests. The tokens are independent across positions, which a
    spatial bottleneck cannot reconstruct, so this student has no stride-2 stage (the encoder-
    decoder is exercised by :func:`deep`)."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(CHANNELS, 2, generator=generator)
    batches = [structured(4, mixing, generator) for _ in range(6)]
    detector = DeSTSeg(small_config(student_stages=0, student_epochs=20, segmentation_epochs=20))
    detector.fit(batches)
    return detector, mixing, structured(3, mixing, generator)


@pytest.fixture(scope="module")
def deep() -> tuple[DeSTSeg, Tensor]:
    """A quickly fitted DeSTSeg with two stride-2 stages on an odd 7 x 5 grid (resizing round trip)."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, CHANNELS, 7, 5, generator=generator) for _ in range(2)]
    detector = DeSTSeg(small_config(student_stages=2, student_epochs=2, segmentation_epochs=2))
    detector.fit(batches)
    return detector, torch.randn(4, CHANNELS, 7, 5, generator=generator)


def discordant_pairs(mask: Tensor) -> int:
    """Horizontally or vertically adjacent positions with different mask values (boundary length)."""
    return int((mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum())


def test_feature_space_anomalies_are_seeded_smooth_and_local() -> None:
    features = torch.randn(16, 6, 12, 12, generator=torch.Generator().manual_seed(2))
    low, high = 0.05, 0.3

    def synthesise(seed: int) -> tuple[Tensor, Tensor]:
        return synthesise_anomalies(features, torch.Generator().manual_seed(seed), (low, high), 0.25)

    corrupted, masks = synthesise(0)
    again, again_masks = synthesise(0)
    other, other_masks = synthesise(1)
    assert torch.equal(corrupted, again) and torch.equal(masks, again_masks)
    assert not torch.equal(masks, other_masks) and not torch.equal(corrupted, other)
    assert masks.shape == (16, 12, 12) and set(masks.unique().tolist()) <= {0.0, 1.0}

    inside = masks.unsqueeze(1).expand_as(features) > 0
    assert torch.equal(corrupted[~inside], features[~inside])  # untouched outside, bit for bit
    assert bool((corrupted[inside] != features[inside]).all())

    coverage = masks.mean(dim=(1, 2))
    clean = coverage == 0
    assert 1 <= int(clean.sum()) <= 8  # some samples stay clean, most are corrupted
    positions = 12 * 12
    assert bool((coverage[~clean] >= low - 1 / positions).all())
    assert bool((coverage[~clean] <= high + 1 / positions).all())
    assert float(coverage[~clean].std()) > 0.03  # a random fraction per sample

    # smooth blobs: far shorter boundaries than random masks of the same coverage would have
    pairs = 2 * 12 * 11
    ratios = []
    for mask, fraction in zip(masks[~clean], coverage[~clean].tolist(), strict=True):
        ratios.append(discordant_pairs(mask) / (pairs * 2 * fraction * (1 - fraction)))
    assert max(ratios) < 0.75 and sum(ratios) / len(ratios) < 0.55

    # a single sample borrows its own flipped / rolled features
    single, single_mask = synthesise_anomalies(
        features[:1], torch.Generator().manual_seed(3), (0.2, 0.2), 0.0
    )
    assert single_mask.sum() == round(0.2 * positions)
    assert not torch.equal(single, features[:1])


def test_focal_loss_matches_a_brute_force_computation() -> None:
    logits = torch.tensor([[-3.0, -0.5, 0.0], [0.7, 2.5, -1.2]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    for gamma in (0.0, 2.0, 4.0):
        total = 0.0
        for logit, target in zip(logits.flatten().tolist(), targets.flatten().tolist(), strict=True):
            probability = 1 / (1 + math.exp(-logit))
            p_t = probability if target == 1 else 1 - probability
            total += -((1 - p_t) ** gamma) * math.log(p_t)
        expected = total / logits.numel()
        assert float(focal_loss(logits, targets, gamma)) == pytest.approx(expected, rel=1e-12)
        # the reference's form: binary cross-entropy on probabilities
        probabilities = torch.sigmoid(logits)
        p_t_tensor = probabilities * targets + (1 - probabilities) * (1 - targets)
        reference = (
            F.binary_cross_entropy(probabilities, targets, reduction="none") * (1 - p_t_tensor) ** gamma
        ).mean()
        assert float(focal_loss(logits, targets, gamma)) == pytest.approx(float(reference), rel=1e-9)


def test_training_reduces_both_losses(trained: tuple[DeSTSeg, Tensor, Tensor]) -> None:
    detector, _, _ = trained
    student, segmentation = detector.student_loss_history, detector.segmentation_loss_history
    assert len(student) == 20 and len(segmentation) == 20
    assert detector.loss_history == student + segmentation
    assert student[-1] < 0.5 * student[0]
    assert segmentation[-1] < 0.6 * segmentation[0]


def test_out_of_distribution_token_gets_the_highest_map_value(
    trained: tuple[DeSTSeg, Tensor, Tensor],
) -> None:
    detector, mixing, test = trained
    # a token off the normal subspace with a typical norm: only the learned structure flags it
    basis, _ = torch.linalg.qr(mixing, mode="complete")
    off_subspace = basis[:, 2:] @ torch.randn(CHANNELS - 2, generator=torch.Generator().manual_seed(5))
    test = test.clone()
    test[1, :, 2, 3] = off_subspace / off_subspace.norm() * test[1, :, 2, 3].norm()
    output = detector.predict(test)
    assert output.maps.shape == (3, HEIGHT, WIDTH) and output.scores.shape == (3,)
    assert float(output.maps.min()) >= 0 and float(output.maps.max()) <= 1  # sigmoid output
    assert int(output.maps.flatten().argmax()) == (1 * HEIGHT + 2) * WIDTH + 3  # highest of the batch
    assert output.scores[1] > output.scores[[0, 2]].max()
    # image score: mean of the top 1 % of the 64 tokens = the maximum here
    torch.testing.assert_close(output.scores, output.maps.flatten(1).max(dim=1).values, rtol=0, atol=0)

    student_map = DeSTSeg(detector.config.model_copy(update={"anomaly_map": "student"}))
    student_map.load_state_dict(detector.state_dict())
    maps = student_map.predict(test).maps
    assert int(maps.flatten().argmax()) == (1 * HEIGHT + 2) * WIDTH + 3
    assert float(maps.min()) >= 0 and float(maps.max()) <= 2 * 2  # two levels of 1 - cos


def test_state_round_trip_restores_predictions_exactly(deep: tuple[DeSTSeg, Tensor]) -> None:
    detector, test = deep
    state = detector.state_dict()
    assert state["layer_channels"].dtype == torch.int64 and state["layer_channels"].tolist() == [4, 4]
    assert state["aspp_rates"].tolist() == [1, 2]
    restored_state = load_safetensors(save_safetensors(state))  # what an artifact holds
    # the config alone (level_channels empty) rebuilds the model from the state
    config = detector.config.model_copy(update={"level_channels": ()})
    for anomaly_map in ("segmentation", "student"):
        original = DeSTSeg(config.model_copy(update={"anomaly_map": anomaly_map}))
        original.load_state_dict(state)
        restored = DeSTSeg(config.model_copy(update={"anomaly_map": anomaly_map}))
        restored.load_state_dict(restored_state)
        first, second = original.predict(test), restored.predict(test)
        assert torch.equal(first.maps, second.maps) and torch.equal(first.scores, second.scores)
        if anomaly_map == "segmentation":
            assert torch.equal(detector.predict(test).maps, second.maps)


def test_prediction_does_not_depend_on_the_rest_of_the_batch(deep: tuple[DeSTSeg, Tensor]) -> None:
    detector, test = deep
    test = test.clone()
    test[2] *= 10  # a very different neighbour in the batch must not change the others
    student_map = DeSTSeg(detector.config.model_copy(update={"anomaly_map": "student", "image_score": "max"}))
    student_map.load_state_dict(detector.state_dict())
    for model in (detector, student_map):
        batched = model.predict(test)
        assert batched.maps.shape == (4, 7, 5)
        for index in range(4):
            alone = model.predict(test[index : index + 1])
            torch.testing.assert_close(alone.maps[0], batched.maps[index], rtol=0, atol=1e-6)
            torch.testing.assert_close(alone.scores[0], batched.scores[index], rtol=0, atol=1e-6)


def test_user_mistakes_raise_hrad_errors(deep: tuple[DeSTSeg, Tensor]) -> None:
    embeddings = torch.randn(2, CHANNELS, 4, 4)
    with pytest.raises(NotFittedError, match="not been fitted"):
        DeSTSeg(DeSTSegConfig()).predict(embeddings)
    with pytest.raises(ConfigError, match=r"sum to 6, but the embedding has 8 channels"):
        DeSTSeg(small_config(level_channels=(3, 3), student_epochs=1)).fit([embeddings])
    with pytest.raises(ConfigError, match="positive"):
        DeSTSeg(small_config(level_channels=(0, 8), student_epochs=1)).fit([embeddings])
    with pytest.raises(ConfigError, match="anomaly_fraction"):
        DeSTSegConfig(anomaly_fraction=(0.3, 0.1))
    with pytest.raises(ConfigError, match="aspp_rates"):
        DeSTSegConfig(aspp_rates=())
    with pytest.raises(ConfigError, match="segmentation_epochs"):
        DeSTSeg(small_config(segmentation_epochs=0)).fit([embeddings])
    with pytest.raises(InputError, match="no embedding batches"):
        DeSTSeg(small_config()).fit([])
    with pytest.raises(InputError, match="B x C x h x w"):
        DeSTSeg(small_config()).fit([torch.randn(8, 4, 4)])
    with pytest.raises(InputError, match="8-channel"):
        DeSTSeg(small_config(level_channels=())).fit([embeddings, torch.randn(2, 6, 4, 4)])
    detector, test = deep
    with pytest.raises(InputError, match="8-channel"):
        detector.predict(torch.randn(1, 6, 4, 4))

    state = detector.state_dict()
    before = detector.predict(test)
    corruptions: list[tuple[dict[str, Tensor], dict[str, object], str]] = [
        ({k: v for k, v in state.items() if k != "layer_channels"}, {}, "lacks layer_channels"),
        ({**state, "layer_channels": torch.tensor([0, 8])}, {}, "invalid layer_channels"),
        (state, {"level_channels": (2, 6)}, "level_channels"),
        (state, {"aspp_rates": (1, 3)}, "aspp_rates"),
        (state, {"student_stages": 1}, "does not match"),
        (state, {"student_channels": 8}, "does not match"),
        (state, {"segmentation_channels": 8}, "does not match"),
        ({**state, "model.student.stem.0.weight": torch.zeros(1)}, {}, "does not match"),
        ({**state, "model.std": torch.zeros(1, CHANNELS, 1, 1)}, {}, "standard deviations"),
    ]
    for corrupt, changes, message in corruptions:
        fresh = DeSTSeg(detector.config.model_copy(update=changes))
        with pytest.raises(ArtifactError, match=message):
            fresh.load_state_dict(corrupt)
        with pytest.raises(NotFittedError, match="not been fitted"):  # nothing half-loaded stays behind
            fresh.predict(test)
        if not changes:  # a fitted detector keeps its model when a load fails
            with pytest.raises(ArtifactError, match=message):
                detector.load_state_dict(corrupt)
            assert torch.equal(detector.predict(test).maps, before.maps)


def test_default_embedding_and_bind_layout_give_one_level_per_layer() -> None:
    vit = build_backbone(BackboneConfig(name="tiny-vit"))
    assert DeSTSeg.default_embedding(vit).layers == ("block1", "block2", "block3")
    cnn = build_backbone(BackboneConfig(name="tiny-cnn"))
    spec = DeSTSeg.default_embedding(cnn)
    assert spec.layers == ("layer1", "layer2", "layer3") and spec.aggregation == 1
    embedder = Embedder(cnn, spec)

    config = DeSTSeg.bind_layout(
        DeSTSegConfig(student_epochs=1, segmentation_epochs=1), embedder.layer_channels
    )
    assert config.level_channels == embedder.layer_channels and len(config.level_channels) == 3
    assert DeSTSeg.bind_layout(DeSTSegConfig(level_channels=(24, 24)), (16, 32)).level_channels == (24, 24)
    assert DeSTSeg.bind_layout(DeSTSegConfig(), ()).level_channels == ()

    embeddings = embedder(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)))
    small = {"student_channels": 8, "segmentation_channels": 8, "aspp_rates": (1,)}
    detector = DeSTSeg(config.model_copy(update=small))
    detector.fit([embeddings])
    assert detector.state_dict()["layer_channels"].tolist() == list(embedder.layer_channels)
    assert detector.predict(embeddings).maps.shape == (2, *embeddings.shape[-2:])

    single = DeSTSeg(DeSTSegConfig.model_validate({"student_epochs": 1, "segmentation_epochs": 1, **small}))
    single.fit([embeddings])
    assert single.state_dict()["layer_channels"].tolist() == [embeddings.shape[1]]  # no layout: one level


def test_a_grid_too_small_for_the_student_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="bottleneck would be one position"):
        DeSTSeg(small_config(student_stages=2, student_epochs=1)).fit([torch.randn(1, CHANNELS, 4, 4)])
