"""FastFlow detector: exact flow maths, training, localisation, state, errors and level layout."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hrad.detectors.fastflow import CouplingFlow, FastFlow, FastFlowConfig
from hrad.errors import ArtifactError, ConfigError, InputError, NotFittedError
from hrad.features import BackboneConfig, Embedder, build_backbone

CHANNELS, HEIGHT, WIDTH = 8, 6, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def structured(count: int, mixing: Tensor, generator: torch.Generator) -> Tensor:
    """Normal embeddings: every token lies near a 2D subspace of the channels (rank-2 mixing)."""
    latent = torch.randn(count, mixing.shape[1], HEIGHT, WIDTH, generator=generator)
    noise = 0.05 * torch.randn(count, mixing.shape[0], HEIGHT, WIDTH, generator=generator)
    return torch.einsum("cd,ndhw->nchw", mixing, latent) + noise


@pytest.fixture(scope="module")
def trained() -> tuple[FastFlow, Tensor, Tensor]:
    """A FastFlow fitted on structured normal embeddings (two levels of 4 channels); shared by
    the training, localisation and state tests to keep the file fast. A larger lr than anomalib's
    1e-3 because the test trains for 120 steps only."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(CHANNELS, 2, generator=generator)
    batches = [structured(4, mixing, generator) for _ in range(6)]
    detector = FastFlow(FastFlowConfig(epochs=20, lr=1e-2, level_channels=(4, 4)))
    detector.fit(batches)
    return detector, mixing, structured(3, mixing, generator)


@pytest.mark.parametrize(("channels", "conv3x3_only", "global_affine"), [(4, False, True), (5, True, False)])
def test_flow_is_invertible_and_its_log_det_is_exact(
    channels: int, conv3x3_only: bool, global_affine: bool
) -> None:
    config = FastFlowConfig(flow_steps=4, conv3x3_only=conv3x3_only, global_affine=global_affine)
    flow = CouplingFlow(channels, config, torch.Generator().manual_seed(3)).double()
    kernels = [conv.kernel_size[0] for conv in flow.modules() if isinstance(conv, nn.Conv2d)][::2]
    assert kernels == ([3, 3, 3, 3] if conv3x3_only else [3, 1, 3, 1])
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # move away from the near-identity initialisation so every term matters
        for parameter in flow.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    inputs = torch.randn(2, channels, 2, 2, generator=generator, dtype=torch.float64)
    latents, log_dets = flow(inputs)
    assert log_dets.shape == (2,) and log_dets.abs().min() > 0.1
    torch.testing.assert_close(flow.inverse(latents), inputs, rtol=0, atol=1e-12)
    for index in range(2):

        def transform(flat: Tensor) -> Tensor:
            return flow(flat.view(1, channels, 2, 2))[0].flatten()

        jacobian = torch.autograd.functional.jacobian(transform, inputs[index].flatten())
        brute_force = torch.linalg.slogdet(jacobian).logabsdet
        torch.testing.assert_close(log_dets[index], brute_force, rtol=0, atol=1e-10)


def test_training_reduces_the_loss(trained: tuple[FastFlow, Tensor, Tensor]) -> None:
    detector, _, _ = trained
    history = detector.loss_history
    assert len(history) == 20
    # per-element NLL of standardised data under an identity flow is ~0.5; learning the
    # rank-2 structure must push it far below that
    assert history[0] > 0.4 and history[-1] < history[0] - 0.5


def test_out_of_distribution_token_scores_highest(trained: tuple[FastFlow, Tensor, Tensor]) -> None:
    detector, mixing, test = trained
    # a token off the normal subspace with a typical norm: only the learned correlations flag it
    basis, _ = torch.linalg.qr(mixing, mode="complete")
    off_subspace = basis[:, 2:] @ torch.randn(CHANNELS - 2, generator=torch.Generator().manual_seed(5))
    test = test.clone()
    test[1, :, 2, 3] = off_subspace / off_subspace.norm() * test[1, :, 2, 3].norm()
    output = detector.predict(test)
    assert output.maps.shape == (3, HEIGHT, WIDTH) and output.scores.shape == (3,)
    assert divmod(int(output.maps[1].argmax()), WIDTH) == (2, 3)
    assert output.scores[1] > output.scores[[0, 2]].max()
    assert float(output.maps.max()) <= 0  # anomalib's map: -exp(-0.5 mean z^2) in [-1, 0]
    for index in range(3):  # an image's output does not depend on the rest of the batch
        alone = detector.predict(test[index : index + 1])
        torch.testing.assert_close(alone.maps[0], output.maps[index], rtol=0, atol=1e-6)


def test_nll_map_keeps_the_order_and_separates_saturated_tokens(trained: tuple[FastFlow, Tensor, Tensor]) -> None:
    detector, _, test = trained
    test = test.clone()
    test[0, :, 1, 1] *= 1e3  # far out: the probability map saturates at 0 here
    test[0, :, 1, 2] *= 1e4
    probability = detector.predict(test).maps
    nll = FastFlow(detector.config.model_copy(update={"anomaly_map": "nll"}))
    nll.load_state_dict(detector.state_dict())
    energy = nll.predict(test).maps
    assert float(probability[0, 1, 1]) == float(probability[0, 1, 2]) == 0.0
    assert float(energy[0, 1, 2]) > float(energy[0, 1, 1]) > 0
    assert int(energy[0].argmax()) == int(test[0].norm(dim=0).argmax())  # the farthest token wins


def test_state_round_trip_restores_predictions_exactly(trained: tuple[FastFlow, Tensor, Tensor]) -> None:
    detector, _, test = trained
    state = detector.state_dict()
    assert state["layer_channels"].tolist() == [4, 4]
    assert sum(key.endswith(".permutation") for key in state) == 2 * 8
    restored = FastFlow(FastFlowConfig(level_channels=(4, 4)))
    restored.load_state_dict({key: value.clone() for key, value in state.items()})
    first, second = detector.predict(test), restored.predict(test)
    assert torch.equal(first.maps, second.maps) and torch.equal(first.scores, second.scores)
    # the config alone (level_channels empty) rebuilds the model from the state too
    unbound = FastFlow(FastFlowConfig(image_score="top_mean", top_fraction=0.1))
    unbound.load_state_dict(state)
    assert torch.equal(unbound.predict(test).maps, first.maps)


def test_user_mistakes_raise_hrad_errors(trained: tuple[FastFlow, Tensor, Tensor]) -> None:
    with pytest.raises(NotFittedError, match="not been fitted"):
        FastFlow(FastFlowConfig()).predict(torch.randn(1, 8, 4, 4))
    with pytest.raises(ConfigError, match=r"sum to 6, but the embedding has 8 channels"):
        FastFlow(FastFlowConfig(epochs=1, level_channels=(3, 3))).fit([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ConfigError, match="at least 2 channels"):
        FastFlow(FastFlowConfig(epochs=1, level_channels=(1, 7))).fit([torch.randn(1, 8, 4, 4)])
    with pytest.raises(InputError, match="no embedding batches"):
        FastFlow(FastFlowConfig(epochs=1)).fit([])
    with pytest.raises(InputError, match="B x C x h x w"):
        FastFlow(FastFlowConfig(epochs=1)).fit([torch.randn(8, 4, 4)])
    detector, _, _ = trained
    with pytest.raises(InputError, match="8-channel"):
        detector.predict(torch.randn(1, 6, 4, 4))

    state = detector.state_dict()
    corruptions: list[tuple[dict[str, Tensor], FastFlowConfig, str]] = [
        ({k: v for k, v in state.items() if k != "layer_channels"}, FastFlowConfig(), "lacks layer_channels"),
        (state, FastFlowConfig(level_channels=(2, 6)), "level_channels"),
        (state, FastFlowConfig(flow_steps=4), "does not match"),
        (state, FastFlowConfig(hidden_ratio=2.0), "does not match"),
        (state, FastFlowConfig(clamp=3.0), "clamp"),
        (
            {**state, "levels.0.flow.steps.0.subnet.0.weight": torch.zeros(1)},
            FastFlowConfig(),
            "does not match",
        ),
        (
            {**state, "levels.1.flow.steps.3.permutation": torch.zeros(4, dtype=torch.int64)},
            FastFlowConfig(),
            "permutation",
        ),
        (
            {**state, "levels.0.std": torch.zeros(1, 4, 1, 1)},
            FastFlowConfig(),
            "^fastflow state entry levels.0.std has non-positive standard deviations$",
        ),
    ]
    for corrupt, config, message in corruptions:
        fresh = FastFlow(config)
        with pytest.raises(ArtifactError, match=message):
            fresh.load_state_dict(corrupt)
        with pytest.raises(NotFittedError, match="not been fitted"):  # nothing half-loaded stays behind
            fresh.predict(torch.randn(1, 8, 4, 4))


def test_default_embedding_and_bind_layout_give_one_flow_per_layer() -> None:
    vit = build_backbone(BackboneConfig(name="tiny-vit"))
    assert FastFlow.default_embedding(vit).layers == ("block3", "block4")
    cnn = build_backbone(BackboneConfig(name="tiny-cnn"))
    spec = FastFlow.default_embedding(cnn)
    assert spec.layers == ("layer2", "layer3") and spec.aggregation == 1
    embedder = Embedder(cnn, spec)

    config = FastFlow.bind_layout(FastFlowConfig(epochs=1), embedder.layer_channels)
    assert config.level_channels == (16, 32)
    assert FastFlow.bind_layout(FastFlowConfig(level_channels=(24, 24)), (16, 32)).level_channels == (24, 24)
    assert FastFlow.bind_layout(FastFlowConfig(), ()).level_channels == ()

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    embeddings = embedder(images)
    detector = FastFlow(config)
    detector.fit([embeddings])
    assert detector.network is not None and len(detector.network) == 2
    state = detector.state_dict()
    assert state["layer_channels"].tolist() == [16, 32]
    assert [state[f"levels.{index}.mean"].shape[1] for index in range(2)] == [16, 32]
    assert detector.predict(embeddings).maps.shape == (2, 8, 8)

    single = FastFlow(FastFlowConfig(epochs=1))  # no layout bound: one level over all channels
    single.fit([embeddings])
    assert single.network is not None and len(single.network) == 1
    assert single.state_dict()["layer_channels"].tolist() == [48]
