"""RD++ detector: embedding defaults, layout, training, localisation, state, batch independence,
feature noise and the Sinkhorn / SSOT solver."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from hrad.detectors.rdpp import RDPlusPlus, RDPlusPlusConfig
from hrad.detectors.rdpp.loss import (
    entropic_ot,
    noise_features,
    sinkhorn_divergence,
    smooth_noise,
    squared_cost,
)
from hrad.detectors.rdpp.network import pyramid_sizes
from hrad.errors import ArtifactError, ConfigError, InputError, NotFittedError
from hrad.features import BackboneConfig, build_backbone

#: tiny layout: an 8-channel and a 16-channel teacher level on an 8 x 8 grid
LEVELS = (8, 16)
CHANNELS = sum(LEVELS)
SIDE = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def structured_embeddings(count: int, generator: torch.Generator, mixing: Tensor) -> Tensor:
    """Normal class: every channel mixes four fixed smooth spatial patterns with per-image gains."""
    axis = torch.linspace(0, 1, SIDE)
    rows, columns = torch.meshgrid(axis, axis, indexing="ij")
    patterns = torch.stack(
        [torch.sin(3 * columns), torch.cos(3 * rows), torch.sin(2 * (rows + columns)), torch.ones_like(rows)]
    )
    gains = 1 + 0.2 * torch.randn(count, 4, 1, 1, generator=generator)
    clean = torch.einsum("ck,nkhw->nchw", mixing, gains * patterns)
    return clean + 0.05 * torch.randn(count, CHANNELS, SIDE, SIDE, generator=generator)


@pytest.fixture(scope="module")
def trained() -> tuple[RDPlusPlus, Tensor]:
    """One fitted detector shared by the tests that only read it, and held-out normal embeddings."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(CHANNELS, 4, generator=generator)
    train = [structured_embeddings(4, generator, mixing) for _ in range(2)]
    detector = RDPlusPlus(RDPlusPlusConfig(epochs=30, level_channels=LEVELS))
    detector.fit(train)
    return detector, structured_embeddings(4, generator, mixing)


def test_default_embedding_and_layout() -> None:
    cnn = RDPlusPlus.default_embedding(build_backbone(BackboneConfig(name="tiny-cnn")))
    assert cnn.layers == ("layer2", "layer3") and cnn.aggregation == 1
    vit = RDPlusPlus.default_embedding(build_backbone(BackboneConfig(name="tiny-vit")))
    assert vit.layers == ("block2", "block3") and vit.aggregation == 1
    bound = RDPlusPlus.bind_layout(RDPlusPlusConfig(), (16, 32))
    assert bound.level_channels == (16, 32)
    explicit = RDPlusPlusConfig(level_channels=(48,))
    assert RDPlusPlus.bind_layout(explicit, (16, 32)).level_channels == (48,)
    assert pyramid_sizes(7, 9, 3) == [(7, 9), (4, 5), (2, 3)]


def test_training_reduces_the_loss(trained: tuple[RDPlusPlus, Tensor]) -> None:
    detector, _ = trained
    assert len(detector.loss_history) == 30
    assert detector.loss_history[-1] < 0.25 * detector.loss_history[0]
    distill = [terms["distill"] for terms in detector.term_history]
    assert distill[-1] < 0.25 * distill[0]
    assert set(detector.term_history[0]) == {"distill", "ssot", "noise_reconstruction", "noise_contrast"}


def test_out_of_distribution_token_scores_highest(trained: tuple[RDPlusPlus, Tensor]) -> None:
    detector, normal = trained
    test = normal.clone()
    test[3, :, 2, 5] = 3 * torch.randn(CHANNELS, generator=torch.Generator().manual_seed(5))
    output = detector.predict(test)
    assert output.maps.shape == (4, SIDE, SIDE) and output.scores.shape == (4,)
    assert divmod(int(output.maps[3].argmax()), SIDE) == (2, 5)
    assert output.scores[3] > output.scores[:3].max()
    assert torch.equal(output.scores, output.maps.flatten(1).max(dim=1).values)


def test_state_round_trip_restores_predictions_exactly(trained: tuple[RDPlusPlus, Tensor]) -> None:
    detector, normal = trained
    state = detector.state_dict()
    assert state["layer_channels"].dtype == torch.int64 and state["layer_channels"].tolist() == list(LEVELS)
    assert any(key.endswith("running_mean") for key in state)  # BatchNorm statistics travel too
    restored = RDPlusPlus(RDPlusPlusConfig(level_channels=LEVELS))
    restored.load_state_dict({key: value.clone() for key, value in state.items()})
    first, second = detector.predict(normal), restored.predict(normal)
    assert torch.equal(first.maps, second.maps) and torch.equal(first.scores, second.scores)
    unbound = RDPlusPlus(RDPlusPlusConfig())  # level_channels come from the state
    unbound.load_state_dict(state)
    assert torch.equal(unbound.predict(normal).maps, first.maps)


def test_an_image_scores_the_same_alone_or_in_a_batch(trained: tuple[RDPlusPlus, Tensor]) -> None:
    """BatchNorm runs on its fitted statistics: very different batch mates change nothing.

    Equality is up to float rounding: oneDNN convolutions block batches differently (exact
    with ``torch.backends.mkldnn`` off)."""
    detector, normal = trained
    strangers = 10 * torch.randn(3, CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(3)) + 5
    alone = detector.predict(normal[:1])
    together = detector.predict(torch.cat([normal[:1], strangers]))
    torch.testing.assert_close(alone.maps[0], together.maps[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone.scores[0], together.scores[0], rtol=0, atol=1e-5)
    assert not detector.network.training  # type: ignore[union-attr]


def test_odd_grids_and_switched_off_terms() -> None:
    """Odd grids round-trip through the pyramid; a zero weight removes its loss term."""
    config = RDPlusPlusConfig(
        epochs=1, level_channels=(4, 4, 4), ssot_weight=0, noise_contrast_weight=0, distill_loss="flattened"
    )
    detector = RDPlusPlus(config)
    detector.fit([torch.randn(2, 12, 7, 9, generator=torch.Generator().manual_seed(1))])
    assert set(detector.term_history[0]) == {"distill", "noise_reconstruction"}
    assert detector.predict(torch.randn(3, 12, 7, 9)).maps.shape == (3, 7, 9)
    plain = RDPlusPlus(RDPlusPlusConfig(epochs=1, projection_weight=0))  # plain RD (+ projection layer)
    plain.fit([torch.randn(2, 12, 6, 6)])
    assert set(plain.term_history[0]) == {"distill"}


def test_user_mistakes_raise_hrad_errors(trained: tuple[RDPlusPlus, Tensor]) -> None:
    with pytest.raises(NotFittedError, match="not been fitted"):
        RDPlusPlus(RDPlusPlusConfig()).predict(torch.randn(1, CHANNELS, 4, 4))
    with pytest.raises(ConfigError, match=r"sum to 20, but the embedding has 24 channels"):
        RDPlusPlus(RDPlusPlusConfig(epochs=1, level_channels=(8, 12))).fit([torch.randn(2, 24, 8, 8)])
    with pytest.raises(ConfigError, match="positive"):
        RDPlusPlus(RDPlusPlusConfig(epochs=1, level_channels=(0, 24))).fit([torch.randn(2, 24, 8, 8)])
    with pytest.raises(ConfigError, match=r"^rdpp noise_extent \(0.5, 0.1\) must satisfy 0 < low <= high <= 1$"):
        RDPlusPlusConfig(noise_extent=(0.5, 0.1))
    with pytest.raises(InputError, match="no embedding batches"):
        RDPlusPlus(RDPlusPlusConfig(epochs=1)).fit([])
    with pytest.raises(InputError, match="B x C x h x w"):
        RDPlusPlus(RDPlusPlusConfig(epochs=1)).fit([torch.randn(24, 8, 8)])
    with pytest.raises(InputError, match="1x1"):
        RDPlusPlus(RDPlusPlusConfig(epochs=1, level_channels=(8, 16))).fit([torch.randn(2, 24, 3, 3)])
    detector, _ = trained
    with pytest.raises(InputError, match="24-channel"):
        detector.predict(torch.randn(1, 20, SIDE, SIDE))

    state = detector.state_dict()
    corruptions: list[tuple[dict[str, Tensor], RDPlusPlusConfig, str]] = [
        (
            {k: v for k, v in state.items() if k != "layer_channels"},
            RDPlusPlusConfig(),
            "lacks layer_channels",
        ),
        ({**state, "layer_channels": torch.tensor([0, 24])}, RDPlusPlusConfig(), "invalid layer_channels"),
        (state, RDPlusPlusConfig(level_channels=(12, 12)), "level_channels"),
        (state, RDPlusPlusConfig(bottleneck_channels=32), "does not match"),
        (state, RDPlusPlusConfig(decoder_blocks=3), "does not match"),
        ({**state, "net.decoder.heads.0.weight": torch.zeros(1)}, RDPlusPlusConfig(), "does not match"),
    ]
    for corrupt, config, message in corruptions:
        with pytest.raises(ArtifactError, match=message):
            RDPlusPlus(config).load_state_dict(corrupt)


def test_feature_noise_is_seeded_smooth_and_scaled() -> None:
    shape = (2, 64, 24, 24)
    first = smooth_noise(shape, 2.0, torch.Generator().manual_seed(7))
    assert torch.equal(first, smooth_noise(shape, 2.0, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, smooth_noise(shape, 2.0, torch.Generator().manual_seed(8)))
    # unit variance everywhere, borders included (the field is blurred from a padded grid)
    assert abs(float(first.std()) - 1) < 0.05
    assert abs(float(first[..., 0, :].std()) - 1) < 0.1
    # neighbours of Gaussian-blurred white noise correlate by exp(-1 / (4 sigma^2)) = 0.94
    neighbour = float((first[..., :, 1:] * first[..., :, :-1]).mean())
    assert abs(neighbour - math.exp(-1 / 16)) < 0.05
    white = smooth_noise(shape, 0.0, torch.Generator().manual_seed(7))
    assert abs(float((white[..., :, 1:] * white[..., :, :-1]).mean())) < 0.02

    # added noise: amplitude x each channel's std, inside one box per sample
    scales = torch.linspace(0.5, 4, 32)[None, :, None, None]
    features = scales * torch.randn(4, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    noisy = noise_features(features, 0.5, 1.5, (1.0, 1.0), torch.Generator().manual_seed(2))
    ratio = (noisy - features).std(dim=(0, 2, 3)) / features.std(dim=(0, 2, 3), unbiased=False)
    assert abs(float(ratio.mean()) - 0.5) < 0.03
    again = noise_features(features, 0.5, 1.5, (1.0, 1.0), torch.Generator().manual_seed(2))
    assert torch.equal(noisy, again)
    boxed = noise_features(features, 0.5, 1.5, (0.25, 0.25), torch.Generator().manual_seed(2)) - features
    touched = boxed.abs().sum(dim=1) > 0  # B x h x w
    assert touched.sum(dim=(1, 2)).tolist() == [16] * 4  # a 4 x 4 box per sample


def test_sinkhorn_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    # 2 x 2: the entropic plan is [[t, 1/2 - t], [1/2 - t, t]] with t / (1/2 - t) = exp(-D / 2 eps)
    x = torch.randn(1, 2, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(1, 2, 3, generator=generator, dtype=torch.float64)
    blur = 0.5
    epsilon = blur**2
    cost = squared_cost(x, y)[0]
    assert torch.allclose(cost, torch.cdist(x, y)[0] ** 2 / 2)
    ratio = math.exp(-float(cost[0, 0] + cost[1, 1] - cost[0, 1] - cost[1, 0]) / (2 * epsilon))
    t = 0.5 * ratio / (1 + ratio)
    plan = torch.tensor([[t, 0.5 - t], [0.5 - t, t]], dtype=torch.float64)
    # <P, C> + eps KL(P | a x b)
    value = (plan * cost).sum() + epsilon * (plan * torch.log(plan / 0.25)).sum()
    solved_value, solved_plan = entropic_ot(x, y, blur=blur, final_iterations=200)
    assert abs(float(solved_value[0]) - float(value)) < 1e-9
    assert torch.allclose(solved_plan[0], plan, atol=1e-9)

    # 5 x 5 at a small blur: the cost of the best of all 120 assignments, within eps log n
    n = 5
    x = torch.randn(1, n, 2, generator=generator, dtype=torch.float64)
    y = torch.randn(1, n, 2, generator=generator, dtype=torch.float64)
    cost = squared_cost(x, y)[0]
    best = min(itertools.permutations(range(n)), key=lambda order: float(cost[range(n), list(order)].sum()))
    best_value = float(cost[range(n), list(best)].mean())
    blur = 0.01
    solved_value, solved_plan = entropic_ot(x, y, blur=blur, final_iterations=500)
    assert best_value <= float(solved_value[0]) <= best_value + blur**2 * math.log(n) + 1e-9
    torch.testing.assert_close(
        solved_plan[0].sum(1), torch.full((n,), 1 / n, dtype=torch.float64), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(
        solved_plan[0].sum(0), torch.full((n,), 1 / n, dtype=torch.float64), rtol=0, atol=1e-9
    )
    assert solved_plan[0].argmax(dim=1).tolist() == list(best)


def test_sinkhorn_divergence_gradient_and_equal_measures() -> None:
    """Envelope-theorem gradients match finite differences; a permuted copy of a cloud is the
    same measure, so its divergence is zero (why the reference's batch-level SSOT is inert)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 2, generator=generator, dtype=torch.float64)

    def divergence(points: Tensor) -> Tensor:
        return sinkhorn_divergence(points, y, blur=0.3, final_iterations=300).sum()

    assert torch.autograd.gradcheck(divergence, (x,), eps=1e-6, atol=1e-6)
    with torch.no_grad():
        shuffled = x[:, torch.randperm(4, generator=generator)]
        # zero up to the solver's convergence (near-duplicate points converge slowly)
        assert sinkhorn_divergence(x, shuffled, blur=0.3, final_iterations=300).abs().max() < 1e-5
        assert (sinkhorn_divergence(x, y, blur=0.3, final_iterations=300) > 0.01).all()
