"""ViTAD: plain-ViT feature reconstruction (Zhang et al. 2023, reference code: zhangzjn/ADer).

The frozen encoder is the strategy's ViT. The embedding holds the **levels** to reconstruct
(blocks 3, 6, 9 of 12) and, with ``fuser_input="neck"`` (reference), the **neck**: the last block,
which alone feeds the fuser (reference ``neck=[12]``), so the decoder must rebuild blocks 3/6/9
from the deepest features and cannot copy its targets (``fuser_input="levels"``: all levels).

Fuser: a linear layer to the decoder width. Decoder: ``decoder_depth`` pre-norm transformer
blocks (timm ``Block`` layout) with 2D sine-cosine position embeddings computed for the current
grid, so any grid size works (the reference learns a fixed 16 x 16 embedding). The outputs of
``levels`` evenly spaced blocks (3, 6, 9 of 9) reconstruct the levels in reverse order, the last
block the shallowest level (reference ``ViT_Decoder``). The reference compares raw decoder outputs
with the encoder tokens; ``projection="auto"`` does too when the widths match, else (and always
with ``"linear"``) a linear map follows.

Loss per level, summed (reference ``avg=False``; ``loss="flat"`` is its ``CosLoss(flat=True)``).
AdamW as the reference, the learning rate x 0.1 from 80 % of the epochs on. Map: ``1 - cos`` per
token and level, averaged over levels (the reference sums and divides by levels**2, a constant
factor); image score: the max (the reference's max after a 16 x 16-pixel average pool of the
upsampled map, about one token).

Other differences: 20 epochs (reference 100; the decay still comes at 80 %); the learning rate is
not scaled with the batch size (reference ``1e-4 * batch / 8``); hrad's ViTs return blocks after
the final LayerNorm, the reference raw blocks (``BackboneConfig(final_norm=False)`` matches it).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import DetectorConfig, require_vit
from hrad.detectors.neural import LAYOUT_KEY, EpochsConfig, NeuralDetector
from hrad.detectors.scoring import cosine_distances, cosine_loss
from hrad.errors import ArtifactError, ConfigError
from hrad.features.base import EmbeddingSpec, FeatureExtractor, vit_depth

#: reconstructed levels by default (blocks 3, 6, 9 of a 12-block ViT)
DEFAULT_LEVELS = 3
#: timm's transformer LayerNorm epsilon (the reference decoder is a timm VisionTransformer)
NORM_EPS = 1e-6
#: width of one attention head when ``heads`` is not given (ViT-S: 384 / 64 = 6 heads)
HEAD_WIDTH = 64


class ViTADConfig(EpochsConfig):
    """Typed ViTAD options; defaults follow the reference code (zhangzjn/ADer, ``vitad_mvtec``)."""

    name: Literal["vitad"] = "vitad"
    #: AdamW learning rate
    lr: float = Field(default=1e-4, gt=0)
    #: AdamW betas
    betas: tuple[float, float] = (0.9, 0.999)
    #: AdamW weight decay
    weight_decay: float = Field(default=1e-4, ge=0)
    #: the learning rate is multiplied by ``lr_decay`` from epoch ``int(lr_decay_at * epochs)`` on
    lr_decay_at: float = Field(default=0.8, ge=0, le=1)
    #: factor the learning rate is multiplied by from lr_decay_at on
    lr_decay: float = Field(default=0.1, gt=0, le=1)
    #: reconstructed levels of the default embedding (spread over the depth at k / (levels + 1))
    levels: int = Field(default=DEFAULT_LEVELS, ge=1)
    #: "neck": the embedding's last layer (default: the last block) feeds the fuser (reference);
    #: "levels": the concatenated levels feed the fuser
    fuser_input: Literal["neck", "levels"] = "neck"
    #: transformer blocks in the decoder
    decoder_depth: int = Field(default=9, ge=1)
    #: decoder width; None = the fuser input's layer width (384 for ViT-S)
    decoder_dim: int | None = Field(default=None, ge=4)
    #: attention heads; None = about decoder width / 64 (a divisor of the width, at least 1)
    heads: int | None = Field(default=None, ge=1)
    #: decoder MLP width as a multiple of its width
    mlp_ratio: float = Field(default=4.0, gt=0)
    #: "auto": raw decoder outputs when widths match (reference), a linear map otherwise
    projection: Literal["auto", "linear"] = "auto"
    #: "flat": 1 - cos of flattened maps (reference); "token": per token; "token+flat": both
    loss: Literal["flat", "token", "token+flat"] = "flat"
    #: queries per attention call (bounds memory on large grids); 0 = all tokens at once
    attention_chunk: int = Field(default=0, ge=0)


def default_blocks(depth: int, levels: int = DEFAULT_LEVELS, neck: bool = True) -> tuple[str, ...]:
    """Levels at k / (levels + 1) of the depth (3, 6, 9 of 12), then the last block as neck."""
    picked = sorted({max(1, round(depth * (index + 1) / (levels + 1))) for index in range(levels)})
    if neck:
        picked.append(depth)
    return tuple(f"block{block}" for block in picked)


def decoder_taps(depth: int, levels: int) -> list[int]:
    """Decoder blocks (1-based) whose outputs are kept, evenly spaced: 3, 6, 9 of 9."""
    taps = sorted({round(depth * (index + 1) / levels) for index in range(levels)})
    if len(taps) != levels or taps[0] < 1:
        raise ConfigError(
            f"vitad decoder_depth={depth} cannot give {levels} distinct outputs; use at least {levels}"
        )
    return taps


def default_heads(dim: int) -> int:
    """About one head per 64 channels (ViT-S: 6, ViT-B: 12), lowered until it divides ``dim``."""
    heads = max(1, dim // HEAD_WIDTH)
    while dim % heads:
        heads -= 1
    return heads


def sincos_position_embedding(height: int, width: int, dim: int) -> Tensor:
    """Fixed 2D sine-cosine embedding (MAE), ``(height*width) x dim``, row-major: half the channels
    encode the row, half the column, by absolute index, so a token keeps its embedding when the
    grid grows. Channels beyond a multiple of 4 are zero."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width).reshape(-1)
    columns = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width).reshape(-1)
    parts = []
    for position in (rows, columns):
        angles = position[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1])).float()


class DecoderBlock(nn.Module):
    """Pre-norm transformer block (timm layout) using fused scaled-dot-product attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attention_chunk: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_chunk = attention_chunk
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attend(self, tokens: Tensor) -> Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        chunk = self.attention_chunk or length
        # every query row is independent, so splitting the queries only bounds peak memory
        parts = [F.scaled_dot_product_attention(part, key, value) for part in query.split(chunk, dim=2)]
        out = torch.cat(parts, dim=2)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = tokens + self.attend(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class ViTADNet(nn.Module):
    """Fuser, plain ViT decoder and per-level output maps for an :meth:`ViTAD._architecture`."""

    def __init__(self, architecture: list[int], level_sizes: list[int], config: ViTADConfig) -> None:
        super().__init__()
        dim, heads, depth, fuser_channels = architecture
        self.dim = dim
        self.fuser = nn.Linear(fuser_channels, dim)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, heads, config.mlp_ratio, config.attention_chunk)
            for _ in range(config.decoder_depth)
        )
        self.taps = decoder_taps(depth, len(level_sizes))
        self.outputs = nn.ModuleList(
            nn.Identity() if config.projection == "auto" and size == dim else nn.Linear(dim, size)
            for size in level_sizes
        )
        for block in self.blocks:  # timm ViT init; the reference fuser keeps PyTorch's default
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)

    def forward(self, fuser_tokens: Tensor) -> list[Tensor]:
        """``B x C_in x h x w`` -> one ``B x C_l x h x w`` reconstruction per level (shallowest first)."""
        batch, _, height, width = fuser_tokens.shape
        # contiguous: a transposed view takes another GEMM path for batch 1 than for batch > 1,
        # which would make an image's scores depend (in the last bit) on its batch
        tokens = self.fuser(fuser_tokens.flatten(2).transpose(1, 2).contiguous())
        tokens = tokens + sincos_position_embedding(height, width, self.dim).to(tokens.device)
        kept = []
        for index, block in enumerate(self.blocks[: self.taps[-1]]):
            tokens = block(tokens)
            if index + 1 in self.taps:
                kept.append(tokens)
        reconstructions = []
        for decoded, output in zip(reversed(kept), self.outputs, strict=True):
            mapped = output(decoded)
            reconstructions.append(mapped.transpose(1, 2).reshape(batch, -1, height, width))
        return reconstructions


class ViTAD(NeuralDetector[ViTADConfig, ViTADNet]):
    """Reconstruct frozen ViT blocks with a plain ViT decoder; anomalies reconstruct badly."""

    state_prefix = "net"
    extra_state_keys = ("architecture",)
    optimizer_class = torch.optim.AdamW

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        return cls._default_spec(ViTADConfig(), extractor)

    @classmethod
    def embedding_spec(cls, config: DetectorConfig, extractor: FeatureExtractor) -> EmbeddingSpec:
        """The default follows ``levels`` and ``fuser_input`` (no neck block with "levels")."""
        if isinstance(config, ViTADConfig) and not config.layers:
            return cls._default_spec(config, extractor)
        return super().embedding_spec(config, extractor)  # also rejects CNNs

    @classmethod
    def _default_spec(cls, config: ViTADConfig, extractor: FeatureExtractor) -> EmbeddingSpec:
        require_vit(extractor, "vitad")
        blocks = default_blocks(vit_depth(extractor), config.levels, neck=config.fuser_input == "neck")
        return EmbeddingSpec(layers=blocks, aggregation=1)

    def default_layers(self) -> int:
        """One equal layer per configured layer, else the levels (and the neck)."""
        return len(self.config.layers) or self.config.levels + (self.config.fuser_input == "neck")

    def resolve_layout(self, channels: int) -> list[int]:
        sizes = super().resolve_layout(channels)
        if self.config.fuser_input == "neck" and len(sizes) < 2:
            raise ConfigError(
                "vitad with fuser_input='neck' needs at least two embedding layers (levels, then the neck)"
            )
        return sizes

    def _level_sizes(self, layout: list[int]) -> list[int]:
        return layout[:-1] if self.config.fuser_input == "neck" else list(layout)

    def _architecture(self, layout: list[int]) -> list[int]:
        """Decoder width, heads, depth and the fuser's input width for a layer layout."""
        config = self.config
        levels = self._level_sizes(layout)
        neck = config.fuser_input == "neck"
        fuser_channels = layout[-1] if neck else sum(levels)
        dim = config.decoder_dim or (layout[-1] if neck else max(levels))
        heads = config.heads or default_heads(dim)
        if dim % heads:
            raise ConfigError(f"vitad decoder width {dim} is not divisible by {heads} attention heads")
        return [dim, heads, config.decoder_depth, fuser_channels]

    def build_network(self, layout: list[int]) -> ViTADNet:
        return ViTADNet(self._architecture(layout), self._level_sizes(layout), self.config)

    def _forward(self, embeddings: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Encoder targets and decoder reconstructions, one ``B x C_l x h x w`` pair per level."""
        layers = self.split(embeddings)
        if self.config.fuser_input == "neck":
            return layers[:-1], self.fitted_network()(layers[-1])
        return layers, self.fitted_network()(embeddings)

    def lr_factor(self, epoch: int) -> float:
        """The reference step schedule; the first epoch always runs at the full rate (int(0.8 * 1)
        would decay a 1-epoch fit)."""
        config = self.config
        return config.lr_decay if epoch >= max(1, int(config.lr_decay_at * config.epochs)) else 1.0

    def training_step(self, embeddings: Tensor) -> Tensor:
        mode = self.config.loss
        return cosine_loss(*self._forward(embeddings), mode in ("token", "token+flat"), mode in ("flat", "token+flat"))

    def reconstructions(self, embeddings: Tensor) -> list[Tensor]:
        """Per level, the decoder's reconstruction ``B x C_l x h x w``; for analysis."""
        return self.evaluate(lambda tokens: self._forward(tokens)[1], embeddings)

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        return cosine_distances(*self._forward(embeddings)).mean(dim=0)

    def extra_state(self) -> dict[str, Tensor]:
        return {"architecture": torch.tensor(self._architecture(self.layout), dtype=torch.int64)}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        layout = [int(size) for size in state[LAYOUT_KEY].flatten().tolist()]
        try:
            expected = self._architecture(layout)
            decoder_taps(self.config.decoder_depth, len(self._level_sizes(layout)))
        except ConfigError as error:
            raise ArtifactError(f"vitad state does not fit the config: {error}") from None
        saved = [int(value) for value in state["architecture"].flatten().tolist()]
        if saved != expected:
            raise ArtifactError(
                "vitad state was trained with (decoder width, heads, depth, fuser input channels) ="
                f" {saved}, the config gives {expected}"
            )
