"""RealNet in feature space: residual selection math, AFS bookkeeping, localisation, state round trip."""

from __future__ import annotations

import pytest
import torch

from hrad.detectors import build_detector, detector_config
from hrad.detectors.realnet import RealNet, RealNetConfig, residual_selection
from hrad.errors import ArtifactError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "reconstruction_channels": 16,
    "discriminator_channels": 16,
    "residual_channels": 8,
    "aspp_rates": (1, 2),
}


def smooth_embeddings(count: int, channels: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, channels, size // 2, size // 2, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_residual_selection_keeps_the_best_channels_in_score_order() -> None:
    residuals = torch.zeros(2, 3, 2, 2)
    residuals[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # max 1 + mean 0.25 = 1.25
    residuals[0, 1] = 0.5  # 0.5 + 0.5 = 1.0
    residuals[0, 2] = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # 2 + 0.5 = 2.5
    residuals[1, 1] = 3.0
    kept = residual_selection(residuals, 2)
    assert torch.equal(kept[0], residuals[0, [2, 0]])
    assert torch.equal(kept[1, 0], residuals[1, 1]) and kept.shape == (2, 2, 2, 2)


@pytest.fixture(scope="module")
def fitted() -> tuple[RealNet, torch.Tensor]:
    config = RealNetConfig(
        epochs=15, level_channels=(4, 8), selection_ratio=0.75, reconstruction_stages=0, synthesis="feature", **SMALL
    )
    detector = RealNet(config)
    train = smooth_embeddings(8, 12, 12, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend on a shared machine
    try:
        detector.fit([train])
    finally:
        torch.set_num_threads(threads)
    return detector, train


def test_afs_keeps_a_ratio_of_every_level_and_training_lowers_the_loss(
    fitted: tuple[RealNet, torch.Tensor],
) -> None:
    detector, _ = fitted
    network = detector.network
    assert network is not None and network.kept == [3, 6]
    selected = network.selected.tolist()
    assert selected[:3] == sorted(selected[:3]) and all(0 <= index < 4 for index in selected[:3])
    assert selected[3:] == sorted(selected[3:]) and all(4 <= index < 12 for index in selected[3:])
    assert len(detector.loss_history) == 15 and detector.loss_history[-1] < 0.9 * detector.loss_history[0]


def test_a_corrupted_region_scores_highest(fitted: tuple[RealNet, torch.Tensor]) -> None:
    detector, _ = fitted
    test = smooth_embeddings(3, 12, 12, seed=5)
    test[2, :, 3:6, 7:10] += 4 * torch.randn(12, 3, 3, generator=torch.Generator().manual_seed(1))
    output = detector.predict(test)
    assert (
        output.maps.shape == (3, 12, 12) and float(output.maps.min()) >= 0 and float(output.maps.max()) <= 1
    )
    row, column = divmod(int(output.maps[2].argmax()), 12)
    assert 3 <= row < 6 and 7 <= column < 10
    assert output.scores[2] > output.scores[:2].max()


def test_state_round_trip_and_mismatches(fitted: tuple[RealNet, torch.Tensor]) -> None:
    detector, train = fitted
    state = detector.state_dict()
    # the keys artifacts hold (unchanged since RealNet's first artifact)
    assert {"network.mean", "network.std", "network.selected", "layer_channels", "aspp_rates"} <= set(state)
    assert all(key.startswith("network.") for key in set(state) - {"layer_channels", "aspp_rates"})
    restored = build_detector(
        detector_config({"name": "realnet", "selection_ratio": 0.75, "reconstruction_stages": 0, **SMALL})
    )
    restored.load_state_dict(state)
    assert torch.equal(restored.predict(train).maps, detector.predict(train).maps)
    with pytest.raises(ArtifactError, match="aspp_rates"):
        RealNet(detector.config.model_copy(update={"aspp_rates": (1, 3)})).load_state_dict(state)
    with pytest.raises(ArtifactError, match="does not match"):
        RealNet(detector.config.model_copy(update={"selection_ratio": 0.5})).load_state_dict(state)
    with pytest.raises(ArtifactError, match="outside the embedding"):
        RealNet(detector.config).load_state_dict(
            {**state, "network.selected": state["network.selected"] + 100}
        )
    with pytest.raises(ArtifactError, match="^realnet state entry network.std has non-positive"):
        RealNet(detector.config).load_state_dict({**state, "network.std": torch.zeros_like(state["network.std"])})
    with pytest.raises(ConfigError, match="realnet anomaly_fraction"):
        RealNetConfig(anomaly_fraction=(0.5, 0.1))
