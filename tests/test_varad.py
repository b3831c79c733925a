"""VarAD detector: embedding defaults, M rules, exact causality, training, localisation, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrad.detectors import build_detector, detector_config
from hrad.detectors.varad import VarAD, VarADConfig, default_blocks, reference_steps, scan_orders
from hrad.errors import ConfigError, InputError, NotFittedError
from hrad.features import BackboneConfig, Embedder, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_embedding_spreads_blocks_and_rejects_cnns() -> None:
    assert default_blocks(12) == ("block4", "block8", "block12")
    vit = build_backbone(BackboneConfig(name="tiny-vit"))
    spec = VarAD.default_embedding(vit)
    assert spec.layers == ("block1", "block3", "block4") and spec.aggregation == 1
    with pytest.raises(ConfigError, match="ViT"):
        VarAD.default_embedding(build_backbone(BackboneConfig(name="tiny-cnn")))


def test_prediction_step_rules() -> None:
    assert reference_steps(3, 36 * 36) == [256, 128, 64]
    assert reference_steps(3, 73 * 73) == [256, 128, 64]
    assert reference_steps(3, 6 * 6) == [7, 4, 2]
    detector = VarAD(VarADConfig(step_m=1.5, epochs=1))
    detector.fit([torch.randn(1, 48, 4, 6)])
    # paper rule: m scan lines -> 1.5 rows of 6 tokens (row-major), 1.5 columns of 4 (column-major)
    assert detector.steps == [[9, 6, 9, 6]] * 3
    with pytest.raises(ConfigError, match="no context"):
        VarAD(VarADConfig(steps=(3, 3, 16), epochs=1)).fit([torch.randn(1, 48, 4, 4)])


def test_scan_orders_are_the_four_directions() -> None:
    row, column, row_reversed, column_reversed = scan_orders(2, 3, 4)
    assert row.tolist() == [0, 1, 2, 3, 4, 5]
    assert column.tolist() == [0, 3, 1, 4, 2, 5]
    assert row_reversed.tolist() == [5, 4, 3, 2, 1, 0]
    assert column_reversed.tolist() == [5, 2, 4, 1, 3, 0]


@pytest.mark.parametrize("scan", ["kernel", "chunked", "sequential"])
def test_token_l_only_changes_predictions_from_l_plus_m_on(scan: str) -> None:
    """Exact causality through adapter + BOS + Mamba for the row-major direction."""
    steps = (5, 3, 2)
    detector = VarAD(VarADConfig(directions=1, steps=steps, epochs=1, scan=scan, scan_chunk=4))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 48, 5, 6, generator=generator)
    detector.fit([embeddings])
    base = detector.directional_predictions(embeddings)
    length = 30
    for level, step in enumerate(steps):
        for token in (0, 7, 17, 29):
            perturbed = embeddings.clone()
            perturbed[:, level * 16 : (level + 1) * 16].view(2, 16, length)[:, :, token] += 2.0
            changed = detector.directional_predictions(perturbed)
            before = base[level][:, 0].flatten(2)
            after = changed[level][:, 0].flatten(2)
            assert torch.equal(before[..., : token + step], after[..., : token + step])
            if token + step < length:
                assert (before[..., token + step] - after[..., token + step]).abs().max() > 1e-6
            for other in set(range(3)) - {level}:  # levels are independent
                assert torch.equal(base[other], changed[other])


def test_training_reduces_the_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    pattern = torch.randn(1, 48, 6, 6, generator=generator)
    batches = [pattern + 0.1 * torch.randn(2, 48, 6, 6, generator=generator) for _ in range(2)]
    detector = VarAD(VarADConfig(epochs=8, lr=3e-3))  # few steps: a larger lr than the paper's
    detector.fit(batches)
    assert len(detector.loss_history) == 8
    assert detector.loss_history[-1] < 0.8 * detector.loss_history[0]


def stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    """A regular texture (period two tokens) with pixel noise: the normal class."""
    rows = np.arange(size)[:, None]
    columns = np.arange(size)[None, :]
    pattern = 0.5 + 0.3 * np.sin(2 * np.pi * (rows + columns) / 28)
    image = np.repeat(pattern[..., None], 3, axis=2) + rng.normal(0, 0.02, (size, size, 3))
    return np.clip(image, 0, 1).astype(np.float32)


def test_anomalous_token_scores_highest() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="tiny-vit"))
    embedder = Embedder(backbone, VarAD.default_embedding(backbone))
    rng = np.random.default_rng(0)

    def embed(images: list[np.ndarray]) -> torch.Tensor:
        return embedder(torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2)))

    train = [embed([stripes(112, rng) for _ in range(4)]) for _ in range(2)]
    detector = build_detector(detector_config({"name": "varad", "epochs": 15, "lr": 3e-3}))
    detector.fit(train)
    normal = [stripes(112, rng) for _ in range(3)]
    defect = stripes(112, rng)
    defect[42:56, 70:84] = [0.9, 0.1, 0.1]  # token (3, 5) of the 8 x 8 grid
    output = detector.predict(embed([*normal, defect]))
    assert output.maps.shape == (4, 8, 8)
    assert divmod(int(output.maps[3].argmax()), 8) == (3, 5)
    assert output.scores[3] > output.scores[:3].max()


@pytest.mark.parametrize(
    "options", [{}, {"bos": "repeated", "combine": "normalized_mean", "image_score": "top_mean"}]
)
def test_state_round_trip_restores_predictions_exactly(options: dict) -> None:
    config = VarADConfig(epochs=2, **options)
    embeddings = torch.randn(2, 48, 5, 5, generator=torch.Generator().manual_seed(2))
    detector = VarAD(config)
    detector.fit([embeddings])
    state = detector.state_dict()
    assert state["layer_channels"].tolist() == [16, 16, 16]
    assert any(key.endswith(".bos") for key in state)
    restored = VarAD(config)
    restored.load_state_dict({key: value.clone() for key, value in state.items()})
    first, second = detector.predict(embeddings), restored.predict(embeddings)
    assert torch.equal(first.maps, second.maps) and torch.equal(first.scores, second.scores)
    assert restored.steps == detector.steps


def test_user_mistakes_raise_hrad_errors() -> None:
    with pytest.raises(NotFittedError, match="not been fitted"):
        VarAD(VarADConfig()).predict(torch.randn(1, 48, 4, 4))
    with pytest.raises(ConfigError, match="equal layers"):
        VarAD(VarADConfig(epochs=1)).fit([torch.randn(1, 50, 4, 4)])
    detector = VarAD(VarADConfig(epochs=1))
    detector.fit([torch.randn(1, 48, 4, 4)])
    with pytest.raises(InputError, match="48-channel"):
        detector.predict(torch.randn(1, 32, 4, 4))
