"""Small pieces several detectors share: image scores from token maps, cosine distances and
losses of the reconstruction detectors, channel statistics, network weights in and out of the
flat state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrad.errors import ArtifactError, InputError

#: how a detector turns its token map into one image score
ImageScore = Literal["max", "top_mean"]


def top_fraction_score(maps: Tensor, fraction: float) -> Tensor:
    """Per map: mean of the ``ceil(fraction * h * w)`` highest values (at least one)."""
    flat = maps.flatten(1)
    count = min(flat.shape[1], max(1, math.ceil(fraction * flat.shape[1])))
    return flat.topk(count, dim=1).values.mean(dim=1)


def image_scores(maps: Tensor, rule: ImageScore, top_fraction: float) -> Tensor:
    """``B x h x w`` maps -> ``B`` scores: the maximum, or the mean of the top fraction."""
    if rule == "max":
        return maps.flatten(1).max(dim=1).values
    return top_fraction_score(maps, top_fraction)


def cosine_distances(targets: Sequence[Tensor], reconstructions: Sequence[Tensor]) -> Tensor:
    """Per level ``1 - cos`` over channels at every position: ``levels x B x h x w``."""
    return torch.stack(
        [1 - F.cosine_similarity(r, t, dim=1) for t, r in zip(targets, reconstructions, strict=True)]
    )


def cosine_loss(
    targets: Sequence[Tensor], reconstructions: Sequence[Tensor], position: bool, flattened: bool
) -> Tensor:
    """Reconstruction loss summed over levels (RD++, ViTAD): ``1 -`` the mean per-position cosine
    (``position``) plus ``1 -`` the mean cosine of each sample's flattened map (``flattened``)."""
    total = targets[0].new_zeros(())
    for target, reconstruction in zip(targets, reconstructions, strict=True):
        if position:
            total = total + (1 - F.cosine_similarity(reconstruction, target, dim=1).mean())
        if flattened:
            total = total + (1 - F.cosine_similarity(reconstruction.flatten(1), target.flatten(1), dim=1).mean())
    return total


class ChannelStatistics:
    """Per-channel mean and std over every position of a stream of ``B x C x h x w`` batches.

    Accumulates in float64 around the first batch's mean (a shifted sum), so huge streams of
    large-offset features keep their precision; the std gets ``eps`` added to its variance
    (``nn.LayerNorm``'s default) so constant channels standardise to 0 instead of dividing by 0.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = eps
        self.count = 0
        self._shift = self._sums = self._squares = torch.empty(0)

    @property
    def channels(self) -> int | None:
        return None if self.count == 0 else self._shift.numel()

    def add(self, batch: Tensor) -> None:
        values = batch.detach().transpose(0, 1).flatten(1).double()  # C x positions
        if self.count == 0:
            self._shift = values.mean(dim=1, keepdim=True)
            self._sums = torch.zeros_like(self._shift)
            self._squares = torch.zeros_like(self._shift)
        centered = values - self._shift
        self._sums += centered.sum(dim=1, keepdim=True)
        self._squares += (centered**2).sum(dim=1, keepdim=True)
        self.count += values.shape[1]

    def mean_std(self, what: str) -> tuple[Tensor, Tensor]:
        """float32 ``(mean, std)`` of shape ``C``; ``what`` names the detector in the error."""
        if self.count == 0:
            raise InputError(f"{what} fit received no embedding batches")
        centered_mean = self._sums / self.count
        variance = (self._squares / self.count - centered_mean**2).clamp_min(0)
        mean = (self._shift + centered_mean).flatten()
        std = (variance + self.eps).sqrt().flatten()
        return mean.float(), std.float()


def module_state(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    """A network's weights as CPU copies under ``prefix.`` (a detector's flat safetensors state)."""
    return {f"{prefix}.{key}": value.detach().cpu().clone() for key, value in module.state_dict().items()}


def load_module_state(module: nn.Module, state: dict[str, Tensor], prefix: str, what: str) -> None:
    """Load the entries under ``prefix.`` into ``module``; a mismatch (other config, missing or
    misshapen weights) is one line of :class:`~hrad.errors.ArtifactError` naming ``what``."""
    start = prefix + "."
    weights = {key.removeprefix(start): value for key, value in state.items() if key.startswith(start)}
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise ArtifactError(f"{what} state does not match the config: {first}") from None
