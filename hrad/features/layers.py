"""Helpers shared by the pretrained backbones: which layers to compute, input normalisation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

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
