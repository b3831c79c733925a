"""FastFlow: anomaly detection with 2D normalizing flows (Yu et al. 2021).

The embedding is the concatenation of several backbone layers ("levels"). Per level:

1. per-channel standardisation with the training set's statistics. The paper / anomalib train a
   ``LayerNorm`` over ``[C, H, W]``, which ties the model to one input size; strategies feed
   images, tiles and HiAD patches of different sizes;
2. a flow of ``flow_steps`` FrEIA ``AllInOneBlock`` steps as anomalib configures them
   (``permute_soft=False``), in plain PyTorch: a subnet ``conv -> ReLU -> conv`` (3x3 on even
   steps, 1x1 on odd ones unless ``conv3x3_only``) maps the first ``C - C // 2`` channels to
   ``a``; the others ``x2`` become ``x2 * exp(s) + t`` with FrEIA's soft clamp
   ``s = clamp * tanh(0.1 * a_s)``, ``t = 0.1 * a_t``; then a learned per-channel affine
   (``global_affine``: ``scale = 0.1 * softplus_{beta=0.5}(g)``, starting at 1) and a fixed
   seeded channel permutation (saved with the weights).

Loss (anomalib): per level the batch mean of ``0.5 * sum(z**2) - log_det``, summed over levels,
divided by the elements per image (``C * h * w``) so the learning rate and reported loss do not
depend on the input size (anomalib does not normalise; with Adam this only changes the loss scale
and the relative strength of the weight decay).

Map (anomalib): per level ``-exp(-0.5 * mean_c(z**2))``, averaged over levels; it saturates for
strong anomalies (see ``anomaly_map``). The flows run at the embedding's resolution (the first
layer's grid), not at each layer's own as in anomalib.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import backbone_layers
from hrad.detectors.neural import EpochsConfig, NeuralDetector, StandardisedNet
from hrad.errors import ArtifactError
from hrad.features.base import EmbeddingSpec, FeatureExtractor

#: FrEIA scales the subnet output by this before the clamp, so a fresh flow is near the identity
COEFFICIENT_SCALE = 0.1


class FastFlowConfig(EpochsConfig):
    """Typed FastFlow options; defaults follow anomalib unless noted."""

    name: Literal["fastflow"] = "fastflow"
    #: anomalib / the paper train up to 500 epochs; 20 keeps CPU and high-resolution runs practical
    epochs: int = Field(default=20, ge=1)
    #: Adam learning rate
    lr: float = Field(default=1e-3, gt=0)
    #: Adam weight decay
    weight_decay: float = Field(default=1e-5, ge=0)
    #: coupling blocks per level
    flow_steps: int = Field(default=8, ge=1)
    #: subnet hidden channels per input channel (paper: 1.0 for ResNets, 0.16 for ViTs)
    hidden_ratio: float = Field(default=1.0, gt=0)
    #: 3x3 convs in every step (paper: ViTs) instead of alternating 3x3 / 1x1 (ResNets)
    conv3x3_only: bool = False
    #: soft clamp of the log-scale: ``s = clamp * tanh(0.1 * a)``
    clamp: float = Field(default=2.0, gt=0)
    #: FrEIA AllInOneBlock's learned per-channel scale and offset after each coupling
    global_affine: bool = True
    #: "probability": anomalib's ``-exp(-0.5 * mean z**2)`` (saturates at 0 on strong anomalies,
    #: which then tie); "nll": ``0.5 * mean z**2`` itself, monotone in the same quantity, never saturates
    anomaly_map: Literal["probability", "nll"] = "probability"


def global_scale(raw: Tensor) -> Tensor:
    """FrEIA's SOFTPLUS global-scale activation: ``0.1 * softplus(raw, beta=0.5)``, always > 0."""
    return 0.1 * F.softplus(raw, beta=0.5)


#: raw global-scale value whose activation is 1 (FrEIA's ``global_affine_init=1``)
GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(0.5 * 10.0) - 1.0)


class CouplingStep(nn.Module):
    """One affine coupling step + global affine + fixed permutation (FrEIA AllInOneBlock)."""

    permutation: Tensor

    def __init__(self, channels: int, kernel_size: int, config: FastFlowConfig, permutation: Tensor) -> None:
        super().__init__()
        self.passive = channels - channels // 2
        self.active = channels // 2
        self.clamp = config.clamp
        hidden = max(1, int(self.passive * config.hidden_ratio))
        padding = kernel_size // 2
        self.subnet = nn.Sequential(
            nn.Conv2d(self.passive, hidden, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * self.active, kernel_size, padding=padding),
        )
        self.global_scale: nn.Parameter | None = None
        self.global_offset: nn.Parameter | None = None
        if config.global_affine:
            self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), GLOBAL_SCALE_INIT))
            self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("permutation", permutation.clone())

    def _scale_shift(self, passive: Tensor) -> tuple[Tensor, Tensor]:
        coefficients = COEFFICIENT_SCALE * self.subnet(passive)
        log_scale = self.clamp * torch.tanh(coefficients[:, : self.active])
        return log_scale, coefficients[:, self.active :]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` -> (``y``, log|det J| per sample)."""
        passive, active = x.split([self.passive, self.active], dim=1)
        log_scale, shift = self._scale_shift(passive)
        y = torch.cat([passive, active * torch.exp(log_scale) + shift], dim=1)
        log_det = log_scale.flatten(1).sum(dim=1)
        if self.global_scale is not None and self.global_offset is not None:
            scale = global_scale(self.global_scale)
            y = y * scale + self.global_offset
            log_det = log_det + x.shape[2] * x.shape[3] * torch.log(scale).sum()
        return y.index_select(1, self.permutation), log_det

    def inverse(self, y: Tensor) -> Tensor:
        x = y.index_select(1, torch.argsort(self.permutation))
        if self.global_scale is not None and self.global_offset is not None:
            x = (x - self.global_offset) / global_scale(self.global_scale)
        passive, active = x.split([self.passive, self.active], dim=1)
        log_scale, shift = self._scale_shift(passive)
        return torch.cat([passive, (active - shift) * torch.exp(-log_scale)], dim=1)


class CouplingFlow(nn.Module):
    """A 2D normalizing flow over ``B x C x h x w`` maps: a sequence of :class:`CouplingStep`."""

    def __init__(self, channels: int, config: FastFlowConfig, generator: torch.Generator) -> None:
        super().__init__()
        kernels = [
            1 if index % 2 == 1 and not config.conv3x3_only else 3 for index in range(config.flow_steps)
        ]
        self.steps = nn.ModuleList(
            CouplingStep(channels, kernel, config, torch.randperm(channels, generator=generator))
            for kernel in kernels
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` -> (latent ``z``, log|det dz/dx| per sample)."""
        log_det = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_log_det = step(x)
            log_det = log_det + step_log_det
        return x, log_det

    def inverse(self, z: Tensor) -> Tensor:
        for step in reversed(self.steps):
            z = cast(CouplingStep, step).inverse(z)
        return z


class FastFlowLevel(StandardisedNet):
    def __init__(self, channels: int, config: FastFlowConfig, generator: torch.Generator) -> None:
        super().__init__(channels)
        self.flow = CouplingFlow(channels, config, generator)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow(self.standardise(features))


class FastFlowNet(nn.ModuleList):
    """The flows of every level (a ModuleList: the state keeps its ``levels.N.*`` names)."""


class FastFlow(NeuralDetector[FastFlowConfig, FastFlowNet]):
    """One 2D normalizing flow per embedding level; see the module docstring."""

    state_prefix = "levels"
    extra_state_keys = ("clamp",)
    min_layer_channels = 2  # a coupling needs two halves

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        """CNN: layer2 + layer3 (HiAD Table II; anomalib: layer1..3). ViT: PatchCore's blocks at ~2/3
        and ~3/4 of the depth (8 and 9 of 12), which include the paper's one DeiT block (8)."""
        return backbone_layers(extractor, ("layer2", "layer3"), (2 / 3, 3 / 4))

    def build_network(self, layout: list[int]) -> FastFlowNet:
        """Seeded flows (weights and permutations depend only on the config and level sizes)."""
        generator = torch.Generator().manual_seed(self.config.seed)
        return FastFlowNet(FastFlowLevel(size, self.config, generator) for size in layout)

    def before_fit(self, batches: Iterable[Tensor]) -> None:
        self.fit_standardisation(batches)

    def _forward(self, embeddings: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        outputs = [
            level(features)
            for level, features in zip(self.fitted_network(), self.split(embeddings), strict=True)
        ]
        return [latent for latent, _ in outputs], [log_det for _, log_det in outputs]

    def training_step(self, embeddings: Tensor) -> Tensor:
        """anomalib's negative log-likelihood, divided by the elements per image (``C * h * w``)."""
        latents, log_dets = self._forward(embeddings)
        total = embeddings.new_zeros(())
        for latent, log_det in zip(latents, log_dets, strict=True):
            total = total + (0.5 * latent.pow(2).flatten(1).sum(dim=1) - log_det).mean()
        return total / embeddings[0].numel()

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        latents, _ = self._forward(embeddings)
        energies = [0.5 * latent.pow(2).mean(dim=1) for latent in latents]
        if self.config.anomaly_map == "probability":
            energies = [-torch.exp(-energy) for energy in energies]
        return torch.stack(energies).mean(dim=0)

    def extra_state(self) -> dict[str, Tensor]:
        return {"clamp": torch.tensor([self.config.clamp], dtype=torch.float64)}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        saved_clamp = float(state["clamp"].flatten()[0])
        if not math.isclose(saved_clamp, self.config.clamp):
            raise ArtifactError(
                f"fastflow state was trained with clamp {saved_clamp}, config says {self.config.clamp}"
            )

    def check_loaded(self, network: FastFlowNet) -> None:
        super().check_loaded(network)
        for name, buffer in network.named_buffers():
            if name.endswith("permutation") and not torch.equal(
                buffer.sort().values, torch.arange(buffer.numel())
            ):
                raise ArtifactError(f"fastflow state entry levels.{name} is not a channel permutation")
