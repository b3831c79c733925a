"""VarAD: anomaly detection as visual autoregressive token prediction (Cao et al. 2024).

The embedding is the concatenation of several ViT blocks ("levels"). Per level:

1. adapted tokens ``F^ = F + Linear(F)`` (trainable residual adapter, paper Eq. 1);
2. the grid is read in scan orders: row-major, column-major and both reversed (``directions=4``)
   or row-major only (``directions=1``);
3. ``M`` learned begin-of-sequence tokens are prepended and one Mamba block per level (shared by
   the directions) runs over ``[BOS_1..BOS_M, v_1..v_L]``; its output at position ``l`` is the
   prediction of ``v_l``, so token ``l`` is predicted from ``v_1..v_{l-M}`` only (paper Eq. 6-7;
   the outputs after ``v_L`` are the paper's ``[EOS]`` part and are dropped, as in the reference
   code);
4. the directional predictions are mapped back to the grid and summed (reference code; the
   paper averages, which is the same after the L2 normalisation that every cosine applies);
   ``combine="normalized_mean"`` normalises each direction before averaging instead.

The target is the adapted token ``F^`` (paper Eq. 9: ``||F_bar - F^||``). Loss per level is
``(1 - mean cosine over channels) + (1 - mean cosine over the flattened spatial axis)``
(reference code), summed over levels. Map: ``1 - cos`` per level at token resolution, mean
over levels; upsampling and blur belong to the strategy / post-processing.

Prediction step ``M`` (fixed at fit time, saved):

- ``steps=(...)``: explicit ``M`` per level;
- ``step_m=m`` (paper): ``M = round(m * scan-line length)`` = ``m`` rows of the row-major scans
  (``m * w``) and ``m`` columns of the column-major scans (``m * h``); the paper's H/W labels
  are ambiguous but coincide for square inputs;
- default (reference code): ``M = 256 / 128 / 64`` (halving per further level), designed for a
  36 x 36 = 1296-token grid; shorter sequences scale it down in proportion,
  ``M = max(1, min(M_ref, round(M_ref * L / 1296)))``, so the excluded fraction of the sequence
  stays the reference one.

BOS tokens (paper: ``[BOS] in R^{M x C}``) are learned parameters saved with the model (the
reference code draws them at random and never saves them). ``bos="sequence"`` learns ``M``
distinct tokens per level (the last ``M_dir`` are used when directions have different ``M``);
``bos="repeated"`` learns one token repeated ``M`` times.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import Detector, DetectorConfig, DetectorOutput
from hrad.detectors.mamba import MAX_CHUNK, MambaBlock, ScanBackend
from hrad.detectors.scoring import ImageScore, image_scores, load_module_state, module_state
from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.features.base import EmbeddingSpec, FeatureExtractor

#: the reference code's sequence length (512 px / 14 -> 36 x 36 tokens) its M values were set for
REFERENCE_LENGTH = 36 * 36
REFERENCE_STEPS = (256, 128, 64)
#: default number of levels (blocks 4, 8, 12 of a 12-block ViT)
DEFAULT_LEVELS = 3


class VarADConfig(DetectorConfig):
    """Typed VarAD options; defaults follow the paper / reference code."""

    name: Literal["varad"] = "varad"
    #: training epochs
    epochs: int = 10
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
    #: channels of each level in the embedding; empty = equal split over the levels
    level_channels: tuple[int, ...] = ()
    #: Mamba state size
    d_state: int = 16
    #: Mamba causal convolution width
    d_conv: int = 4
    #: Mamba inner width as a multiple of the channels
    expand: int = 2
    #: selective-scan backend: auto, chunked, sequential loop, or the mamba-ssm CUDA kernel
    scan: ScanBackend = "auto"
    #: tokens per chunk of the chunked scan
    scan_chunk: int = Field(default=MAX_CHUNK, ge=1, le=MAX_CHUNK)
    #: recompute the scan's chunks in the backward pass instead of keeping them: less training
    #: memory (what 1024-class inputs need on CPU), and on CPU no slower in
    #: benchmarks/results/varad_scan.md (4.3 s vs 4.9 s forward + backward)
    recompute_scan: bool = True
    #: image score from the token map: "max" or "top_mean" (mean of top_fraction)
    image_score: ImageScore = "max"
    #: fraction of the map's highest tokens averaged by image_score="top_mean"
    top_fraction: float = 0.01
    #: stop gradients into the target tokens (the paper trains through both sides)
    detach_target: bool = False


def default_blocks(depth: int, levels: int = DEFAULT_LEVELS) -> tuple[str, ...]:
    """Blocks spread over depth: 4, 8, 12 of 12 (paper); 1, 3, 4 of 4."""
    picked = sorted({max(1, round(depth * (index + 1) / levels)) for index in range(levels)})
    return tuple(f"block{block}" for block in picked)


def reference_steps(levels: int, length: int) -> list[int]:
    """The reference code's M (256, 128, 64, ...), scaled down for sequences under 1296 tokens."""
    steps = []
    for level in range(levels):
        reference = (
            REFERENCE_STEPS[level]
            if level < len(REFERENCE_STEPS)
            else max(1, REFERENCE_STEPS[-1] >> (level - 2))
        )
        steps.append(max(1, min(reference, round(reference * length / REFERENCE_LENGTH))))
    return steps


def scan_orders(height: int, width: int, directions: int) -> list[Tensor]:
    """Raster indices of each scan order: row-major, column-major, reversed row, reversed column."""
    grid = torch.arange(height * width).view(height, width)
    row, column = grid.flatten(), grid.t().flatten()
    return [row, column, row.flip(0), column.flip(0)][:directions]


def scan_line_lengths(height: int, width: int, directions: int) -> list[int]:
    return [width, height, width, height][:directions]


class VarADLevel(nn.Module):
    """Adapter, BOS tokens and Mamba predictor of one level."""

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


class VarAD(Detector[VarADConfig]):
    """Visual autoregressive token prediction with one Mamba block per level."""

    trainable = True
    multi_pass = True  # one pass over the embedding batches per epoch

    def __init__(self, config: VarADConfig) -> None:
        super().__init__(config)
        self.levels: nn.ModuleList | None = None
        self.split_sizes: list[int] = []
        self.steps: list[list[int]] = []  # level x direction
        self.loss_history: list[float] = []  # mean training loss per epoch

    # ----------------------------------------------------------------- embedding
    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        if not extractor.is_vit:
            raise ConfigError(
                f"varad needs a ViT backbone (a token grid); {type(extractor).__name__} is a CNN"
            )
        depth = len(extractor.layer_strides)
        return EmbeddingSpec(layers=default_blocks(depth), aggregation=1)

    # ----------------------------------------------------------------- building
    def _level_sizes(self, channels: int) -> list[int]:
        config = self.config
        if config.level_channels:
            if sum(config.level_channels) != channels:
                raise ConfigError(
                    f"varad level_channels {list(config.level_channels)} sum to {sum(config.level_channels)},"
                    f" but the embedding has {channels} channels"
                )
            return list(config.level_channels)
        levels = len(config.layers) or DEFAULT_LEVELS
        if channels % levels:
            raise ConfigError(
                f"varad cannot split {channels} embedding channels into {levels} equal levels; set level_channels"
            )
        return [channels // levels] * levels

    def _prediction_steps(self, height: int, width: int) -> list[list[int]]:
        config = self.config
        length = height * width
        levels = len(self.split_sizes)
        directions = config.directions
        if config.steps:
            if len(config.steps) != levels:
                raise ConfigError(
                    f"varad steps {list(config.steps)} must give one M per level ({levels} levels)"
                )
            steps = [[int(step)] * directions for step in config.steps]
        elif config.step_m is not None:
            lines = scan_line_lengths(height, width, directions)
            steps = [[max(1, round(config.step_m * line)) for line in lines] for _ in range(levels)]
        else:
            steps = [[step] * directions for step in reference_steps(levels, length)]
        too_long = [step for row in steps for step in row if step < 1 or step >= length]
        if too_long:
            raise ConfigError(
                f"varad prediction step M={too_long[0]} leaves no context in a {height}x{width} token grid;"
                f" use M in 1..{length - 1}"
            )
        return steps

    def _build(self, channels: int, device: torch.device) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            levels = []
            for size, steps in zip(self.split_sizes, self.steps, strict=True):
                bos_length = 1 if self.config.bos == "repeated" else max(steps)
                levels.append(VarADLevel(size, bos_length, self.config))
            self.levels = nn.ModuleList(levels).to(device)

    # ----------------------------------------------------------------- forward
    def _split(self, embeddings: Tensor) -> list[Tensor]:
        if embeddings.ndim != 4:
            raise InputError(f"varad expects B x C x h x w embeddings, got shape {tuple(embeddings.shape)}")
        if embeddings.shape[1] != sum(self.split_sizes):
            raise InputError(
                f"varad was fitted on {sum(self.split_sizes)}-channel embeddings, got {embeddings.shape[1]}"
            )
        return list(embeddings.split(self.split_sizes, dim=1))

    def _forward(self, embeddings: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Adapted targets and directional predictions (``B x dirs x C x h x w``) per level."""
        assert self.levels is not None
        height, width = embeddings.shape[-2:]
        orders = scan_orders(height, width, self.config.directions)
        targets, predictions = [], []
        for level, tokens, steps in zip(
            cast(list[VarADLevel], list(self.levels)), self._split(embeddings), self.steps, strict=True
        ):
            adapted = level.adapt(tokens)
            targets.append(adapted)
            predictions.append(level.predict(adapted, orders, steps))
        return targets, predictions

    def _combine(self, directional: Tensor) -> Tensor:
        if self.config.combine == "normalized_mean":
            return F.normalize(directional, dim=2).mean(dim=1)
        return directional.sum(dim=1)

    def _loss(self, targets: list[Tensor], predictions: list[Tensor]) -> Tensor:
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
        self._require_fitted()
        with torch.no_grad():
            return self._forward(embeddings.to(self._device()))[1]

    # ----------------------------------------------------------------- Detector API
    def fit(self, batches: Iterable[Tensor]) -> None:
        config = self.config
        optimizer: torch.optim.Optimizer | None = None
        self.loss_history = []
        for _ in range(config.epochs):
            losses = []
            for batch in batches:
                if self.levels is None:
                    self.split_sizes = self._level_sizes(batch.shape[1])
                    self.steps = self._prediction_steps(*batch.shape[-2:])
                    self._build(batch.shape[1], batch.device)
                assert self.levels is not None
                if optimizer is None:
                    optimizer = torch.optim.AdamW(
                        self.levels.parameters(),
                        lr=config.lr,
                        betas=config.betas,
                        weight_decay=config.weight_decay,
                    )
                self.levels.train()
                loss = self._loss(*self._forward(batch.to(self._device()).float()))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            if not losses:
                raise InputError("varad fit received no embedding batches")
            self.loss_history.append(sum(losses) / len(losses))
        if self.levels is not None:
            self.levels.eval()

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        self._require_fitted()
        assert self.levels is not None
        self.levels.eval()
        with torch.no_grad():
            targets, predictions = self._forward(embeddings.to(self._device()).float())
            maps = torch.stack(
                [
                    1 - F.cosine_similarity(self._combine(p), t, dim=1)
                    for t, p in zip(targets, predictions, strict=True)
                ]
            ).mean(dim=0)
        return DetectorOutput(maps=maps, scores=self._image_scores(maps))

    def _image_scores(self, maps: Tensor) -> Tensor:
        return image_scores(maps, self.config.image_score, self.config.top_fraction)

    def state_dict(self) -> dict[str, Tensor]:
        self._require_fitted()
        assert self.levels is not None
        state = module_state(self.levels, "levels")
        state["split_sizes"] = torch.tensor(self.split_sizes, dtype=torch.int64)
        state["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [key for key in ("split_sizes", "steps") if key not in state]
        if missing:
            raise ArtifactError(f"varad state lacks {', '.join(missing)}; the artifact is incomplete")
        self.split_sizes = [int(size) for size in state["split_sizes"].tolist()]
        self.steps = [[int(step) for step in row] for row in state["steps"].tolist()]
        if len(self.steps[0]) != self.config.directions:
            raise ArtifactError(
                f"varad state was trained with {len(self.steps[0])} direction(s), config says {self.config.directions}"
            )
        self._build(sum(self.split_sizes), torch.device("cpu"))
        assert self.levels is not None
        load_module_state(self.levels, state, "levels", "varad")
        self.levels.eval()

    # ----------------------------------------------------------------- helpers
    def _require_fitted(self) -> None:
        if self.levels is None:
            raise ConfigError("varad has not been fitted or loaded; call fit() or load_state_dict() first")

    def _device(self) -> torch.device:
        assert self.levels is not None
        return next(self.levels.parameters()).device
