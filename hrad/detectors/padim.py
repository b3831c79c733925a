"""PaDiM (Defard et al., ICPR 2021): one Gaussian per feature-grid position.

Fit: a seeded random subset of ``n_features`` embedding channels; at every position the mean
and covariance (+ ``covariance_eps`` * I, the paper's 0.01) of the good images' features,
accumulated as float64 sums and outer-product sums so fit memory does not grow with the number
of images. Predict: the Mahalanobis distance of each position's feature to its Gaussian; the
image score is the map's maximum. The model is bound to the fitted grid size: strategies resize
their inputs consistently, and other grid sizes are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from hrad.detectors.base import Detector, DetectorConfig, DetectorOutput, backbone_layers
from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.features.base import EmbeddingSpec, FeatureExtractor

STATE_KEYS = ("mean", "inv_covariance", "channel_indices", "grid_size")


class PaDiMConfig(DetectorConfig):
    name: Literal["padim"] = "padim"
    #: random channel subset size (paper: 100 for ResNet18, 550 for WRN50); capped at the channels available
    n_features: int = Field(default=100, ge=1)
    #: added to every covariance diagonal (paper: 0.01) so it is invertible
    covariance_eps: float = Field(default=0.01, gt=0.0)
    #: positions processed at once in predict (bounds the ``positions x B x d`` temporary)
    position_batch: int = Field(default=4096, ge=1)


class PaDiM(Detector[PaDiMConfig]):
    """Per-position Gaussian detector; see the module docstring."""

    def __init__(self, config: PaDiMConfig) -> None:
        super().__init__(config)
        self.mean: Tensor | None = None  # positions x d
        self.inv_covariance: Tensor | None = None  # positions x d x d
        self.channel_indices: Tensor | None = None
        self.grid_size: tuple[int, int] | None = None

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        """CNN: layer1..layer3 without aggregation (paper). ViT: three blocks at 1/4, 1/2 and 3/4
        of the depth, the transformer analogue of a low-to-high feature pyramid."""
        return backbone_layers(extractor, ("layer1", "layer2", "layer3"), (1 / 4, 1 / 2, 3 / 4))

    def fit(self, batches: Iterable[Tensor]) -> None:
        count = 0
        shift: Tensor | None = None
        sums = outer_sums = torch.empty(0, dtype=torch.float64)
        self.channel_indices = self.grid_size = None  # a refit starts from scratch
        for batch in batches:
            if batch.ndim != 4:
                raise InputError(f"PaDiM expects B x C x h x w embeddings, got shape {tuple(batch.shape)}")
            if self.channel_indices is None or self.grid_size is None:
                self.channel_indices = choose_channels(batch.shape[1], self.config.n_features, self.config.seed)
                self.grid_size = (int(batch.shape[2]), int(batch.shape[3]))
            self._check_shape(batch)
            features = self._select(batch).to(torch.float64)  # B x positions x d
            if shift is None:
                # accumulating around a first estimate of the mean avoids cancellation in E[xx^T] - mm^T
                shift = features.mean(dim=0)
                sums = torch.zeros_like(shift)
                outer_sums = torch.zeros(shift.shape[0], shift.shape[1], shift.shape[1], dtype=torch.float64)
            centered = (features - shift).transpose(0, 1)  # positions x B x d
            sums += centered.sum(dim=1)
            outer_sums += centered.transpose(1, 2) @ centered
            count += features.shape[0]
        if shift is None:
            raise InputError("no embeddings to fit on: the training set is empty")
        centered_mean = sums / count
        covariance = (outer_sums - count * centered_mean[:, :, None] * centered_mean[:, None, :]) / max(count - 1, 1)
        dim = covariance.shape[1]
        covariance += self.config.covariance_eps * torch.eye(dim, dtype=torch.float64)
        self.mean = (shift + centered_mean).to(torch.float32)
        self.inv_covariance = torch.cholesky_inverse(torch.linalg.cholesky(covariance)).to(torch.float32)

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        if self.mean is None or self.inv_covariance is None or self.grid_size is None:
            raise RuntimeError("PaDiM.predict called before fit or load_state_dict")
        if embeddings.ndim != 4:
            raise InputError(f"PaDiM expects B x C x h x w embeddings, got shape {tuple(embeddings.shape)}")
        self._check_shape(embeddings)
        device = embeddings.device
        features = self._select(embeddings).to(torch.float32).transpose(0, 1)  # positions x B x d
        mean = self.mean.to(device)
        inv_covariance = self.inv_covariance.to(device)
        parts = []
        chunks = (part.split(self.config.position_batch) for part in (features, mean, inv_covariance))
        for chunk, chunk_mean, chunk_inverse in zip(*chunks, strict=True):
            delta = chunk - chunk_mean[:, None, :]
            parts.append(((delta @ chunk_inverse) * delta).sum(dim=2))
        distances = torch.cat(parts).clamp_(min=0.0).sqrt_().transpose(0, 1)  # B x positions
        maps = distances.reshape(embeddings.shape[0], *self.grid_size)
        return DetectorOutput(maps=maps, scores=distances.amax(dim=1))

    def _select(self, embeddings: Tensor) -> Tensor:
        """``B x C x h x w`` -> ``B x positions x d`` on the chosen channels."""
        assert self.channel_indices is not None
        chosen = embeddings.detach().index_select(1, self.channel_indices.to(embeddings.device))
        return chosen.flatten(2).transpose(1, 2)

    def _check_shape(self, embeddings: Tensor) -> None:
        assert self.channel_indices is not None and self.grid_size is not None
        height, width = int(embeddings.shape[2]), int(embeddings.shape[3])
        if (height, width) != self.grid_size:
            fitted_h, fitted_w = self.grid_size
            raise ConfigError(
                f"PaDiM was fitted on a {fitted_h}x{fitted_w} feature grid but got {height}x{width}; "
                "it models each grid position, so inputs must be resized to the fitted size"
            )
        needed = int(self.channel_indices.max()) + 1
        if embeddings.shape[1] < needed:
            raise ConfigError(
                f"PaDiM was fitted on embeddings with at least {needed} channels but got {embeddings.shape[1]}; "
                "the backbone or layers differ from the ones used for fitting"
            )

    def state_dict(self) -> dict[str, Tensor]:
        if self.mean is None or self.inv_covariance is None or self.channel_indices is None or self.grid_size is None:
            raise RuntimeError("PaDiM.state_dict called before fit")
        return {
            "mean": self.mean.clone(),
            "inv_covariance": self.inv_covariance.clone(),
            "channel_indices": self.channel_indices.clone(),
            "grid_size": torch.tensor(self.grid_size, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ArtifactError(f"PaDiM state lacks {', '.join(missing)}; the artifact is incomplete or not PaDiM")
        grid = state["grid_size"].tolist()
        self.grid_size = (int(grid[0]), int(grid[1]))
        self.mean = state["mean"].to(torch.float32)
        self.inv_covariance = state["inv_covariance"].to(torch.float32)
        self.channel_indices = state["channel_indices"].to(torch.long)
        positions = self.grid_size[0] * self.grid_size[1]
        dim = len(self.channel_indices)
        if self.mean.shape != (positions, dim) or self.inv_covariance.shape != (positions, dim, dim):
            raise ArtifactError(
                f"PaDiM state shapes disagree: mean {tuple(self.mean.shape)}, inverse covariance "
                f"{tuple(self.inv_covariance.shape)} for a {grid[0]}x{grid[1]} grid and {dim} channels"
            )


def choose_channels(available: int, wanted: int, seed: int) -> Tensor:
    """Sorted seeded random subset of ``min(wanted, available)`` channel indices."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=generator)[: min(wanted, available)].sort().values
