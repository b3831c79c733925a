"""RD++'s network: the teacher pyramid, per-level projection layers, RD's one-class bottleneck
and the student decoder (see :mod:`hrad.detectors.rdpp`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrad.detectors.neural import conv_bn_relu
from hrad.imaging import resize

if TYPE_CHECKING:
    from hrad.detectors.rdpp.detector import RDPlusPlusConfig


def pyramid_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """``s_0 = h x w`` and one stride-2 halving (rounded up, as a padded 3x3 conv) per further level:
    ``s_i = ceil(h / 2^i) x ceil(w / 2^i)`` (repeated rounded-up halvings equal one)."""
    return [(-(-height // 2**level), -(-width // 2**level)) for level in range(levels)]


def teacher_pyramid(levels: list[Tensor]) -> list[Tensor]:
    """Level ``i`` average-pooled to its pyramid size ``s_i`` (for CNN layers roughly undoing the
    embedder's upsampling: RD reads each layer at its own stride)."""
    height, width = levels[0].shape[-2:]
    sizes = pyramid_sizes(int(height), int(width), len(levels))
    return [
        level if tuple(level.shape[-2:]) == size else F.adaptive_avg_pool2d(level, size)
        for level, size in zip(levels, sizes, strict=True)
    ]


class ProjectionLayer(nn.Sequential):
    """RD++'s per-level projection: four 3x3 convs with InstanceNorm (per sample) and LeakyReLU."""

    def __init__(self, channels: int, divisor: int) -> None:
        hidden = max(1, channels // divisor)
        narrow = max(1, channels // (2 * divisor))
        widths = [channels, hidden, narrow, hidden, channels]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [
                nn.Conv2d(width_in, width_out, kernel_size=3, padding=1),
                nn.InstanceNorm2d(width_out),
                nn.LeakyReLU(),
            ]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """ResNet bottleneck block (1x1 reduce, 3x3, 1x1 expand) with a projected shortcut when the
    shape changes; the block RD's one-class embedding and decoder are made of."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels_out // reduction)
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, hidden, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels_out, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _downsampler(channels: int, steps: int) -> nn.Sequential:
    """``steps`` stride-2 conv3x3-BN-ReLU, flat (state keys ``N.weight``, as saved so far)."""
    layers = (layer for _ in range(steps) for layer in conv_bn_relu(channels, channels, 3, stride=2))
    return nn.Sequential(*layers)


class OneClassBottleneck(nn.Module):
    """RD's OCBE: every level strided down to the coarsest pyramid size, concatenated, fused."""

    def __init__(
        self, level_channels: list[int], width: int, blocks: int, stride: int, reduction: int
    ) -> None:
        super().__init__()
        levels = len(level_channels)
        self.downsample = nn.ModuleList(
            _downsampler(channels, levels - 1 - index) for index, channels in enumerate(level_channels)
        )
        fused = [ResidualBlock(sum(level_channels), width, stride, reduction)]
        fused += [ResidualBlock(width, width, 1, reduction) for _ in range(blocks - 1)]
        self.fuse = nn.Sequential(*fused)

    def forward(self, levels: list[Tensor]) -> Tensor:
        return self.fuse(
            torch.cat([down(level) for down, level in zip(self.downsample, levels, strict=True)], 1)
        )


class StudentDecoder(nn.Module):
    """Coarse to fine: per level, resize to its pyramid size, residual blocks, linear 1x1 head."""

    def __init__(self, level_channels: list[int], width: int, blocks: int, reduction: int) -> None:
        super().__init__()
        stages = []
        heads = []
        channels_in = width
        for channels in reversed(level_channels):  # deepest level first
            stage = [ResidualBlock(channels_in, channels, 1, reduction)]
            stage += [ResidualBlock(channels, channels, 1, reduction) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            heads.append(nn.Conv2d(channels, channels, kernel_size=1))
            channels_in = channels
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, embedding: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Reconstructions in level order, each at its pyramid size."""
        reconstructions = []
        x = embedding
        for stage, head, size in zip(self.stages, self.heads, reversed(sizes), strict=True):
            x = stage(resize(x, size))
            reconstructions.append(head(x))
        return reconstructions[::-1]


class RDPlusPlusNet(nn.Module):
    def __init__(self, level_channels: list[int], config: RDPlusPlusConfig) -> None:
        super().__init__()
        width = config.bottleneck_channels or max(level_channels)
        self.projections = nn.ModuleList(
            ProjectionLayer(channels, config.projection_divisor) for channels in level_channels
        )
        self.bottleneck = OneClassBottleneck(
            level_channels, width, config.bottleneck_blocks, config.bottleneck_stride, config.block_reduction
        )
        self.decoder = StudentDecoder(level_channels, width, config.decoder_blocks, config.block_reduction)

    def project(self, pyramid: list[Tensor]) -> list[Tensor]:
        return [projection(level) for projection, level in zip(self.projections, pyramid, strict=True)]

    def reconstruct(self, projected: list[Tensor]) -> list[Tensor]:
        """Student reconstructions of every level at embedding resolution (``projected[0]``'s)."""
        height, width = projected[0].shape[-2:]
        sizes = pyramid_sizes(height, width, len(projected))
        return [resize(level, (height, width)) for level in self.decoder(self.bottleneck(projected), sizes)]

    def distillation_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]
