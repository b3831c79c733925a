"""VarAD: anomaly detection as visual autoregressive token prediction (Cao et al. 2024).

The embedding is the concatenation of several ViT blocks ("levels"). Per level:

1. adapted tokens ``F^ = F + Linear(F)`` (trainable residual adapter, paper Eq. 1);
2. the grid is read in scan orders: row-major, column-major and both reversed, or row-major only;
3. ``M`` learned begin-of-sequence tokens are prepended and one Mamba block per level (shared by
   the directions) runs over ``[BOS_1..BOS_M, v_1..v_L]``; its output at position ``l`` predicts
   ``v_l`` from ``v_1..v_{l-M}`` only (paper Eq. 6-7; the outputs after ``v_L``, the paper's
   ``[EOS]`` part, are dropped as in the reference code);
4. the directional predictions are mapped back to the grid and summed (reference code; the paper
   averages, the same after the L2 normalisation every cosine applies).

Target: the adapted token ``F^`` (paper Eq. 9). Loss per level (reference code):
``(1 - mean cosine over channels) + (1 - mean cosine over the flattened spatial axis)``, summed
over levels. Map: ``1 - cos`` per level at token resolution, mean over levels.

The prediction step ``M`` is fixed at fit and saved. ``step_m=m`` (paper): ``m`` rows of the
row-major scans, ``m`` columns of the column-major ones (the paper's H/W labels are ambiguous but
coincide for square inputs). Default: the reference code's ``M = 256 / 128 / 64``, set for a
36 x 36 grid, scaled to ``L`` tokens as ``max(1, min(M, round(M * L / 1296)))`` so the excluded
fraction of the sequence stays the reference's. BOS tokens (paper: ``[BOS] in R^{M x C}``) are
learned and saved; the reference code draws them at random and never saves them.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import require_vit
from hrad.detectors.mamba import MAX_CHUNK, MambaBlock, ScanBackend
from hrad.detectors.neural import LAYOUT_KEY, EpochsConfig, NeuralDetector
from hrad.detectors.scoring import cosine_distances
from hrad.errors import ArtifactError, ConfigError
from hrad.features.base import EmbeddingSpec, FeatureExtractor, vit_depth

#: the reference code's sequence length (512 px / 14 -> 36 x 36 tokens) its M values were set for
REFERENCE_LENGTH = 36 * 36
REFERENCE_STEPS = (256, 128, 64)
#: default number of levels (blocks 4, 8, 12 of a 12-block ViT)
DEFAULT_LEVELS = 3


class VarADConfig(EpochsConfig):
    """Typed VarAD options; defaults follow the paper / reference code."""

    name: Literal["varad"] = "varad"
    #: training epochs
    epochs: int = Field(default=10, ge=1)
    #: AdamW learning rate
    lr: float = 5e-4
    #: AdamW betas
    betas: tuple[float, float] = (0.5, 0.999)
    #: AdamW weight decay
    weight_decay: float = 1e-2
    #: scan directions: 1 (row-major) or 4 (both orders, both ways)
    directions: Literal[1, 4] = 4
    #: explicit M per level (overrides step_m and the reference rule)
    steps: tuple[int, ...] = ()
    #: the paper's prediction step m (M = m scan lines); None = reference rule
    step_m: float | None = None
    #: "sequence": M learned BOS tokens per level; "repeated": one token repeated M times
    bos: Literal["sequence", "repeated"] = "sequence"
    #: directional predictions summed (reference) or normalised then averaged
    combine: Literal["sum", "normalized_mean"] = "sum"
    #: Mamba state size
    d_state: int = 16
    #: Mamba causal convolution width
    d_conv: int = 4
    #: Mamba inner width as a multiple of the channels
    expand: int = 2
    #: selective-scan backend: auto (the compiled numba scan on CPU, mamba-ssm's kernel on CUDA
    #: when installed), kernel, chunked, sequential loop, or fused (mamba-ssm)
    scan: ScanBackend = "auto"
    #: tokens per chunk of the chunked scan
    scan_chunk: int = Field(default=MAX_CHUNK, ge=1, le=MAX_CHUNK)
    #: chunked scan only: recompute its chunks in the backward pass instead of keeping them
    #: (less training memory); the compiled kernel always keeps just a state every 64 tokens
    recompute_scan: bool = True
    #: stop gradients into the target tokens (the paper trains through both sides)
    detach_target: bool = False


def default_blocks(depth: int, levels: int = DEFAULT_LEVELS) -> tuple[str, ...]:
    """Blocks spread over depth: 4, 8, 12 of 12 (paper); 1, 3, 4 of 4."""
    picked = sorted({max(1, round(depth * (index + 1) / levels)) for index in range(levels)})
    return tuple(f"block{block}" for block in picked)


def reference_steps(levels: int, length: int) -> list[int]:
    """The reference code's M (256, 128, 64, ...), scaled down for sequences under 1296 tokens."""
    last = len(REFERENCE_STEPS) - 1
    references = [max(1, REFERENCE_STEPS[min(level, last)] >> max(0, level - last)) for level in range(levels)]
    return [max(1, min(step, round(step * length / REFERENCE_LENGTH))) for step in references]


def scan_orders(height: int, width: int, directions: int) -> list[Tensor]:
    """Raster indices of each scan order: row-major, column-major, reversed row, reversed column."""
    grid = torch.arange(height * width).view(height, width)
    row, column = grid.flatten(), grid.t().flatten()
    return [row, column, row.flip(0), column.flip(0)][:directions]


class VarADLevel(nn.Module):
    def __init__(self, channels: int, bos_length: int, config: VarADConfig) -> None:
        super().__init__()
        self.adapter = nn.Linear(channels, channels)
        self.bos = nn.Parameter(torch.randn(bos_length, channels) * 0.02)
        self.mamba = MambaBlock(
            channels,
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand=config.expand,
            backend=config.scan,
            chunk=config.scan_chunk,
            recompute=config.recompute_scan,
        )

    def adapt(self, tokens: Tensor) -> Tensor:
        """``B x C x h x w`` -> adapted tokens ``F + Linear(F)``."""
        return tokens + self.adapter(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def bos_tokens(self, step: int) -> Tensor:
        """The last ``step`` BOS tokens (a direction with a smaller ``M`` uses the last ones)."""
        return self.bos.expand(step, -1) if self.bos.shape[0] == 1 else self.bos[-step:]

    def predict(self, adapted: Tensor, orders: list[Tensor], steps: list[int]) -> Tensor:
        """Per-direction predictions mapped back to the grid: ``B x dirs x C x h x w``."""
        batch, channels, height, width = adapted.shape
        flat = adapted.flatten(2).transpose(1, 2)  # B x L x C
        length = flat.shape[1]
        out = adapted.new_empty(batch, len(orders), length, channels)
        for step in sorted(set(steps)):
            chosen = [index for index, value in enumerate(steps) if value == step]
            sequences = torch.cat([flat[:, orders[index].to(flat.device)] for index in chosen])
            bos = self.bos_tokens(step).unsqueeze(0).expand(len(sequences), -1, -1)
            predicted = self.mamba(torch.cat([bos, sequences], dim=1))[:, :length]
            for position, index in enumerate(chosen):
                block = predicted[position * batch : (position + 1) * batch]
                out[:, index, orders[index].to(flat.device)] = block
        return out.permute(0, 1, 3, 2).reshape(batch, len(orders), channels, height, width)


class VarADNet(nn.ModuleList):
    """The levels (a ModuleList: the state keeps its ``levels.N.*`` names)."""


class VarAD(NeuralDetector[VarADConfig, VarADNet]):
    """Visual autoregressive token prediction with one Mamba block per level."""

    state_prefix = "levels"
    extra_state_keys = ("steps",)
    exportable = False  # the Mamba scan is not traced to ONNX
    optimizer_class = torch.optim.AdamW

    def __init__(self, config: VarADConfig) -> None:
        super().__init__(config)
        self.steps: list[list[int]] = []  # level x direction

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        require_vit(extractor, "varad")
        return EmbeddingSpec(layers=default_blocks(vit_depth(extractor)), aggregation=1)

    def default_layers(self) -> int:
        return len(self.config.layers) or DEFAULT_LEVELS

    def configure(self, embeddings: Tensor) -> None:
        """The prediction step M of every level and direction, fixed by the first batch's grid."""
        config = self.config
        height, width = embeddings.shape[-2:]
        length = height * width
        levels = len(self.layout)
        directions = config.directions
        if config.steps:
            if len(config.steps) != levels:
                raise ConfigError(
                    f"varad steps {list(config.steps)} must give one M per level ({levels} levels)"
                )
            steps = [[int(step)] * directions for step in config.steps]
        elif config.step_m is not None:
            lines = [width, height, width, height][:directions]  # scan-line length of each order
            steps = [[max(1, round(config.step_m * line)) for line in lines] for _ in range(levels)]
        else:
            steps = [[step] * directions for step in reference_steps(levels, length)]
        too_long = [step for row in steps for step in row if step < 1 or step >= length]
        if too_long:
            raise ConfigError(
                f"varad prediction step M={too_long[0]} leaves no context in a {height}x{width} token grid;"
                f" use M in 1..{length - 1}"
            )
        self.steps = steps

    def build_network(self, layout: list[int]) -> VarADNet:
        repeated = self.config.bos == "repeated"
        return VarADNet(
            VarADLevel(size, 1 if repeated else max(steps), self.config)
            for size, steps in zip(layout, self.steps, strict=True)
        )

    def _forward(self, embeddings: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Adapted targets and directional predictions (``B x dirs x C x h x w``) per level."""
        height, width = embeddings.shape[-2:]
        orders = scan_orders(height, width, self.config.directions)
        targets, predictions = [], []
        levels = cast(list[VarADLevel], list(self.fitted_network()))
        for level, tokens, steps in zip(levels, self.split(embeddings), self.steps, strict=True):
            adapted = level.adapt(tokens)
            targets.append(adapted)
            predictions.append(level.predict(adapted, orders, steps))
        return targets, predictions

    def _combine(self, directional: Tensor) -> Tensor:
        if self.config.combine == "normalized_mean":
            return F.normalize(directional, dim=2).mean(dim=1)
        return directional.sum(dim=1)

    def training_step(self, embeddings: Tensor) -> Tensor:
        targets, predictions = self._forward(embeddings)
        total = targets[0].new_zeros(())
        for target, directional in zip(targets, predictions, strict=True):
            if self.config.detach_target:
                target = target.detach()
            predicted = self._combine(directional)
            channel_cos = F.cosine_similarity(predicted, target, dim=1)
            spatial_cos = F.cosine_similarity(predicted.flatten(2), target.flatten(2), dim=2)
            total = total + (1 - channel_cos.mean()) + (1 - spatial_cos.mean())
        return total

    def directional_predictions(self, embeddings: Tensor) -> list[Tensor]:
        """Per level, each direction's prediction on the grid (``B x dirs x C x h x w``); for analysis."""
        return self.evaluate(lambda tokens: self._forward(tokens)[1], embeddings)

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        targets, predictions = self._forward(embeddings)
        return cosine_distances(targets, [self._combine(p) for p in predictions]).mean(dim=0)

    def extra_state(self) -> dict[str, Tensor]:
        return {"steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        steps = [[int(step) for step in row] for row in state["steps"].tolist()]
        layers = len(state[LAYOUT_KEY].flatten())
        if len(steps) != layers or any(len(row) != self.config.directions for row in steps):
            raise ArtifactError(
                f"varad state holds steps for {len(steps)} level(s) x {len(steps[0]) if steps else 0} direction(s);"
                f" the layout has {layers} level(s) and the config {self.config.directions} direction(s)"
            )
        self.steps = steps
