"""RD++'s feature noise (the feature-space form of the reference's simplex noise) and the debiased
Sinkhorn divergence of its pairwise SSOT loss; choices and deviations: :mod:`hrad.detectors.rdpp`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_noise(
    shape: tuple[int, int, int, int],
    sigma: float,
    generator: torch.Generator,
    device: torch.device | None = None,
) -> Tensor:
    """A ``B x C x H x W`` Gaussian field, smooth over space, independent per channel: padded white
    noise blurred by a separable kernel of unit L2 norm, so every value, at the borders too, has
    variance exactly 1."""
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
    """Features plus smooth noise in one random box per sample (the feature-space simplex noise),
    its std ``amplitude`` x each channel's batch std: the scale of normal variation, whatever the
    backbone's feature magnitudes."""
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
    """``OT_eps`` (``eps = blur^2``) between uniform clouds ``x`` (``B x n x d``) and ``y``
    (``B x m x d``), and the plan ``B x n x m``. The value is the semi-dual ``<a, f> + <b, g>``
    with ``f`` the c-transform of the converged ``g`` taken with gradients: its gradient is exactly
    ``sum_ij P_ij dC_ij`` (envelope theorem), without backpropagating through the iterations."""
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
