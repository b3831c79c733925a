"""The neural-detector skeleton: epoch loop, stages, learning-rate hook, NaN check, state and legacy artifacts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hrad.detectors import build_detector, detector_config
from hrad.detectors.neural import LAYOUT_KEY, EpochsConfig, NeuralDetector, Stage
from hrad.errors import ArtifactError, DivergedError, InputError, NotFittedError
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
    # finite embeddings, a learning rate that makes w overflow: the training diverged (CLI status 1, not 2)
    with pytest.raises(DivergedError, match=r"^test-scale: the training loss is not finite in epoch 2 of train: the training diverged;"):
        Scale(ScaleConfig(epochs=2, lr=1e20)).fit([torch.ones(1, 3, 2, 2)])
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


# ----------------------------------------------------------------- mixed precision


class Linear(Scale):
    """A linear map trained towards 1 that records the autocast state and output type of every forward."""

    def __init__(self, config: ScaleConfig) -> None:
        super().__init__(config)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def build_network(self, layout: list[int]) -> nn.Module:
        return nn.Linear(sum(layout), sum(layout))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        self.optimizer = torch.optim.SGD(self.fitted_network().parameters(), lr=self.config.lr)
        return [self.optimizer]

    def _forward(self, embeddings: Tensor) -> Tensor:
        out = self.fitted_network()(embeddings.permute(0, 2, 3, 1))
        self.seen.append((torch.is_autocast_enabled(embeddings.device.type), out.dtype))
        return out

    def training_step(self, embeddings: Tensor) -> Tensor:
        return (self._forward(embeddings) - 1).pow(2).mean()

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        return (self._forward(embeddings) - 1).pow(2).mean(dim=-1)


def test_float32_and_auto_on_cpu_run_no_autocast_and_train_identically() -> None:
    data = [torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    runs = []
    for precision in ("float32", "auto"):
        detector = Linear(ScaleConfig(epochs=2, precision=precision))
        detector.fit(data)
        assert detector.compute_dtype is None
        maps = detector.predict(data[0]).maps
        assert set(detector.seen) == {(False, torch.float32)}
        runs.append((detector.loss_history, detector.state_dict(), maps))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][key], value, rtol=0, atol=0)
    torch.testing.assert_close(runs[1][2], runs[0][2], rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_autocasts_the_forward_keeps_float32_weights_and_maps(precision: str) -> None:
    data = [torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    reference = Linear(ScaleConfig(epochs=8))
    reference.fit(data)
    detector = Linear(ScaleConfig(epochs=8, precision=precision))
    detector.fit(data)
    dtype = getattr(torch, precision)
    assert detector.compute_dtype == dtype
    output = detector.predict(data[0])
    assert set(detector.seen) == {(True, dtype)}  # every training step and the predict
    assert output.maps.dtype == torch.float32 and output.scores.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in detector.fitted_network().parameters())
    # it learns what float32 learns, within the reduced type's rounding (float16: the loss
    # scaler skips the first steps while it finds its scale)
    assert detector.loss_history[-1] < 0.7 * detector.loss_history[0]
    assert detector.loss_history[-1] == pytest.approx(reference.loss_history[-1], rel=0.15)
    torch.testing.assert_close(output.maps, reference.predict(data[0]).maps, rtol=0.2, atol=0.05)


def test_float16_training_scales_the_loss_and_skips_steps_whose_gradients_overflow() -> None:
    """GradScaler: a step whose scaled gradients are inf is skipped and the scale halved."""
    tens = [torch.full((1, 4, 1, 1), 10.0)]  # loss ~50, fine in float16; its gradient x 65536 is not
    initial = Linear(ScaleConfig())
    initial.build([4], torch.device("cpu"))
    changed = {}
    for precision in ("float32", "float16"):
        detector = Linear(ScaleConfig(epochs=1, precision=precision, lr=0.01))
        detector.fit(tens)
        assert np.isfinite(detector.loss_history[0])
        changed[precision] = [
            not torch.equal(mine, start)
            for mine, start in zip(
                detector.fitted_network().parameters(), initial.fitted_network().parameters(), strict=True
            )
        ]
    assert changed == {"float32": [True, True], "float16": [False, False]}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_neural_detector_trains_and_predicts_in_bfloat16_on_cpu(name: str) -> None:
    embeddings = torch.randn(2, 24, 6, 6, generator=torch.Generator().manual_seed(0))
    config = detector_config(
        {
            "name": name,
            "level_channels": (8, 8, 8) if name != "students" else (12, 12),
            "precision": "bfloat16",
            **TINY[name],
        }
    )
    detector = build_detector(config)
    detector.fit([embeddings])
    assert isinstance(detector, NeuralDetector) and detector.compute_dtype == torch.bfloat16
    output = detector.predict(embeddings)
    assert output.maps.dtype == torch.float32 and bool(torch.isfinite(output.maps).all())
    assert all(np.isfinite(detector.loss_history))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TINY))
def test_every_neural_detector_trains_and_predicts_in_mixed_precision_on_cuda(name: str) -> None:
    """precision auto on CUDA: bfloat16 (float16 with loss scaling on older GPUs); VarAD's scan
    through mamba-ssm where installed."""
    embeddings = torch.randn(2, 24, 6, 6, generator=torch.Generator().manual_seed(0)).cuda()
    config = detector_config(
        {
            "name": name,
            "level_channels": (8, 8, 8) if name != "students" else (12, 12),
            "precision": "auto",
            **TINY[name],
        }
    )
    detector = build_detector(config)
    detector.fit([embeddings, embeddings])
    assert isinstance(detector, NeuralDetector) and detector.device.type == "cuda"
    assert detector.compute_dtype in (torch.bfloat16, torch.float16)
    output = detector.predict(embeddings)
    assert (
        output.maps.dtype == torch.float32 and output.maps.is_cuda and bool(torch.isfinite(output.maps).all())
    )
    assert all(np.isfinite(detector.loss_history))
    # loaded from its state (built on the CPU, as artifacts and HiAD's fitted pool are), the
    # network follows the embeddings to the GPU instead of pulling them to the CPU
    loaded = build_detector(config)
    loaded.load_state_dict(detector.state_dict())
    assert isinstance(loaded, NeuralDetector) and loaded.device.type == "cpu"
    again = loaded.predict(embeddings)
    assert loaded.device.type == "cuda" and again.maps.is_cuda
    torch.testing.assert_close(again.maps, output.maps, rtol=1e-3, atol=1e-3)
