"""The RD++ detector: its options, the training step (distillation + projection losses with the
reference's weights) and the map; see :mod:`hrad.detectors.rdpp` for the method."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from hrad.detectors.base import backbone_layers
from hrad.detectors.neural import EpochsConfig, NeuralDetector, Stage, check_fraction_range
from hrad.detectors.rdpp.loss import noise_features, sinkhorn_divergence
from hrad.detectors.rdpp.network import RDPlusPlusNet, pyramid_sizes, teacher_pyramid
from hrad.detectors.scoring import cosine_distances, cosine_loss
from hrad.errors import InputError
from hrad.features.base import EmbeddingSpec, FeatureExtractor

#: the reference divides its projection losses by the sum of their weights (1 + 0.01 + 0.1)
REFERENCE_PROJECTION_NORMALISER = 1.11
#: the reference noise box: 10..31 px sides on a 256 px image
REFERENCE_NOISE_EXTENT = (10 / 256, 32 / 256)


class RDPlusPlusConfig(EpochsConfig):
    """Typed RD++ options; defaults follow the reference code unless the package docstring says otherwise."""

    name: Literal["rdpp"] = "rdpp"
    #: Adam lr of the bottleneck and decoder (reference ``distill_lr``)
    lr: float = Field(default=0.005, gt=0)
    #: Adam lr of the projection layers (reference ``proj_lr``)
    projection_lr: float = Field(default=0.001, gt=0)
    #: Adam betas
    betas: tuple[float, float] = (0.5, 0.999)
    #: projection hidden widths are c/d, c/2d, c/d (reference d = 2)
    projection_divisor: int = Field(default=2, ge=1)
    #: width of the one-class embedding; None = the widest level
    bottleneck_channels: int | None = Field(default=None, ge=1)
    #: residual blocks in the one-class bottleneck
    bottleneck_blocks: int = Field(default=3, ge=1)
    #: extra downsampling of the fused coarsest level (RD: 2)
    bottleneck_stride: Literal[1, 2] = 2
    #: residual blocks per decoder stage (RD: 3/4/6)
    decoder_blocks: int = Field(default=2, ge=1)
    #: residual blocks work at out_channels / block_reduction inside (ResNet bottleneck: 4)
    block_reduction: int = Field(default=4, ge=1)
    #: "both": per-position + flattened 1 - cos (RD paper + code); "flattened": RD/RD++ code; "position": RD paper
    distill_loss: Literal["both", "flattened", "position"] = "both"
    #: weight of the projection losses against the distillation loss (reference ``weight_proj``)
    projection_weight: float = Field(default=0.2, ge=0)
    #: weight of the pairwise Sinkhorn (SSOT) loss; 0 = off
    ssot_weight: float = Field(default=1.0, ge=0)
    #: weight of L_recon on noisy features; 0 = off
    noise_reconstruction_weight: float = Field(default=0.01, ge=0)
    #: weight of L_contrast on noisy features; 0 = off
    noise_contrast_weight: float = Field(default=0.1, ge=0)
    #: margin of the cosine-embedding contrast loss (reference -0.5)
    contrast_margin: float = -0.5
    #: target blur of the Sinkhorn divergence (geomloss blur)
    ssot_blur: float = Field(default=0.05, gt=0)
    #: epsilon-scaling factor of the Sinkhorn annealing (geomloss scaling)
    ssot_scaling: float = Field(default=0.95, gt=0, lt=1)
    #: Sinkhorn iterations at the target blur after the annealing
    ssot_iterations: int = Field(default=20, ge=1)
    #: tokens per sample in the OT problems (random subset when the grid has more)
    ssot_points: int = Field(default=256, ge=2)
    #: noise std in units of each channel's std
    noise_amplitude: float = Field(default=1.0, ge=0)
    #: spatial smoothness of the noise: Gaussian blur sigma in tokens (0 = white)
    noise_sigma: float = Field(default=1.0, ge=0)
    #: range of the noise box sides as fractions of the grid sides
    noise_extent: tuple[float, float] = REFERENCE_NOISE_EXTENT
    #: levels' 1 - cos maps are summed or averaged into the anomaly map
    map_reduction: Literal["sum", "mean"] = "sum"

    @model_validator(mode="after")
    def _check_extent(self) -> RDPlusPlusConfig:
        check_fraction_range(self, "noise_extent")
        return self


class RDPlusPlus(NeuralDetector[RDPlusPlusConfig, RDPlusPlusNet]):
    """Reverse distillation with multi-scale projection, SSOT and feature-noise losses (RD++)."""

    state_prefix = "net"

    def __init__(self, config: RDPlusPlusConfig) -> None:
        super().__init__(config)
        #: mean of each loss term per epoch ("distill", "ssot", "noise_reconstruction", "noise_contrast")
        self.term_history: list[dict[str, float]] = []
        self._terms: dict[str, list[float]] = {}

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        """CNN: layer2 + layer3 without aggregation (HiAD Table II: WRN50 Layer2, Layer3). ViT:
        blocks at 1/2 and 3/4 of the depth, the token analogue of layer2 / layer3."""
        return backbone_layers(extractor, ("layer2", "layer3"), (1 / 2, 3 / 4))

    def build_network(self, layout: list[int]) -> RDPlusPlusNet:
        return RDPlusPlusNet(layout, self.config)

    def check_batch(self, embeddings: Tensor) -> None:
        height, width = embeddings.shape[-2:]
        # the bottleneck stride (1 or 2) halves the coarsest level once more, as one more level would
        rows, columns = pyramid_sizes(height, width, len(self.layout) + self.config.bottleneck_stride - 1)[-1]
        if rows * columns < 2:
            raise InputError(
                f"rdpp cannot train on a {height}x{width} embedding grid with {len(self.layout)} level(s):"
                " the bottleneck would be 1x1; use larger inputs, fewer levels or bottleneck_stride=1"
            )

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The reference's two Adam optimisers, both stepping on the total loss."""
        config, net = self.config, self.fitted_network()
        return [
            torch.optim.Adam(net.projections.parameters(), lr=config.projection_lr, betas=config.betas),
            torch.optim.Adam(net.distillation_parameters(), lr=config.lr, betas=config.betas),
        ]

    def before_fit(self, batches: Iterable[Tensor]) -> None:
        self.term_history, self._terms = [], {}

    def training_state(self) -> dict[str, Any]:
        """The per-epoch means of the loss terms so far."""
        return {"term_history": list(self.term_history)}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.term_history = list(state["term_history"])

    def end_epoch(self, stage: Stage, epoch: int, loss: float) -> bool:
        self.term_history.append({key: sum(values) / len(values) for key, values in self._terms.items()})
        self._terms = {}
        return False

    def _ssot_loss(self, projected: list[Tensor]) -> Tensor:
        """Debiased Sinkhorn divergence between each sample's token cloud and its partner's."""
        config, generator = self.config, self.generator
        batch = projected[0].shape[0]
        device = projected[0].device
        shift = int(torch.randint(1, batch, (1,), generator=generator, device=device))
        partner = (torch.arange(batch, device=device) + shift) % batch
        total = projected[0].new_zeros(())
        for level in projected:
            tokens = torch.softmax(level, dim=1).flatten(2).transpose(1, 2)  # B x hw x C
            count = tokens.shape[1]
            if count > config.ssot_points:
                draws = (torch.randperm(count, generator=generator, device=device) for _ in range(batch))
                rows = [row[draw[: config.ssot_points]] for row, draw in zip(tokens, draws, strict=True)]
                tokens = torch.stack(rows)
            divergence = sinkhorn_divergence(
                tokens, tokens[partner], config.ssot_blur, config.ssot_scaling, config.ssot_iterations
            )
            total = total + divergence.mean()
        return total

    def _noise_terms(self, embeddings: Tensor, projected: list[Tensor]) -> dict[str, Tensor]:
        """L_recon and L_contrast on the noisy teacher features (each only when weighted)."""
        config = self.config
        terms: dict[str, Tensor] = {}
        if config.noise_reconstruction_weight == 0 and config.noise_contrast_weight == 0:
            return terms
        noise = (config.noise_amplitude, config.noise_sigma, config.noise_extent, self.generator)
        noisy = teacher_pyramid(self.split(noise_features(embeddings, *noise)))
        zero = embeddings.new_zeros(())
        if config.noise_reconstruction_weight > 0:
            pairs = zip(self.fitted_network().project(noisy), projected, strict=True)
            terms["noise_reconstruction"] = sum(
                ((1 - F.cosine_similarity(p_noisy, p_clean, dim=1)).mean() for p_noisy, p_clean in pairs),
                zero,
            )
        if config.noise_contrast_weight > 0:
            negative = -torch.ones(embeddings.shape[0], device=embeddings.device)
            margin = config.contrast_margin
            pairs = zip(noisy, projected, strict=True)
            terms["noise_contrast"] = sum(
                (
                    F.cosine_embedding_loss(n.flatten(1), p.flatten(1), negative, margin=margin)
                    for n, p in pairs
                ),
                zero,
            )
        return terms

    def training_step(self, embeddings: Tensor) -> Tensor:
        config, net = self.config, self.fitted_network()
        teacher = self.split(embeddings)
        projected = net.project(teacher_pyramid(teacher))
        mode = config.distill_loss
        distill = cosine_loss(
            teacher, net.reconstruct(projected), mode in ("both", "position"), mode in ("both", "flattened")
        )
        terms = {"distill": distill}
        if config.projection_weight > 0 and config.ssot_weight > 0 and embeddings.shape[0] > 1:
            terms["ssot"] = self._ssot_loss(projected)
        if config.projection_weight > 0:
            terms.update(self._noise_terms(embeddings, projected))
        for key, value in terms.items():
            self._terms.setdefault(key, []).append(float(value.detach()))
        weights = {
            "ssot": config.ssot_weight,
            "noise_reconstruction": config.noise_reconstruction_weight,
            "noise_contrast": config.noise_contrast_weight,
        }
        zero = distill.new_zeros(())
        projection = sum((weight * terms[key] for key, weight in weights.items() if key in terms), zero)
        return distill + config.projection_weight * projection / REFERENCE_PROJECTION_NORMALISER

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        net = self.fitted_network()
        teacher = self.split(embeddings)
        per_level = cosine_distances(teacher, net.reconstruct(net.project(teacher_pyramid(teacher))))
        return per_level.sum(0) if self.config.map_reduction == "sum" else per_level.mean(0)
