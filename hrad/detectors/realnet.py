"""RealNet: feature selection with realistic synthetic anomalies (Zhang, Xu & Zhou, CVPR 2024).

RealNet has three parts: strength-controllable diffusion anomaly synthesis (SDAS) makes
anomalous training images; anomaly-aware feature selection (AFS) keeps the backbone channels
that react most to anomalies; per layer a reconstruction network rebuilds normal features from
anomalous ones, reconstruction-residual selection (RRS) keeps the most telling residual
channels, and a discriminator segments the anomalies from them.

This detector only sees embeddings (frozen backbone layers resized to the first layer's grid
and concatenated; ``level_channels`` gives the split, one level per backbone layer). Its parts:

1. per-channel standardisation with the training set's statistics (a first pass, saved);
2. **synthesis**, ``synthesis="image"`` (default): DRAEM-style Perlin anomalies pasted into
   the training tiles by the strategy (the donor is the previous training tile, flipped and
   colour-jittered, not shifted: a wrap-around shift's seam taught the discriminator to fire on
   straight lines; :mod:`hrad.data.anomalies`), embedded by the same backbone and handed over with each
   token's exact mask fraction, drawn once per fit (the same corrupted tiles every epoch).
   ``synthesis="feature"``: in feature space, DeSTSeg's
   (:func:`~hrad.detectors.synthetic.synthesise_anomalies`): smooth random masks covering
   ``anomaly_fraction`` of the grid, inside which the features become a blend of another
   sample's features and noise, fresh every batch; masks are exact at embedding resolution. *Deviation*: SDAS samples anomalies from a diffusion
   model trained on the images; neither form is that. Measured on capsules, see below;
3. **AFS**: a second pass synthesises anomalies on every training batch (or, with
   ``synthesis="image"``, takes the strategy's corrupted tiles) and scores each
   channel of each level by its mean squared change inside the masks (the features are
   standardised, so this is the change in units of the channel's normal spread); the top
   ``selection_ratio`` of each level's channels are kept (saved as indices). *Deviation*: the
   paper searches channel subsets by their reconstruction error on synthetic anomalies; here
   the per-channel sensitivity ranks them directly, without training reconstructions first.
   On standardised features the synthetic change of a channel is large where the channel
   differs between samples and locations (the donor comes from elsewhere), so with this
   synthesis AFS favours local, position-specific channels; it cannot learn which channels
   real defects move, which the paper's realistic anomalies are for;
4. **reconstruction**: per level an encoder-decoder (DeSTSeg's student architecture:
   ``reconstruction_stages`` stride-2 ResNet blocks from ``reconstruction_channels`` wide, the
   mirror decoder, a 1x1 head) maps the selected features of the corrupted embedding to the
   selected clean features; loss: mean squared error (paper: MSE);
5. **RRS**: squared residuals of every selected channel of every level, concatenated; per
   sample, each residual channel scores ``max + mean`` over the grid (global max and average
   pooling, as the paper) and the ``residual_channels`` best are kept, in score order;
6. **discriminator**: DeSTSeg's segmentation net (two ResNet blocks, ASPP, 1x1 logit) on the
   selected residuals; loss: focal (gamma ``focal_gamma``) + L1 on the sigmoid against the
   synthetic mask (paper: a segmentation loss on the synthetic masks). The residuals enter the
   discriminator detached, so the reconstruction is trained by its own loss only.

One stage trains both parts jointly for ``epochs`` epochs with Adam (paper: the same joint
training; its 30,000 iterations at batch 16 on GPUs are out of reach on CPU). Map: the
discriminator's sigmoid at embedding resolution; image score: the maximum (HiAD's setting for
RealNet); upsampling and blur are the strategy's / post-processing's.

Other deviations: widths and depths of the networks are configurable and small by default (the
paper's reconstructions are UNets at each WRN50 layer's own resolution; here every level is at
the embedding's grid); AFS ratio 0.5 per level (the paper keeps a fixed channel count per
layer).

Feature vs image synthesis, capsules, few-shot (8 fitted images, 10 epochs, Lite0, 12 test
images; ``benchmarks/results/realnet_synthesis_v2/``): AUPRO@30 feature -> image HiAD
0.417 -> 0.800, downsampling 0.369 -> 0.730, tiled ensemble 0.325 -> 0.739, image AUROC
0.528 -> 0.556, 0.556 -> 0.556, 0.361 -> 0.500 (downsampling, 40 test images: AUPRO@30
0.208 -> 0.832, image AUROC 0.472 -> 0.635), so ``image`` is the default. With the donor still
rolled (``realnet_synthesis/``) image AUROC had fallen below chance in the HiAD and downsampling
rows (0.222, 0.306). ``feature`` is needed to fit on plain embeddings without a strategy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import backbone_layers
from hrad.detectors.destseg import DenoisingStudent, SegmentationNet
from hrad.detectors.neural import EpochsConfig, StandardisedNet
from hrad.detectors.synthetic import SyntheticAnomalyConfig, SyntheticAnomalyDetector
from hrad.errors import ArtifactError
from hrad.features.base import EmbeddingSpec, FeatureExtractor


class RealNetConfig(SyntheticAnomalyConfig, EpochsConfig):
    """Typed RealNet options; see the module docstring for every deviation from the paper."""

    name: Literal["realnet"] = "realnet"
    #: where the synthetic anomalies are made: "image" (default) = DRAEM-style Perlin anomalies
    #: pasted into the training tiles by the strategy; "feature" = DeSTSeg's feature-space
    #: synthesis (needed to fit on plain embeddings without a strategy). Image won on AUPRO@30 in
    #: every measured capsule row (benchmarks/results/realnet_synthesis_v2/)
    synthesis: Literal["feature", "image"] = "image"
    #: Adam learning rate of both networks
    lr: float = Field(default=1e-3, gt=0)
    #: Adam weight decay of both networks
    weight_decay: float = Field(default=1e-4, ge=0)
    #: fraction of each level's channels kept by anomaly-aware feature selection (AFS)
    selection_ratio: float = Field(default=0.5, gt=0, le=1)
    #: width of the first stage of each level's reconstruction network (doubled per stage)
    reconstruction_channels: int = Field(default=64, ge=1)
    #: stride-2 stages of each reconstruction network
    reconstruction_stages: int = Field(default=1, ge=0)
    #: residual channels kept per sample by reconstruction-residual selection (RRS); capped at
    #: the number of selected channels
    residual_channels: int = Field(default=64, ge=1)
    #: width of the discriminator
    discriminator_channels: int = Field(default=64, ge=1)
    #: dilation rates of the discriminator's ASPP branches
    aspp_rates: tuple[int, ...] = (2, 4)


def selected_count(channels: int, ratio: float) -> int:
    return max(1, round(ratio * channels))


def residual_selection(residuals: Tensor, count: int) -> Tensor:
    """RRS: per sample, the ``count`` residual channels with the highest ``max + mean`` over the
    grid, in descending score order: ``B x C x h x w`` -> ``B x count x h x w``."""
    scores = residuals.amax(dim=(2, 3)) + residuals.mean(dim=(2, 3))
    order = scores.topk(count, dim=1).indices
    return torch.gather(residuals, 1, order[:, :, None, None].expand(-1, -1, *residuals.shape[-2:]))


class RealNetNet(StandardisedNet):
    """Standardisation, selected channels, per-level reconstructions and the discriminator."""

    selected: Tensor

    def __init__(self, layout: list[int], config: RealNetConfig) -> None:
        super().__init__(sum(layout))
        self.kept = [selected_count(size, config.selection_ratio) for size in layout]
        self.residual_count = min(config.residual_channels, sum(self.kept))
        # indices into the whole embedding, level by level; filled by AFS
        first = torch.cumsum(torch.tensor([0, *layout[:-1]]), 0)
        self.register_buffer(
            "selected",
            torch.cat([start + torch.arange(kept) for start, kept in zip(first, self.kept, strict=True)]),
        )
        width, stages = config.reconstruction_channels, config.reconstruction_stages
        self.reconstructions = nn.ModuleList(
            DenoisingStudent(kept, [kept], width, stages) for kept in self.kept
        )
        self.discriminator = SegmentationNet(
            self.residual_count, config.discriminator_channels, config.aspp_rates
        )

    def select(self, features: Tensor) -> list[Tensor]:
        """The AFS-selected channels of standardised features, one tensor per level."""
        return list(features.index_select(1, self.selected).split(self.kept, dim=1))

    def residuals(self, selected: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Squared reconstruction residuals of all levels (concatenated) and the reconstructions."""
        rebuilt = [network(level)[0] for network, level in zip(self.reconstructions, selected, strict=True)]
        squared = [(level - again).pow(2) for level, again in zip(selected, rebuilt, strict=True)]
        return torch.cat(squared, dim=1), rebuilt

    def logits(self, residuals: Tensor) -> Tensor:
        return self.discriminator(residual_selection(residuals, self.residual_count))


class RealNet(SyntheticAnomalyDetector[RealNetConfig, RealNetNet]):
    """Reconstruction of normal features from synthetic-anomalous ones, AFS, RRS and a
    discriminator; see the module docstring."""

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        """CNN: layer2 + layer3 without aggregation (HiAD Table II: WRN50 Layer2, Layer3). ViT:
        blocks at 1/2 and 3/4 of the depth, their token analogue."""
        return backbone_layers(extractor, ("layer2", "layer3"), (1 / 2, 3 / 4))

    def build_network(self, layout: list[int]) -> RealNetNet:
        return RealNetNet(layout, self.config)

    def check_batch(self, embeddings: Tensor) -> None:
        """The reconstructions' stride-2 stages must leave BatchNorm more than one value per channel."""
        self.check_bottleneck(
            embeddings, self.config.reconstruction_stages, "reconstruction_stages", "reconstruction"
        )

    def before_fit(self, batches: Iterable[Tensor]) -> None:
        """Standardisation statistics, the networks, then AFS on synthetic anomalies."""
        network = self.fit_standardisation(batches)
        device = network.mean.device
        change = torch.zeros(network.mean.numel(), dtype=torch.float64, device=device)
        area = 0.0
        for batch in batches:
            clean, corrupted, masks = self.corrupt(batch.to(device).float())
            change += ((corrupted - clean).pow(2) * masks[:, None]).sum(dim=(0, 2, 3)).double()
            area += float(masks.sum())
        sensitivity = change / max(area, 1.0)
        selected, start = [], 0
        for size, kept in zip(self.layout, network.kept, strict=True):
            best = sensitivity[start : start + size].topk(kept).indices.sort().values
            selected.append(start + best)
            start += size
        network.selected.copy_(torch.cat(selected))

    def training_step(self, embeddings: Tensor) -> Tensor:
        network = self.fitted_network()
        clean, corrupted, masks = self.corrupt(embeddings)
        targets = network.select(clean)
        corrupted_levels = network.select(corrupted)
        _, rebuilt = network.residuals(corrupted_levels)
        reconstruction = sum(
            (F.mse_loss(again, target) for again, target in zip(rebuilt, targets, strict=True)),
            start=embeddings.new_zeros(()),
        )
        residuals = torch.cat(
            [(level - again.detach()).pow(2) for level, again in zip(corrupted_levels, rebuilt, strict=True)],
            dim=1,
        )
        return reconstruction + self.segmentation_loss(network.logits(residuals), masks)

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        network = self.fitted_network()
        residuals, _ = network.residuals(network.select(network.standardise(embeddings)))
        return torch.sigmoid(network.logits(residuals))

    def check_loaded(self, network: RealNetNet) -> None:
        super().check_loaded(network)
        if int(network.selected.min()) < 0 or int(network.selected.max()) >= network.mean.shape[1]:
            raise ArtifactError("realnet state entry network.selected indexes channels outside the embedding")
