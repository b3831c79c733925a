"""What DeSTSeg and RealNet share: a segmentation head on the standardised embedding, trained
against the exact masks of synthetic anomalies (focal + L1 loss). ``synthesis="feature"``:
DRAEM-style anomalies made in feature space, fresh every batch (:func:`synthesise_anomalies`; the
rules and their sources are in :mod:`hrad.detectors.destseg`). ``synthesis="image"``: the strategy
pastes anomalies into the training tiles once per fit (:mod:`hrad.data.anomalies`) and hands their
embeddings over packed with the clean ones (:func:`~hrad.detectors.base.pack_anomalies`; masks =
the fraction of each token covered).
"""

from __future__ import annotations

import math
from typing import Generic, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from hrad.data.anomalies import AnomalyRule
from hrad.detectors.base import DetectorConfig, unpack_anomalies
from hrad.detectors.neural import NeuralConfig, NeuralDetector, StandardisedNet, check_fraction_range
from hrad.errors import ArtifactError, ConfigError, InputError

#: DRAEM / DeSTSeg draw the opacity of the original image inside the mask from U(0, 0.8)
MAX_OPACITY = 0.8
#: smallest blur of the mask noise, in tokens (a finer mask would be salt-and-pepper)
MIN_MASK_SIGMA = 1.0
#: the largest blur is this fraction of the longer grid side
MAX_MASK_SIGMA_FRACTION = 0.25


class SyntheticAnomalyConfig(NeuralConfig):
    """Options of detectors trained on synthetic anomalies with a segmentation head."""

    #: dilation rates of the segmentation net's ASPP branches
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    #: gamma of the segmentation focal loss
    focal_gamma: float = Field(default=4.0, ge=0)
    #: range of the fraction of the grid a synthetic anomaly mask covers
    anomaly_fraction: tuple[float, float] = (0.01, 0.1)
    #: probability that a training sample stays clean (empty mask)
    clean_probability: float = Field(default=0.05, ge=0, le=1)
    #: where the anomalies are made (module docstring): "feature" = on the standardised embedding;
    #: "image" = in the training tiles, by the strategy (every strategy but mrf, which ignores the detector)
    synthesis: Literal["feature", "image"] = "feature"

    @model_validator(mode="after")
    def _check_synthesis(self) -> SyntheticAnomalyConfig:
        check_fraction_range(self, "anomaly_fraction")
        if not self.aspp_rates or min(self.aspp_rates) < 1:
            raise ConfigError(f"{self.name} aspp_rates {self.aspp_rates} must be one or more dilations >= 1")
        return self


def focal_loss(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    """Mean binary focal loss ``-(1 - p_t)^gamma * log(p_t)`` (reference: alpha off, mean), from
    logits so that confident predictions do not overflow the log."""
    probabilities = torch.sigmoid(logits)
    cross_entropy = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    return (cross_entropy * (1 - p_t) ** gamma).mean()


# --------------------------------------------------------------------------- synthesis
def _gaussian_kernel(sigma: float, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def smooth_mask(
    height: int, width: int, fraction: float, generator: torch.Generator, device: torch.device
) -> Tensor:
    """An ``h x w`` boolean mask: the ``round(fraction * h * w)`` highest values of white noise
    blurred by an anisotropic Gaussian (a Perlin-like blob pattern at a random scale)."""
    max_sigma = max(MIN_MASK_SIGMA, MAX_MASK_SIGMA_FRACTION * max(height, width))
    log_range = math.log(max_sigma / MIN_MASK_SIGMA)
    draws = torch.rand(2, generator=generator, device=device).tolist()
    sigma_y, sigma_x = (MIN_MASK_SIGMA * math.exp(draw * log_range) for draw in draws)
    kernel_y, kernel_x = _gaussian_kernel(sigma_y, device), _gaussian_kernel(sigma_x, device)
    # noise larger than the grid by the kernel radii: a valid convolution needs no padding
    noise = torch.randn(
        1, 1, height + kernel_y.numel() - 1, width + kernel_x.numel() - 1, generator=generator, device=device
    )
    field = F.conv2d(noise, kernel_y.view(1, 1, -1, 1))
    field = F.conv2d(field, kernel_x.view(1, 1, 1, -1)).flatten()
    count = min(height * width, max(1, round(fraction * height * width)))
    mask = torch.zeros(height * width, dtype=torch.bool, device=device)
    mask[field.topk(count).indices] = True
    return mask.view(height, width)


def synthesise_anomalies(
    features: Tensor,
    generator: torch.Generator,
    fraction_range: tuple[float, float],
    clean_probability: float,
) -> tuple[Tensor, Tensor]:
    """Feature-space DRAEM anomalies on standardised ``B x C x h x w`` features: the corrupted
    features (bit for bit ``features`` outside the mask) and ``B x h x w`` float masks (zero for
    samples left clean). ``generator``, on the features' device, fixes every draw."""
    batch, _, height, width = features.shape
    device = features.device
    masks = torch.zeros(batch, height, width, device=device)
    donors = torch.empty_like(features)
    donor_offset = int(torch.randint(1, batch, (1,), generator=generator, device=device)) if batch > 1 else 0
    low, high = fraction_range
    for index in range(batch):
        clean, fraction, flip_y, flip_x = torch.rand(4, generator=generator, device=device).tolist()
        shift_y = int(torch.randint(height, (1,), generator=generator, device=device))
        shift_x = int(torch.randint(width, (1,), generator=generator, device=device))
        donor = features[(index + donor_offset) % batch]
        flips = [dim for dim, draw in ((1, flip_y), (2, flip_x)) if draw < 0.5]
        if flips:
            donor = donor.flip(flips)
        donors[index] = donor.roll((shift_y, shift_x), dims=(1, 2))
        if clean >= clean_probability:
            masks[index] = smooth_mask(height, width, low + fraction * (high - low), generator, device)
    noise = torch.randn(features.shape, generator=generator, device=device)  # std 1 = channel std
    texture_weight, opacity = torch.rand(2, batch, 1, 1, 1, generator=generator, device=device)
    texture = texture_weight.sqrt() * donors + (1 - texture_weight).sqrt() * noise
    opacity = opacity * MAX_OPACITY
    blended = opacity * features + (1 - opacity) * texture
    corrupted = torch.where(masks.unsqueeze(1) > 0, blended, features)
    return corrupted, masks


ConfigT = TypeVar("ConfigT", bound=SyntheticAnomalyConfig)
NetT = TypeVar("NetT", bound=StandardisedNet)


class SyntheticAnomalyDetector(NeuralDetector[ConfigT, NetT], Generic[ConfigT, NetT]):
    """Base of DeSTSeg and RealNet; see the module docstring."""

    extra_state_keys = ("aspp_rates",)

    @classmethod
    def image_anomalies(cls, config: DetectorConfig) -> AnomalyRule | None:
        if not isinstance(config, SyntheticAnomalyConfig) or config.synthesis != "image":
            return None
        return AnomalyRule(config.seed, config.anomaly_fraction, config.clean_probability)

    def training_embeddings(self, batch: Tensor) -> Tensor:
        """The clean part; with ``synthesis="image"`` the batch must be the strategy's packed one."""
        if self.config.synthesis == "feature":
            return batch
        channels = sum(self.config.level_channels)
        packed = batch.ndim == 4 and batch.shape[1] % 2 == 1 and channels in (0, (batch.shape[1] - 1) // 2)
        if not packed or not 0 <= float(batch[:, -1].min()) <= float(batch[:, -1].max()) <= 1:
            raise InputError(
                f"{self.name} synthesis=image trains on a strategy's batches packed with image-space"
                f" anomalies (clean, corrupted, mask fractions), got a batch of shape {tuple(batch.shape)};"
                " fit it through a strategy, or set synthesis=feature to fit on plain embeddings"
            )
        return unpack_anomalies(batch)[0]

    def check_bottleneck(self, embeddings: Tensor, stages: int, option: str, part: str) -> None:
        """``stages`` stride-2 BatchNorm stages must leave more than one value per channel."""
        count, _, height, width = embeddings.shape
        if count * math.ceil(height / 2**stages) * math.ceil(width / 2**stages) < 2:
            raise InputError(
                f"{self.name} cannot train on a batch of {count} {height}x{width} embedding grid(s) with"
                f" {option}={stages}: the {part}'s bottleneck would be one position; use larger"
                f" inputs, larger batches or fewer {option}"
            )

    def corrupt(self, embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Standardised (clean, corrupted, masks): fresh feature-space anomalies every call, or the
        strategy's packed batch unpacked (``synthesis="image"``, the same every epoch)."""
        network = self.fitted_network()
        if self.config.synthesis == "image":
            clean, anomalous, masks = unpack_anomalies(embeddings)
            return network.standardise(clean), network.standardise(anomalous), masks
        clean = network.standardise(embeddings)
        corrupted, masks = synthesise_anomalies(
            clean, self.generator, self.config.anomaly_fraction, self.config.clean_probability
        )
        return clean, corrupted, masks

    def segmentation_loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Focal loss (gamma ``focal_gamma``) + L1 between the sigmoid and the synthetic masks."""
        return focal_loss(logits, masks, self.config.focal_gamma) + (torch.sigmoid(logits) - masks).abs().mean()

    def extra_state(self) -> dict[str, Tensor]:
        return {"aspp_rates": torch.tensor(self.config.aspp_rates, dtype=torch.int64)}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        rates = [int(rate) for rate in state["aspp_rates"].flatten().tolist()]
        if rates != list(self.config.aspp_rates):
            raise ArtifactError(
                f"{self.name} state was trained with aspp_rates {rates}, config says {list(self.config.aspp_rates)}"
            )
