"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

PatchCore keeps a subset of the normal patch features that covers all of them: repeatedly add
the feature farthest from the features kept so far (greedy k-center, a 2-approximation of the
optimal covering radius). Distances are computed after a Johnson-Lindenstrauss random
projection to ``projection_dim`` dimensions, as in the paper, so selection is cheap and the
radii are preserved up to a small factor.

The textbook loop scans every feature once per selection, which on a CPU is bound by memory
bandwidth (20k selections from 200k x 128 features read ~2 TB). This implementation returns the
same selection but reads far less: after rotating the features to their principal axes, the
distance in the first few coordinates is an exact lower bound of the full distance, so each
selection scans a narrow ``N x 16`` array and computes full distances only for the features
the new center might actually bring closer. Real embeddings concentrate their variance in few
axes, so that is a small share of them; on structureless noise it falls back to the full scan.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from hrad.progress import log_progress
from hrad.seeds import seed_bits

logger = logging.getLogger(__name__)

#: progress records per selection (one per this share of the rows to select)
PROGRESS_STEPS = 100


def random_projection(features: Tensor, projection_dim: int, seed: int = 0) -> Tensor:
    """Gaussian Johnson-Lindenstrauss projection ``N x D -> N x projection_dim`` (scaled to keep distances)."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
    return features @ matrix.to(features.device)  # drawn on the CPU: the same matrix on any device


def greedy_coreset(
    features: Tensor,
    count: int,
    projection_dim: int | None = 128,
    seed: int = 0,
) -> Tensor:
    """Indices (int64, selection order) of ``count`` rows of ``features`` chosen by greedy k-center.

    ``features`` is ``N x D``. The first index is a seeded random row; each next one is the row
    farthest (L2) from all rows chosen so far. Features are randomly projected to
    ``projection_dim`` dimensions first when ``D`` is larger (``None`` or 0: no projection).
    Returns all indices when ``count >= N`` (on the CPU). CUDA features are selected on their
    GPU: the loop is thousands of small steps, about 10 ms each on one CPU thread for 131k rows
    (a 2K-image fit spent most of its 257 s here on an H200 machine, ``gpu_cuda.md``); other
    devices go to the CPU.
    """
    if features.ndim != 2:
        raise ValueError(f"coreset features must be N x D, got shape {tuple(features.shape)}")
    total = features.shape[0]
    if count <= 0 or total == 0:
        return torch.empty(0, dtype=torch.long)
    if count >= total:
        return torch.arange(total)
    device = features.device if features.is_cuda else torch.device("cpu")
    points = features.detach().to(device, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(total, (1,), generator=generator))
    if projection_dim and points.shape[1] > projection_dim:
        points = random_projection(points, projection_dim, seed=seed_bits(seed + 1))
    return farthest_point_indices(points.contiguous(), count, start)


def farthest_point_indices(points: Tensor, count: int, start: int, bound_dim: int = 16) -> Tensor:
    """Exact greedy farthest-point selection from row ``start``; returns indices in selection order.

    Points are rotated to their principal axes (an orthogonal map: distances are unchanged), so
    the distance in the ``bound_dim`` leading coordinates is a lower bound of the full distance
    that captures most of it. Each selection computes that cheap bound for every point and the
    full distance only where the bound does not already exceed the point's current distance.
    Ties resolve to the lowest index, like a plain ``argmax`` loop.
    """
    total, dim = points.shape
    count = min(count, total)
    centered = points - points.mean(dim=0)
    _, eigenvectors = torch.linalg.eigh((centered.T @ centered).double())
    rotated = (centered @ eigenvectors.flip(1).to(torch.float32)).contiguous()
    leading = rotated[:, : min(bound_dim, dim)].contiguous()
    if points.is_cuda:
        return _select(rotated, leading, count, start)
    # the loop is thousands of small ops: OpenMP fork/join costs more than it saves, and under
    # CPU contention (other processes) multi-threaded small ops slow down ~10x, so run it on one
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _select(rotated, leading, count, start)
    finally:
        torch.set_num_threads(previous_threads)


def _select(rotated: Tensor, leading: Tensor, count: int, start: int) -> Tensor:
    total = rotated.shape[0]
    squared_norms = (rotated * rotated).sum(dim=1)
    leading_norms = (leading * leading).sum(dim=1)
    # float32 rounding allowance (norm expansion) so the bound never prunes a genuine update
    slack = 1e-5 * float(squared_norms.max()) + 1e-12
    min_sq_dist = torch.full((total,), float("inf"), device=rotated.device)
    selected = torch.empty(count, dtype=torch.long)  # on the CPU: filled with Python ints
    current = start
    report_every = max(1, -(-count // PROGRESS_STEPS))  # at most PROGRESS_STEPS records
    for position in range(count):
        if position % report_every == 0 and position:
            log_progress(logger, position, count, "coreset selection")
        selected[position] = current
        center = rotated[current]
        bound = leading_norms - 2.0 * (leading @ leading[current]) + leading_norms[current]
        near = torch.nonzero(bound < min_sq_dist + slack).squeeze(1)
        if near.numel() > total // 4:
            sq_dist = squared_norms - 2.0 * (rotated @ center) + squared_norms[current]
            torch.minimum(min_sq_dist, sq_dist.clamp_(min=0.0), out=min_sq_dist)
        elif near.numel():
            sq_dist = (rotated[near] - center).pow(2).sum(dim=1)
            min_sq_dist[near] = torch.minimum(min_sq_dist[near], sq_dist)
        min_sq_dist[current] = 0.0
        current = int(torch.argmax(min_sq_dist))
    log_progress(logger, count, count, "coreset selection")
    return selected
