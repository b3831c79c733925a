"""RD++: reverse distillation with multi-scale projection and self-supervised OT (Tien et al. 2023).

Built on RD (Deng & Li 2022): a frozen teacher encoder, a trainable one-class bottleneck
embedding (OCBE) and a student decoder that reconstructs the teacher's multi-level features
from the bottleneck; anomalies are where the reconstruction disagrees with the teacher. RD++
inserts a multi-scale projection layer (MPL) between teacher and bottleneck and trains it with
three extra losses that make the projected normal features compact and noise-free.

Here the teacher is the embedding: its channels split into levels (``level_channels``, one per
backbone layer, filled in by :meth:`RDPlusPlus.bind_layout`; empty at fit = one level), every
level already resized to the first layer's grid ``h x w``. The detector builds a pyramid
``s_0 = h x w``, ``s_{i+1} = ceil(s_i / 2)`` and average-pools level ``i`` to ``s_i``. Network:

1. MPL: per level the reference ``ProjLayer`` (four 3x3 convs ``c -> c/2 -> c/4 -> c/2 -> c``,
   each followed by InstanceNorm and LeakyReLU) on the level at ``s_i``;
2. OCBE: level ``i`` goes down to the coarsest size ``s_{L-1}`` through ``L-1-i`` stride-2 3x3
   convs (RD's multi-scale feature fusion), the levels are concatenated and fused by ResNet
   bottleneck blocks (RD's one-class embedding: 3 blocks, the first with stride 2) into a
   ``bottleneck_channels``-wide embedding;
3. student decoder: coarse to fine, per level an upsampling step to ``s_i`` and residual blocks
   whose width is the level's channel count, then a linear 1x1 head reconstructs the level at
   ``s_i``, bilinearly resized to ``h x w`` to meet the teacher.

Losses (weights as in the reference code): ``L = L_distill + 0.2 * (L_ssot + 0.01 * L_recon +
0.1 * L_contrast) / 1.11``; the reference's two Adam optimisers (OCBE + decoder lr 0.005,
projection lr 0.001, both betas (0.5, 0.999)) step on the same total loss.

Map: per level ``1 - cos`` between teacher and reconstruction at every position, summed over
levels (the reference's ``amap_mode='a'``), at embedding resolution; image score = max. The
reference's Gaussian blur (sigma 4) and upsampling are post-processing's job here.

What moved from image space to feature space, and other deviations:

- Pyramid: RD reads WRN50 layer1..3 at their native strides; here every level arrives upsampled
  to the first layer's grid, so the detector rebuilds the pyramid (one halving per level) by
  average pooling. For CNN layers one stride apart (the default layer2 + layer3) this roughly
  undoes the embedder's bilinear upsampling, and the reconstruction is resized back the way
  the embedder resized the teacher. On ViTs every block has the same native grid, so deeper
  blocks are projected and reconstructed at a coarser grid than they have.
- Decoder upsampling is bilinear resizing to the exact pyramid size (not RD's stride-2
  transposed convs), so odd grid sizes round-trip; reconstruction heads are linear (RD ends on a
  ReLU, which would cut the negative values of ViT tokens). Decoder blocks per stage
  (``decoder_blocks=2``, RD: 3/4/6) and residual-block widths (``block_reduction``) are
  configurable; the bottleneck width defaults to the widest level (RD: 2048).
- Distillation loss per level: ``(1 - mean per-position cosine) + (1 - mean cosine of the
  flattened maps)`` (``distill_loss="both"``). The RD paper uses the first term, the RD and RD++
  code only the second (``"flattened"``).
- Noise (RD++ adds 6-octave simplex noise, amplitude 0.2, to one random 10..31 px box of the
  256 px image): here a Gaussian white field blurred over space (``noise_sigma`` tokens,
  independent per channel, normalised to unit variance) times ``noise_amplitude`` times each
  channel's std over the batch, added to one random box per sample whose sides are
  ``noise_extent`` (default 10/256..32/256) of the grid. Drawn from a generator seeded by
  ``seed``.
- ``L_recon`` (``noise_reconstruction_weight``) and ``L_contrast`` (``noise_contrast_weight``)
  follow the reference code: mean per-position ``1 - cos(P(noisy), P(clean))`` and a cosine
  embedding loss with target -1 and margin -0.5 between the flattened noisy teacher features and
  the flattened clean projection, i.e. ``max(0, cos + 0.5)`` (target -1 per the author's fix in
  the reference repository, issue #1).
- ``L_ssot`` (``ssot_weight``): the reference code passes ``B x D`` matrices (softmax over each
  sample's flattened projection) to geomloss, which reads them as one cloud of ``B`` points;
  its shuffled copy is the same empirical measure, so the debiased Sinkhorn divergence is zero
  up to solver error and the term has no effect. Implemented is the paper's intent, pairwise OT
  between normal samples: each sample is paired with another (a random cyclic shift of the
  batch, so no sample is paired with itself as ``randperm`` may do), each sample is the
  uniform cloud of its tokens (softmax over channels, as the reference softmaxes; at most
  ``ssot_points`` random tokens per sample to bound the ``n x n`` cost), and the loss is the
  debiased Sinkhorn divergence of geomloss's settings (cost ``|x - y|^2 / 2``, blur 0.05,
  epsilon-scaling 0.95) averaged over pairs and summed over levels. The annealing starts at the
  data's largest distance (the reference fixes diameter 1e7, i.e. hundreds of extra
  iterations at temperatures where nothing is transported yet) and ends with
  ``ssot_iterations`` iterations at the target blur; the two-sided problem uses alternating
  Sinkhorn updates (geomloss averages them, which converges several times slower), the
  symmetric debiasing problems geomloss's averaged update. Gradients use the envelope theorem
  (the semi-dual at the converged potentials, checked against finite differences) instead of
  backpropagating through the iterations, as geomloss does. Scale: softmax tokens of a
  ``c``-channel level lie about ``1/c`` apart, far below the blur 0.05, so the divergence is
  small for wide levels (about 2e-6 between unrelated random 1024-channel token clouds, 3e-3
  at 64 channels): with the reference's normalisation the term stays a weak regulariser.
- Every batch takes an optimiser step: the reference's "gradient accumulation" zeroes the
  gradients every batch and steps every second one, so it drops half of the batches.
- Each of ``ssot_weight``, ``noise_reconstruction_weight``, ``noise_contrast_weight`` and
  ``projection_weight`` may be 0 to switch its term off; the 1.11 normaliser stays fixed so the
  other terms keep their weights.
- ``epochs=20`` (the reference trains 10 to 300 epochs per MVTec class and keeps the epoch with
  the best test metrics, which a detector cannot do).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from hrad.detectors.neural import EpochsConfig, NeuralDetector, Stage
from hrad.errors import InputError
from hrad.features.base import EmbeddingSpec, FeatureExtractor, mid_depth_blocks

#: the reference divides its projection losses by the sum of their weights (1 + 0.01 + 0.1)
REFERENCE_PROJECTION_NORMALISER = 1.11
#: the reference noise box: 10..31 px sides on a 256 px image
REFERENCE_NOISE_EXTENT = (10 / 256, 32 / 256)


class RDPlusPlusConfig(EpochsConfig):
    """Typed RD++ options; defaults follow the reference code unless the module docstring says otherwise."""

    name: Literal["rdpp"] = "rdpp"
    #: training epochs (the reference keeps the best test epoch of 10..300, which a detector cannot)
    epochs: int = Field(default=20, ge=1)
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

    @field_validator("noise_extent")
    @classmethod
    def _extent_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError("noise_extent must satisfy 0 < low <= high <= 1")
        return value


# --------------------------------------------------------------------------- feature noise
def smooth_noise(
    shape: tuple[int, int, int, int],
    sigma: float,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> Tensor:
    """A ``B x C x H x W`` Gaussian field, smooth over space, with unit variance at every position.

    White noise on a grid padded by the kernel radius is blurred with a separable Gaussian
    kernel normalised to unit L2 norm, so every output value has variance exactly 1 and the
    borders are as noisy as the centre; channels are independent.
    """
    batch, channels, height, width = shape
    if sigma <= 0:
        return torch.randn(shape, generator=generator, device=device)
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.norm()).to(device=device, dtype=torch.float32)
    white = torch.randn(
        batch * channels, 1, height + 2 * radius, width + 2 * radius, generator=generator, device=device
    )
    field = F.conv2d(F.conv2d(white, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))
    return field.view(batch, channels, height, width)


def noise_features(
    features: Tensor,
    amplitude: float,
    sigma: float,
    extent: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """Features plus smooth noise in one random box per sample (the feature-space simplex noise).

    Noise std = ``amplitude`` x each channel's std over the batch, so it is on the scale of the
    normal variation whatever the backbone's feature magnitudes.
    """
    batch, channels, height, width = features.shape
    device = features.device
    scale = amplitude * features.detach().std(dim=(0, 2, 3), unbiased=False)  # C
    low, high = extent
    noisy = features.clone()
    for index in range(batch):
        fractions = low + (high - low) * torch.rand(2, generator=generator, device=device)
        box_h = min(height, max(1, round(float(fractions[0]) * height)))
        box_w = min(width, max(1, round(float(fractions[1]) * width)))
        top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator, device=device))
        left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator, device=device))
        field = smooth_noise((1, channels, box_h, box_w), sigma, generator, device)[0]
        noisy[index, :, top : top + box_h, left : left + box_w] += scale[:, None, None] * field
    return noisy


# --------------------------------------------------------------------------- optimal transport
def squared_cost(x: Tensor, y: Tensor) -> Tensor:
    """``|x_i - y_j|^2 / 2`` (geomloss's cost for p = 2), ``B x n x m``; smooth at zero distance."""
    cost = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)
    return cost.clamp_min(0) / 2


def _softmin(epsilon: float, cost: Tensor, log_weights: Tensor) -> Tensor:
    """``-eps log sum_j exp(h_j - C_ij / eps)``: the soft c-transform, ``B x n``."""
    return -epsilon * torch.logsumexp(log_weights[:, None, :] - cost / epsilon, dim=2)


def epsilon_schedule(diameter: float, blur: float, scaling: float, final_iterations: int) -> list[float]:
    """Temperatures from ``diameter^2`` down to ``blur^2`` by factors ``scaling^2`` (geomloss), then
    ``final_iterations`` more at ``blur^2``."""
    schedule = []
    if diameter > blur:
        steps = math.ceil(math.log(blur / diameter) / math.log(scaling))
        schedule = [(diameter * scaling**step) ** 2 for step in range(steps)]
    return schedule + [blur**2] * final_iterations


def sinkhorn_potentials(
    cost_xy: Tensor, log_a: Tensor, log_b: Tensor, schedule: list[float]
) -> tuple[Tensor, Tensor]:
    """Dual potentials ``f`` (on x) and ``g`` (on y) of entropic OT by log-domain Sinkhorn with
    epsilon-scaling; no gradients. Alternating updates (geomloss averages them, which converges
    several times slower on a two-sided problem)."""
    with torch.no_grad():
        cost_yx = cost_xy.transpose(1, 2)
        g = _softmin(schedule[0], cost_yx, log_a)
        f = _softmin(schedule[0], cost_xy, log_b + g / schedule[0])
        for epsilon in schedule:
            g = _softmin(epsilon, cost_yx, log_a + f / epsilon)
            f = _softmin(epsilon, cost_xy, log_b + g / epsilon)
    return f, g


def symmetric_potential(cost_xx: Tensor, log_a: Tensor, schedule: list[float]) -> Tensor:
    """The potential of ``OT(alpha, alpha)`` by geomloss's averaged update ``f <- (f + T(f)) / 2``,
    which converges fast on a symmetric problem (plain updates oscillate); no gradients."""
    with torch.no_grad():
        f = _softmin(schedule[0], cost_xx, log_a)
        for epsilon in schedule:
            f = (f + _softmin(epsilon, cost_xx, log_a + f / epsilon)) / 2
    return f


def _uniform_log_weights(points: Tensor) -> Tensor:
    return points.new_full(points.shape[:2], -math.log(points.shape[1]))


def entropic_ot(
    x: Tensor, y: Tensor, blur: float = 0.05, scaling: float = 0.95, final_iterations: int = 20
) -> tuple[Tensor, Tensor]:
    """``OT_eps`` between uniform clouds ``x`` (``B x n x d``) and ``y`` (``B x m x d``),
    ``eps = blur^2``, and the transport plan ``B x n x m``.

    The value is the semi-dual ``<a, f> + <b, g>`` with ``f`` the c-transform of the converged
    ``g`` computed with gradients, so its gradient is exactly ``sum_ij P_ij dC_ij`` (envelope
    theorem) without backpropagating through the iterations.
    """
    cost = squared_cost(x, y)
    log_a, log_b = _uniform_log_weights(x), _uniform_log_weights(y)
    schedule = epsilon_schedule(_diameter(cost), blur, scaling, final_iterations)
    epsilon = schedule[-1]
    _, g = sinkhorn_potentials(cost.detach(), log_a, log_b, schedule)
    f = _softmin(epsilon, cost, log_b + g / epsilon)
    value = (log_a.exp() * f).sum(1) + (log_b.exp() * g).sum(1)
    plan = torch.exp(
        (f.detach()[:, :, None] + g[:, None, :] - cost.detach()) / epsilon
        + log_a[:, :, None]
        + log_b[:, None, :]
    )
    return value, plan


def _self_ot(x: Tensor, blur: float, scaling: float, final_iterations: int) -> Tensor:
    """``OT_eps(alpha, alpha)`` with gradients through both sides of ``C(x, x)``."""
    cost = squared_cost(x, x)
    log_a = _uniform_log_weights(x)
    schedule = epsilon_schedule(_diameter(cost), blur, scaling, final_iterations)
    epsilon = schedule[-1]
    g = symmetric_potential(cost.detach(), log_a, schedule)
    f = _softmin(epsilon, cost, log_a + g / epsilon)
    return (log_a.exp() * (f + g)).sum(1)


def _diameter(cost: Tensor) -> float:
    """Largest distance between the two clouds (the annealing's starting scale)."""
    return math.sqrt(2 * max(float(cost.detach().max()), 0.0))


def sinkhorn_divergence(
    x: Tensor, y: Tensor, blur: float = 0.05, scaling: float = 0.95, final_iterations: int = 20
) -> Tensor:
    """Debiased ``S_eps(a, b) = OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2`` per batch row (``B``);
    zero when the clouds are equal as measures, positive otherwise."""
    cross, _ = entropic_ot(x, y, blur, scaling, final_iterations)
    return (
        cross
        - _self_ot(x, blur, scaling, final_iterations) / 2
        - _self_ot(y, blur, scaling, final_iterations) / 2
    )


# --------------------------------------------------------------------------- network
def pyramid_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """``s_0 = h x w`` and one stride-2 halving (rounded up, as a padded 3x3 conv) per further level."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        previous_h, previous_w = sizes[-1]
        sizes.append(((previous_h + 1) // 2, (previous_w + 1) // 2))
    return sizes


def teacher_pyramid(levels: list[Tensor]) -> list[Tensor]:
    """Level ``i`` average-pooled from the embedding grid to its pyramid size ``s_i``: for CNN
    layers this undoes the embedder's upsampling (approximately), as RD reads each layer at its
    own stride."""
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
    layers: list[nn.Module] = []
    for _ in range(steps):
        layers += [
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        ]
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
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = stage(x)
            reconstructions.append(head(x))
        return reconstructions[::-1]


class RDPlusPlusNet(nn.Module):
    """Projection layers, one-class bottleneck and student decoder of one RD++ model."""

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
        out = []
        for reconstruction in self.decoder(self.bottleneck(projected), sizes):
            if tuple(reconstruction.shape[-2:]) != (height, width):
                reconstruction = F.interpolate(
                    reconstruction, size=(height, width), mode="bilinear", align_corners=False
                )
            out.append(reconstruction)
        return out

    def distillation_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]


# --------------------------------------------------------------------------- detector
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
        if extractor.is_vit:
            return EmbeddingSpec(layers=mid_depth_blocks(extractor, (1 / 2, 3 / 4)), aggregation=1)
        return EmbeddingSpec(layers=("layer2", "layer3"), aggregation=1)

    def build_network(self, layout: list[int]) -> RDPlusPlusNet:
        return RDPlusPlusNet(layout, self.config)

    def check_batch(self, embeddings: Tensor) -> None:
        height, width = embeddings.shape[-2:]
        coarsest = pyramid_sizes(height, width, len(self.layout))[-1]
        stride = self.config.bottleneck_stride
        bottleneck = ((coarsest[0] + stride - 1) // stride, (coarsest[1] + stride - 1) // stride)
        if bottleneck[0] * bottleneck[1] < 2:
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

    def fit(self, batches: Iterable[Tensor]) -> None:
        self.term_history, self._terms = [], {}
        super().fit(batches)

    def end_epoch(self, stage: Stage, epoch: int, loss: float) -> bool:
        self.term_history.append({key: sum(values) / len(values) for key, values in self._terms.items()})
        self._terms = {}
        return False

    # ----------------------------------------------------------------- losses
    def _distill_loss(self, teacher: list[Tensor], student: list[Tensor]) -> Tensor:
        total = teacher[0].new_zeros(())
        mode = self.config.distill_loss
        for target, reconstruction in zip(teacher, student, strict=True):
            if mode in ("both", "position"):
                total = total + (1 - F.cosine_similarity(reconstruction, target, dim=1).mean())
            if mode in ("both", "flattened"):
                total = total + (
                    1 - F.cosine_similarity(reconstruction.flatten(1), target.flatten(1), dim=1).mean()
                )
        return total

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
                keep = torch.stack(
                    [
                        torch.randperm(count, generator=generator, device=device)[: config.ssot_points]
                        for _ in range(batch)
                    ]
                )
                tokens = torch.gather(tokens, 1, keep[:, :, None].expand(-1, -1, tokens.shape[2]))
            divergence = sinkhorn_divergence(
                tokens, tokens[partner], config.ssot_blur, config.ssot_scaling, config.ssot_iterations
            )
            total = total + divergence.mean()
        return total

    def training_step(self, embeddings: Tensor) -> Tensor:
        config, net = self.config, self.fitted_network()
        teacher = self.split(embeddings)
        projected = net.project(teacher_pyramid(teacher))
        distill = self._distill_loss(teacher, net.reconstruct(projected))
        terms = {"distill": distill}
        projection = distill.new_zeros(())
        if config.projection_weight > 0:
            if config.ssot_weight > 0 and embeddings.shape[0] > 1:
                terms["ssot"] = self._ssot_loss(projected)
                projection = projection + config.ssot_weight * terms["ssot"]
            if config.noise_reconstruction_weight > 0 or config.noise_contrast_weight > 0:
                noisy_embeddings = noise_features(
                    embeddings,
                    config.noise_amplitude,
                    config.noise_sigma,
                    config.noise_extent,
                    self.generator,
                )
                noisy = teacher_pyramid(self.split(noisy_embeddings))
                projected_noisy = net.project(noisy)
                if config.noise_reconstruction_weight > 0:
                    terms["noise_reconstruction"] = cast(
                        Tensor,
                        sum(
                            (1 - F.cosine_similarity(p_noisy, p_clean, dim=1)).mean()
                            for p_noisy, p_clean in zip(projected_noisy, projected, strict=True)
                        ),
                    )
                    projection = (
                        projection + config.noise_reconstruction_weight * terms["noise_reconstruction"]
                    )
                if config.noise_contrast_weight > 0:
                    negative = -torch.ones(embeddings.shape[0], device=embeddings.device)
                    terms["noise_contrast"] = cast(
                        Tensor,
                        sum(
                            F.cosine_embedding_loss(
                                noisy_level.flatten(1),
                                p_clean.flatten(1),
                                negative,
                                margin=config.contrast_margin,
                            )
                            for noisy_level, p_clean in zip(noisy, projected, strict=True)
                        ),
                    )
                    projection = projection + config.noise_contrast_weight * terms["noise_contrast"]
        for key, value in terms.items():
            self._terms.setdefault(key, []).append(float(value.detach()))
        return distill + config.projection_weight * projection / REFERENCE_PROJECTION_NORMALISER

    def anomaly_maps(self, embeddings: Tensor) -> Tensor:
        net = self.fitted_network()
        teacher = self.split(embeddings)
        student = net.reconstruct(net.project(teacher_pyramid(teacher)))
        per_level = torch.stack(
            [1 - F.cosine_similarity(s, t, dim=1) for t, s in zip(teacher, student, strict=True)]
        )
        return per_level.sum(0) if self.config.map_reduction == "sum" else per_level.mean(0)
