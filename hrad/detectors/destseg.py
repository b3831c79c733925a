"""DeSTSeg: segmentation-guided denoising student-teacher (Zhang et al. CVPR 2023).

Main deviation: anomaly synthesis moves from image space to feature space. DeSTSeg corrupts
*images* with DRAEM's anomalies (a thresholded Perlin-noise mask filled with a DTD texture) and
feeds the corrupted image to a student encoder. This detector only ever sees the teacher's
features (the embedding: frozen backbone layers, each resized to the first layer's grid and
concatenated), so a synthetic anomaly is made on the standardised embedding instead
(:func:`~hrad.detectors.synthetic.synthesise_anomalies`, shared with RealNet):

- the mask is a superlevel set of seeded white noise blurred by a Gaussian (independent,
  log-uniform ``sigma`` of 1 to ``max(h, w) / 4`` tokens per axis, as DRAEM draws independent
  Perlin scales per axis), thresholded so that it covers a uniform random fraction of the grid
  in ``anomaly_fraction``. Default 1-10 %: DRAEM's masks (threshold 0.5, scales 2^0..2^5)
  cover a median 5.4 % of the image, 90 % of them between 0.1 % and 10 % (2000 draws);
- inside the mask the features become DRAEM's blend ``beta * x + (1 - beta) * texture`` with
  ``beta ~ U(0, 0.8)`` (DRAEM / DeSTSeg opacity), where the "texture" mixes features of another
  training sample of the batch (flipped and rolled, so taken from another location) with
  Gaussian noise of each channel's std: ``sqrt(l) * donor + sqrt(1 - l) * noise``, ``l ~ U(0, 1)``;
- a fraction ``clean_probability`` of the samples stays clean (default 5 %: the reference code
  corrupts every image, ``aug_prob=1.0``, but about 5 % of its Perlin masks are empty, measured
  as above; DRAEM itself keeps 50 % clean);
- the mask is known exactly at embedding resolution (DeSTSeg resizes its pixel mask to the
  layer1 grid and thresholds it at 0.5).

The model (the teacher is the embedding; its channels split into levels, ``level_channels``,
filled in by :meth:`DeSTSeg.bind_layout`, one level = the whole embedding when empty):

1. per-channel standardisation with the training set's statistics (computed in a first pass and
   saved). Teacher features, student targets and cosines all live in this standardised space
   (the reference compares raw ResNet features, which are all positive so every cosine is close
   to 1, and on ViTs a few massive-activation channels would dominate every cosine);
2. denoising student: a conv encoder-decoder on the corrupted standardised embedding (1x1
   stem, ``student_stages`` ResNet basic blocks with stride 2 doubling the width, the mirror
   decoder with bilinear resizing and no skip connections, as the reference's ResNet18
   encoder + decoder), and a linear 1x1 head per level predicting the *clean* teacher features
   of that level. Loss step 1 (reference ``cosine_similarity_loss``): per level the mean over
   positions of ``1 - cos``, summed over levels; averaged over the batch (the reference sums over
   the batch);
3. segmentation network: input per level ``-normalise(t) * normalise(s)`` (reference sign), with
   ``t`` the standardised teacher features of the *corrupted* input (what it sees at test time)
   and ``s`` the student's output, concatenated over levels; two basic blocks to
   ``segmentation_channels``, ASPP (rates ``aspp_rates``, reference 6/12/18, plus a global-pool
   branch), conv3x3-BN-ReLU, 1x1 conv to a logit. Loss step 2: focal loss (gamma 4, no alpha)
   + L1 between the sigmoid output and the synthetic mask, student frozen.

Schedule as in the reference: ``student_epochs`` of the student alone (segmentation net idle),
then ``segmentation_epochs`` of the segmentation net with the student in eval mode and no
gradient. The reference trains 1000 + 4000 steps of batch 32; defaults here are 20 + 40 epochs (the
segmentation net needs the longer schedule: see ``segmentation_epochs``).

Other deviations from the paper / reference code:

- a small student on features instead of a ResNet18 trained from scratch on images; its width
  (``student_channels``) and depth (``student_stages``) are configurable, and every level is
  predicted at the embedding's grid from the last decoder stage (the reference reads layer1..3
  from decoder stages at their native strides);
- ``segmentation_channels`` defaults to 128 (reference 256) to keep CPU runs practical; the
  ASPP global-pool branch has no BatchNorm (a 1 x 1 map of a single-sample batch has no batch
  statistics), the other convs keep the reference's BatchNorm, in eval mode at prediction;
- optimiser: Adam (lr 1e-3 for both networks, L2 weight decay 1e-4 as the reference), not the
  reference's SGD (momentum 0.9; lr 0.4 for the student, 0.1 / 0.01 for the segmentation res
  blocks / head). Those rates are tied to a batch-*summed* cosine loss at batch 32, a ResNet18
  student and thousands of steps; strategies here pass varying batch sizes for few epochs, and
  Adam is insensitive to that loss scale;
- focal loss computed from logits with ``logsigmoid`` (same value, numerically stable; the
  reference applies ``binary_cross_entropy`` to sigmoid outputs, which clamps the log at -100);
- map ``anomaly_map="segmentation"`` (DeSTSeg's output): the sigmoid of the segmentation net at
  embedding resolution. ``"student"``: per-level ``1 - cos`` between teacher and student,
  summed over levels (the reference's DeST map multiplies the levels). Upsampling and blur
  belong to the strategy / post-processing;
- image score ``image_score="top_mean"``: the mean of the highest ``top_fraction`` (default 1 %)
  of the map's tokens; the reference averages the top T = 100 pixels of the 256 x 256 map
  (0.15 %). ``"max"`` takes the maximum.
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
from hrad.detectors.neural import Stage
from hrad.detectors.scoring import ImageScore, cosine_distances
from hrad.detectors.synthetic import StandardisedNet, SyntheticAnomalyConfig, SyntheticAnomalyDetector
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
    #: channels of each level in the embedding; empty = filled by bind_layout, else one level
    level_channels: tuple[int, ...] = ()
    #: "segmentation": the segmentation net's output; "student": teacher-student 1 - cos
    anomaly_map: Literal["segmentation", "student"] = "segmentation"
    #: image score from the token map: "max" or "top_mean" (mean of top_fraction)
    image_score: ImageScore = "top_mean"
    #: fraction of the map's highest tokens averaged by image_score="top_mean"
    top_fraction: float = Field(default=0.01, gt=0, le=1)


# --------------------------------------------------------------------------- networks
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


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class DenoisingStudent(nn.Module):
    """Encoder-decoder without skip connections: corrupted embedding -> clean features per level."""

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
    """Standardisation statistics, denoising student and segmentation net."""

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


# --------------------------------------------------------------------------- detector
class DeSTSeg(SyntheticAnomalyDetector[DeSTSegConfig, DeSTSegNet]):
    """Denoising student + segmentation net on feature-space synthetic anomalies; see the module
    docstring."""

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
        """CNN: layer1..3 without aggregation, DeSTSeg's own choice (ResNet18 layer1..3): the
        segmentation net works at layer1's stride-4 grid, which its fine localisation relies on
        (HiAD's Table II uses layer2 + layer3; set ``layers`` for that). ViT: three blocks at
        1/4, 1/2 and 3/4 of the depth (three levels, like the CNN layers)."""
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

    # ----------------------------------------------------------------- training
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

        def adam(part: str, lr: float) -> Callable[[], list[torch.optim.Optimizer]]:
            return lambda: [
                torch.optim.Adam(
                    getattr(self.fitted_network(), part).parameters(), lr=lr, weight_decay=config.weight_decay
                )
            ]

        return [
            Stage(
                "student",
                config.student_epochs,
                self._student_step,
                adam("student", config.student_lr),
                train=partial(_train_only, part="student"),
            ),
            Stage(
                "segmentation",
                config.segmentation_epochs,
                self._segmentation_step,
                adam("segmentation", config.segmentation_lr),
                train=partial(_train_only, part="segmentation"),
            ),
        ]

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        model = self.fitted_network()
        teacher = model.standardise(embeddings)
        student = model.student(teacher)
        if self.config.anomaly_map == "student":
            return cosine_distances(model.levels(teacher), student).sum(dim=0)
        return torch.sigmoid(model.segmentation_logits(teacher, student))
