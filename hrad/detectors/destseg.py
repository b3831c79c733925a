"""DeSTSeg: segmentation-guided denoising student-teacher (Zhang et al. CVPR 2023).

The teacher is the embedding (frozen backbone layers resized to the first layer's grid and
concatenated; ``level_channels`` splits it into levels, one level when empty).

Main deviation: DeSTSeg corrupts *images* with DRAEM's anomalies (a thresholded Perlin mask
filled with a DTD texture); this detector sees only features, so by default it corrupts the
standardised embedding (:func:`~hrad.detectors.synthetic.synthesise_anomalies`, shared with RealNet):

- mask: the top ``anomaly_fraction`` (a uniform draw) of seeded white noise blurred by a Gaussian
  of log-uniform ``sigma``, 1 to ``max(h, w) / 4`` tokens, per axis (DRAEM draws Perlin scales
  per axis). Default 1-10 %: DRAEM's masks (threshold 0.5, scales 2^0..2^5) cover a median 5.4 %
  of the image, 90 % of them 0.1-10 % (2000 draws). The mask is exact at embedding resolution
  (DeSTSeg resizes its pixel mask to the layer1 grid and thresholds it at 0.5);
- inside it DRAEM's blend ``beta * x + (1 - beta) * texture``, ``beta ~ U(0, 0.8)``, with texture
  ``sqrt(l) * donor + sqrt(1 - l) * noise``, ``l ~ U(0, 1)``: the donor is another sample of the
  batch, flipped and rolled (features from elsewhere); the noise has each channel's std;
- ``clean_probability`` 5 % of the samples stay clean (the reference corrupts every image,
  ``aug_prob=1.0``, but about 5 % of its Perlin masks are empty, measured as above; DRAEM: 50 %).

Teacher, student targets and cosines live in the standardised space (the reference compares raw
ResNet features, all positive, so every cosine is near 1; on ViTs a few massive-activation
channels would dominate). Student loss (reference ``cosine_similarity_loss``): per level the mean
``1 - cos`` to the *clean* level, summed over levels, averaged over the batch (the reference sums).
The segmentation net, trained next on the frozen student (reference schedule), reads
``-normalise(t) * normalise(s)`` per level (reference sign; ``t`` the *corrupted* teacher
features, as at test time); its loss: focal (gamma 4, no alpha) + L1 against the mask.

Other deviations:

- a small student on features, not a ResNet18 trained on images; every level comes from the last
  decoder stage at the embedding's grid (the reference reads decoder stages at native strides);
- ``segmentation_channels`` 128 (reference 256) for CPU runs; no BatchNorm in the ASPP global-pool
  branch (a 1 x 1 map of a one-sample batch has no batch statistics);
- Adam (lr 1e-3; weight decay 1e-4 as the reference) instead of its SGD (momentum 0.9; lr 0.4 student,
  0.1 / 0.01 segmentation blocks / head), whose rates suit a batch-*summed* loss at batch 32 over
  thousands of steps; strategies pass varying batch sizes for few epochs, and Adam ignores scale;
- focal loss from logits with ``logsigmoid`` (the reference's BCE on sigmoid outputs clamps the log
  at -100); ``anomaly_map="student"`` sums the levels' ``1 - cos`` (the reference's DeST map
  multiplies them); image score ``top_mean`` of the top 1 % tokens (reference: the top 100 pixels
  of 256 x 256, 0.15 %).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from hrad.detectors.base import backbone_layers
from hrad.detectors.neural import Stage, StandardisedNet, conv_bn_relu
from hrad.detectors.scoring import ImageScore, cosine_distances
from hrad.detectors.synthetic import SyntheticAnomalyConfig, SyntheticAnomalyDetector
from hrad.errors import ConfigError
from hrad.features.base import EmbeddingSpec, FeatureExtractor
from hrad.imaging import resize


class DeSTSegConfig(SyntheticAnomalyConfig):
    """Typed DeSTSeg options; defaults follow the paper / reference code unless noted."""

    name: Literal["destseg"] = "destseg"
    #: epochs of the denoising student (step 1); the reference trains 1000 steps of batch 32
    student_epochs: int = Field(default=20, ge=1)
    #: epochs of the segmentation net (step 2); the reference trains 4000 steps, 4x the student's.
    #: 0 = skip it (only with anomaly_map="student"). Measured on capsules (downsample 512,
    #: Lite0, 10 images, 10 student epochs): 5 epochs give pixel AUROC 0.57, 40 give 0.98
    #: (benchmarks/results/destseg_schedule.md)
    segmentation_epochs: int = Field(default=40, ge=0)
    #: Adam learning rate of the denoising student
    student_lr: float = Field(default=1e-3, gt=0)
    #: Adam learning rate of the segmentation net
    segmentation_lr: float = Field(default=1e-3, gt=0)
    #: Adam weight decay of both networks
    weight_decay: float = Field(default=1e-4, ge=0)
    #: width of the student's first stage (doubled at every stride-2 stage)
    student_channels: int = Field(default=128, ge=1)
    #: stride-2 stages of the student encoder (and decoder)
    student_stages: int = Field(default=2, ge=0)
    #: width of the segmentation net
    segmentation_channels: int = Field(default=128, ge=1)
    #: "segmentation": the segmentation net's output; "student": teacher-student 1 - cos
    anomaly_map: Literal["segmentation", "student"] = "segmentation"
    image_score: ImageScore = "top_mean"


class BasicBlock(nn.Module):
    """ResNet basic block (conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU), as in the reference."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DenoisingStudent(nn.Module):
    """Corrupted embedding -> clean levels: a 1x1 stem, ``stages`` stride-2 basic blocks doubling the
    width, the mirror decoder (bilinear resizing, no skip connections), a linear 1x1 head per level."""

    def __init__(self, channels: int, level_sizes: Sequence[int], width: int, stages: int) -> None:
        super().__init__()
        widths = [width * 2**stage for stage in range(stages + 1)]
        self.stem = conv_bn_relu(channels, width, 1)
        self.encoder = nn.ModuleList(
            BasicBlock(widths[stage], widths[stage + 1], stride=2) for stage in range(stages)
        )
        self.decoder = nn.ModuleList(BasicBlock(widths[stage + 1], widths[stage]) for stage in range(stages))
        self.heads = nn.ModuleList(nn.Conv2d(width, size, 1) for size in level_sizes)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        sizes = []
        for block in self.encoder:
            sizes.append(x.shape[-2:])
            x = block(x)
        for block, size in zip(reversed(self.decoder), reversed(sizes), strict=True):
            x = block(resize(x, (size[0], size[1])))
        return [head(x) for head in self.heads]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (reference): global-pool branch + one dilated conv per rate."""

    def __init__(self, channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        # no BatchNorm here: a pooled 1 x 1 map of a one-sample batch has no batch statistics
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.ReLU())
        self.branches = nn.ModuleList(conv_bn_relu(channels, channels, 3, rate) for rate in rates)
        self.fusion = conv_bn_relu((1 + len(rates)) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pooled(x).expand(-1, -1, *x.shape[-2:])
        return self.fusion(torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1))


class SegmentationNet(nn.Module):
    """Two basic blocks, ASPP, conv3x3-BN-ReLU and a 1x1 conv to one anomaly logit per position."""

    def __init__(self, channels: int, width: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.res = nn.Sequential(BasicBlock(channels, width), BasicBlock(width, width))
        self.head = nn.Sequential(ASPP(width, rates), conv_bn_relu(width, width, 3), nn.Conv2d(width, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.res(x)).squeeze(1)


class DeSTSegNet(StandardisedNet):
    def __init__(self, level_sizes: Sequence[int], config: DeSTSegConfig) -> None:
        channels = sum(level_sizes)
        super().__init__(channels)
        self.level_sizes = list(level_sizes)
        self.student = DenoisingStudent(channels, level_sizes, config.student_channels, config.student_stages)
        self.segmentation = SegmentationNet(channels, config.segmentation_channels, config.aspp_rates)

    def levels(self, features: Tensor) -> list[Tensor]:
        return list(features.split(self.level_sizes, dim=1))

    def segmentation_logits(self, teacher: Tensor, student: Sequence[Tensor]) -> Tensor:
        """Segmentation input per level: ``-normalise(t) * normalise(s)`` (reference), concatenated."""
        products = [
            -F.normalize(t, dim=1) * F.normalize(s, dim=1)
            for t, s in zip(self.levels(teacher), student, strict=True)
        ]
        return self.segmentation(torch.cat(products, dim=1))


def _train_only(model: nn.Module, part: str) -> None:
    """Training mode for one sub-network, eval mode (running BatchNorm statistics) for the rest."""
    model.eval()
    getattr(model, part).train()


class DeSTSeg(SyntheticAnomalyDetector[DeSTSegConfig, DeSTSegNet]):
    """Denoising student + segmentation net on synthetic anomalies; see the module docstring."""

    state_prefix = "model"

    @property
    def student_loss_history(self) -> list[float]:
        """Mean cosine loss per student epoch."""
        return self.stage_losses.get("student", [])

    @property
    def segmentation_loss_history(self) -> list[float]:
        """Mean focal + L1 loss per segmentation epoch."""
        return self.stage_losses.get("segmentation", [])

    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        """CNN: layer1..3, DeSTSeg's own choice: its fine localisation relies on layer1's stride-4
        grid (HiAD's Table II uses layer2 + layer3; set ``layers`` for that). ViT: three blocks at
        1/4, 1/2 and 3/4 of the depth."""
        return backbone_layers(extractor, ("layer1", "layer2", "layer3"), (1 / 4, 1 / 2, 3 / 4))

    def build_network(self, layout: list[int]) -> DeSTSegNet:
        return DeSTSegNet(layout, self.config)

    def before_fit(self, batches: Iterable[Tensor]) -> None:
        """Checks, then per-channel mean and std over every training position and the networks."""
        if self.config.segmentation_epochs == 0 and self.config.anomaly_map == "segmentation":
            raise ConfigError(
                'destseg anomaly_map="segmentation" needs segmentation_epochs >= 1; use anomaly_map="student"'
            )
        self.fit_standardisation(batches)

    def check_batch(self, embeddings: Tensor) -> None:
        """The student's stride-2 stages must leave its BatchNorm more than one value per channel."""
        self.check_bottleneck(embeddings, self.config.student_stages, "student_stages", "student")

    def _student_step(self, embeddings: Tensor) -> Tensor:
        model = self.fitted_network()
        clean, corrupted, _ = self.corrupt(embeddings)
        distances = cosine_distances(model.levels(clean), model.student(corrupted))
        return distances.mean(dim=(2, 3)).sum(dim=0).mean()  # levels summed, batch averaged

    def _segmentation_step(self, embeddings: Tensor) -> Tensor:
        model = self.fitted_network()
        _, corrupted, masks = self.corrupt(embeddings)
        with torch.no_grad():
            student = model.student(corrupted)
        return self.segmentation_loss(model.segmentation_logits(corrupted, student), masks)

    def training_stages(self) -> list[Stage]:
        """The reference schedule: the student alone, then the segmentation net on a frozen student."""
        config = self.config

        def stage(part: str, epochs: int, step: Callable[[Tensor], Tensor], lr: float) -> Stage:
            def adam() -> list[torch.optim.Optimizer]:
                parameters = getattr(self.fitted_network(), part).parameters()
                return [torch.optim.Adam(parameters, lr=lr, weight_decay=config.weight_decay)]

            return Stage(part, epochs, step, adam, train=partial(_train_only, part=part))

        return [
            stage("student", config.student_epochs, self._student_step, config.student_lr),
            stage("segmentation", config.segmentation_epochs, self._segmentation_step, config.segmentation_lr),
        ]

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        model = self.fitted_network()
        teacher = model.standardise(embeddings)
        student = model.student(teacher)
        if self.config.anomaly_map == "student":
            return cosine_distances(model.levels(teacher), student).sum(dim=0)
        return torch.sigmoid(model.segmentation_logits(teacher, student))
