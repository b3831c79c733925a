"""Helpers shared by the pretrained backbones: which layers to compute, input normalisation,
BatchNorm folding of frozen CNNs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from hrad.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def deepest_requested(layers: Sequence[str], available: Sequence[str], backbone: str) -> int:
    """1-based position in ``available`` of the deepest requested layer (compute stops there)."""
    unknown = [name for name in layers if name not in available]
    if unknown or not layers:
        raise ConfigError(
            f"backbone {backbone!r} has no layer(s) {', '.join(unknown) or '(none requested)'}; "
            f"available: {', '.join(available)}"
        )
    return max(available.index(name) for name in layers) + 1


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std``; constants, not buffers, so models can be built empty."""
    return (images - images.new_tensor(mean).view(1, 3, 1, 1)) / images.new_tensor(std).view(1, 3, 1, 1)


def fold_batchnorms(pairs: Iterable[tuple[nn.Module, str, str]]) -> None:
    """Fold each frozen BatchNorm into the convolution before it: ``(owner, conv attribute, bn
    attribute)``; the conv becomes the fused one (torch's ``fuse_conv_bn_eval``), the BatchNorm an
    ``Identity``. Inference only: the backbones here are never trained."""
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(owner, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            setattr(owner, bn_name, nn.Identity())

