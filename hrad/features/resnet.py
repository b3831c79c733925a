"""ResNet-18 and Wide-ResNet-50-2 with torchvision's parameter names (no torchvision needed).

Parameter names match ``torchvision.models.resnet18`` / ``wide_resnet50_2`` so the official
checkpoints (or any torchvision-format file given as ``--weights``) load with ``strict=True``.
Wide-ResNet-50-2 is the backbone of PatchCore / PaDiM; its ``layer2``+``layer3`` are the usual
anomaly-detection features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from hrad.features.base import PYRAMID_LAYERS, BackboneConfig, FeatureExtractor, PyramidExtractor
from hrad.features.layers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    deepest_requested,
    fold_batchnorms,
    normalise,
)
from hrad.features.weights import empty_module, load_exactly, resolve_weights, torch_hub_source

#: torchvision's IMAGENET1K_V1 weights (the ones PatchCore/PaDiM results use)
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "wide-resnet50": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
}


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, width_factor: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        # in place on fresh convolution outputs only (never on ``x``, a layer output the caller
        # may keep): the backbone is frozen, nothing needs the pre-activation values
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out.add_(identity), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, width_factor: int = 1) -> None:
        super().__init__()
        width = planes * width_factor
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(in_channels, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # in place: as BasicBlock.forward
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out.add_(identity), inplace=True)


class ResNet(PyramidExtractor):
    """torchvision-compatible ResNet returning ``layer1..layer4`` (strides 4, 8, 16, 32)."""

    def __init__(
        self,
        name: str,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        width_factor: int = 1,
    ) -> None:
        super().__init__()
        self.name = name
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        self._channels: dict[str, int] = {}
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks = []
            for repeat in range(depth):
                stride = 2 if index > 0 and repeat == 0 else 1
                blocks.append(block(in_channels, planes, stride, width_factor))
                in_channels = planes * block.expansion
            setattr(self, PYRAMID_LAYERS[index], nn.Sequential(*blocks))
            self._channels[PYRAMID_LAYERS[index]] = in_channels
        self.fc = nn.Linear(in_channels, 1000)  # unused; kept so torchvision files load strictly
        self.weights_source = "random initialisation"

    def fuse_batchnorm(self) -> None:
        """Fold every frozen BatchNorm into the convolution before it (inference only; run after
        the weights are loaded, since the file's BatchNorm keys disappear)."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, "conv1", "bn1")]
        for block in self.modules():
            if isinstance(block, BasicBlock | Bottleneck):
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
                if isinstance(block.downsample, nn.Sequential):
                    pairs.append((block.downsample, "0", "1"))
        fold_batchnorms(pairs)

    def extract(self, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        depth = deepest_requested(layers, PYRAMID_LAYERS, self.name)
        x = self.in_layout(normalise(images, IMAGENET_MEAN, IMAGENET_STD))
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        out: dict[str, Tensor] = {}
        for name in PYRAMID_LAYERS[:depth]:
            x = getattr(self, name)(x)
            if name in layers:
                out[name] = x
        return out


def resnet18() -> ResNet:
    return ResNet("resnet18", BasicBlock, (2, 2, 2, 2))


def wide_resnet50() -> ResNet:
    return ResNet("wide-resnet50", Bottleneck, (3, 4, 6, 3), width_factor=2)


def _build(model: ResNet, config: BackboneConfig) -> ResNet:
    sources = [torch_hub_source(TORCHVISION_URLS[model.name])]
    loaded = resolve_weights(model.name, config.weights, sources, "torchvision-format state dict")
    load_exactly(model, loaded.state, model.name, loaded.source)
    model.fuse_batchnorm()
    model.use_channels_last()
    model.weights_source = loaded.source
    return model


def build_resnet18(config: BackboneConfig) -> FeatureExtractor:
    """ImageNet ResNet-18: ``config.weights`` file, else torchvision's official download."""
    return _build(empty_module(resnet18), config)


def build_wide_resnet50(config: BackboneConfig) -> FeatureExtractor:
    """ImageNet Wide-ResNet-50-2: ``config.weights`` file, else torchvision's official download."""
    return _build(empty_module(wide_resnet50), config)
