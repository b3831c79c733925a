"""Tiny random backbones for plumbing tests only (never for quality claims).

``tiny-cnn`` mimics a CNN pyramid (layer1..layer4 at strides 4..32); ``tiny-vit`` mimics a
ViT-*/14 (block1..block4 on a 14-pixel patch grid). Weights come from a fixed seed, so a saved
model that used them reloads identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hrad.errors import ConfigError
from hrad.features.base import BackboneConfig, FeatureExtractor, PyramidExtractor


class TinyCNN(PyramidExtractor):
    #: covers layer2's receptive field (13 px: a 5x5 stride-4 and a 3x3 stride-2 convolution), so
    #: tests with this backbone exercise context tiling
    default_context = 16

    def __init__(self, seed: int = 0, width: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        channels = [3, width, width * 2, width * 4, width * 8]
        self.stages = nn.ModuleList()
        for index in range(4):
            stride = 4 if index == 0 else 2
            conv = nn.Conv2d(channels[index], channels[index + 1], kernel_size=stride + 1, stride=stride, padding=stride // 2)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
                if conv.bias is not None:
                    conv.bias.zero_()
            self.stages.append(nn.Sequential(conv, nn.ReLU()))
        self._channels = {f"layer{i + 1}": channels[i + 1] for i in range(4)}

    def extract(self, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        x = images - 0.5
        deepest = max(int(name.removeprefix("layer")) for name in layers)
        for index, stage in enumerate(self.stages[:deepest]):
            x = stage(x)
            name = f"layer{index + 1}"
            if name in layers:
                out[name] = x
        return out


class TinyViT(FeatureExtractor):
    input_multiple = 14

    def __init__(self, seed: int = 0, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, dim, kernel_size=14, stride=14)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.dim = dim
        self.depth = depth

    @property
    def layer_strides(self) -> dict[str, int]:
        return {f"block{i + 1}": 14 for i in range(self.depth)}

    @property
    def layer_channels(self) -> dict[str, int]:
        return {f"block{i + 1}": self.dim for i in range(self.depth)}

    def extract(self, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        tokens = self.patch(images - 0.5)
        b, c, h, w = tokens.shape
        x = tokens.flatten(2).transpose(1, 2)
        out: dict[str, Tensor] = {}
        for index, block in enumerate(self.blocks):
            x = x + block(x)
            name = f"block{index + 1}"
            if name in layers:
                out[name] = self.norm(x).transpose(1, 2).reshape(b, c, h, w)
        return out


def _no_weights(config: BackboneConfig) -> None:
    """A weights file given to a seeded backbone is a mistake: it was ignored without a word
    (``hrad fit --backbone tiny-cnn --weights my.pt`` fitted on the seeded random weights)."""
    if config.weights is not None:
        raise ConfigError(
            f"{config.weights}: backbone {config.name!r} takes no weights file (seeded random weights, for tests); "
            "leave --weights out or give a pretrained backbone (hrad list)"
        )


def build_tiny_cnn(config: BackboneConfig) -> FeatureExtractor:
    _no_weights(config)
    return TinyCNN()


def build_tiny_vit(config: BackboneConfig) -> FeatureExtractor:
    _no_weights(config)
    return TinyViT()
