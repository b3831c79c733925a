"""The neural-detector skeleton: epoch loop, stages, learning-rate hook, NaN check, state and legacy artifacts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hrad.detectors import build_detector, detector_config
from hrad.detectors.neural import LAYOUT_KEY, EpochsConfig, NeuralDetector, Stage
from hrad.errors import ArtifactError, InputError, NotFittedError
from hrad.features.base import EmbeddingSpec, FeatureExtractor


class ScaleConfig(EpochsConfig):
    name: str = "test-scale"
    lr: float = 0.1


class Scale(NeuralDetector[ScaleConfig, nn.Module]):
    """Learns one weight per channel so that ``w * x`` matches 1; records the lr of every step."""

    def __init__(self, config: ScaleConfig) -> None:
        super().__init__(config)
        self.step_lrs: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        return EmbeddingSpec(layers=("layer1",))

    def build_network(self, layout: list[int]) -> nn.Module:
        module = nn.Module()
        module.weight = nn.Parameter(torch.zeros(1, sum(layout), 1, 1))
        return module

    def optimizers(self) -> list[torch.optim.Optimizer]:
        self.optimizer = torch.optim.SGD(self.fitted_network().parameters(), lr=self.config.lr)
        return [self.optimizer]

    def lr_factor(self, epoch: int) -> float:
        return 0.5**epoch

    def training_step(self, embeddings: Tensor) -> Tensor:
        assert self.optimizer is not None
        self.step_lrs.append(self.optimizer.param_groups[0]["lr"])
        return (self.fitted_network().weight * embeddings - 1).pow(2).mean()

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        return (self.fitted_network().weight * embeddings - 1).pow(2).mean(dim=1)


def test_epoch_loop_steps_every_batch_records_mean_losses_and_applies_the_lr_factor() -> None:
    detector = Scale(ScaleConfig(epochs=3))
    ones = torch.ones(2, 3, 2, 2)
    detector.fit([ones, ones, ones[:1]])
    assert detector.step_lrs == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)
    # exact losses: w starts at 0; the mean over 3 channels gives each w_c the gradient 2 (w - 1) / 3
    weight, expected = 0.0, []
    for lr in detector.step_lrs:
        expected.append((weight - 1) ** 2)
        weight += 2 * lr * (1 - weight) / 3
    per_epoch = [(2 * expected[i] + 2 * expected[i + 1] + expected[i + 2]) / 5 for i in (0, 3, 6)]
    assert detector.loss_history == pytest.approx(per_epoch)
    assert detector.stage_losses == {"train": detector.loss_history}
    assert detector.layout == [3] and detector.network is not None and not detector.network.training
    torch.testing.assert_close(detector.predict(ones).scores, torch.full((2,), (weight - 1) ** 2))


def test_non_finite_loss_and_not_fitted_are_one_line_errors() -> None:
    broken = torch.ones(1, 3, 2, 2)
    broken[0, 1, 0, 0] = float("nan")
    with pytest.raises(
        InputError, match=r"^test-scale: the training loss is not finite in epoch 1 of train;"
    ):
        Scale(ScaleConfig(epochs=2)).fit([broken])
    with pytest.raises(NotFittedError, match="test-scale has not been fitted"):
        Scale(ScaleConfig()).predict(broken)
    with pytest.raises(NotFittedError):
        Scale(ScaleConfig()).state_dict()


def test_stages_run_in_order_with_their_own_epochs() -> None:
    class TwoStage(Scale):
        def training_stages(self) -> list[Stage]:
            return [
                Stage("first", 2, self.training_step, self.optimizers),
                Stage("second", 1, self.training_step, self.optimizers, lr_factor=lambda epoch: 10.0),
            ]

    detector = TwoStage(ScaleConfig())
    detector.fit([torch.ones(1, 2, 1, 1)])
    assert detector.step_lrs == pytest.approx([0.1, 0.1, 1.0])
    assert list(detector.stage_losses) == ["first", "second"] and len(detector.loss_history) == 3


TINY: dict[str, dict[str, Any]] = {
    "fastflow": {"epochs": 1, "flow_steps": 2},
    "rdpp": {"epochs": 1, "bottleneck_stride": 1},
    "destseg": {"student_epochs": 1, "segmentation_epochs": 1, "student_stages": 1},
    "vitad": {"epochs": 1, "decoder_depth": 3, "heads": 2},
    "varad": {"epochs": 1},
    "students": {"epochs": 1},
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_old_artifacts_with_the_old_layout_key_still_load(name: str) -> None:
    """FastFlow, RD++ and DeSTSeg saved the layout as ``level_channels``, ViTAD and VarAD as
    ``split_sizes``, the students as ``split`` with ``forward.`` / ``backward.`` weights."""
    embeddings = torch.randn(2, 24, 6, 6, generator=torch.Generator().manual_seed(0))
    config = detector_config(
        {"name": name, "level_channels": (8, 8, 8) if name != "students" else (12, 12), **TINY[name]}
    )
    detector = build_detector(config)
    detector.fit([embeddings])
    state = detector.state_dict()
    assert isinstance(detector, NeuralDetector) and state[LAYOUT_KEY].tolist() == detector.layout
    legacy = {"fastflow": "level_channels", "rdpp": "level_channels", "destseg": "level_channels"}.get(
        name, "split_sizes"
    )
    old = {(legacy if key == LAYOUT_KEY else key): value for key, value in state.items()}
    if name == "students":
        old = {
            "split"
            if key == "split_sizes"
            else key.replace("network.forward_student.", "forward.").replace(
                "network.backward_student.", "backward."
            ): value
            for key, value in old.items()
        }
        assert {"split", "forward.0.weight", "backward.0.weight"} <= set(old)
    fresh = build_detector(detector_config({"name": name, **TINY[name]}))
    fresh.load_state_dict(old)
    torch.testing.assert_close(
        fresh.predict(embeddings).maps, detector.predict(embeddings).maps, rtol=0, atol=0
    )
    with pytest.raises(ArtifactError, match=f"^{name} state lacks {LAYOUT_KEY}; the artifact is incomplete$"):
        build_detector(config).load_state_dict({k: v for k, v in old.items() if k not in (legacy, "split")})
