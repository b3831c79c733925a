"""Exact math of the pieces the detectors share (hrad.detectors.scoring) on small arrays."""

from __future__ import annotations

import torch

from hrad.detectors.scoring import cosine_distances, cosine_loss


def levels() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One 2-channel level, batch 2, 1 x 2 grid: same, orthogonal, opposite and scaled vectors."""
    target = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]], [[[1.0, 0.0]], [[0.0, 3.0]]]])
    rebuilt = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]], [[[-1.0, 0.0]], [[0.0, 1.0]]]])
    return [target], [rebuilt]


def test_cosine_distances_per_position_and_level() -> None:
    targets, rebuilt = levels()
    distances = cosine_distances(targets * 2, rebuilt * 2)
    assert distances.shape == (2, 2, 1, 2)
    expected = torch.tensor([[[0.0, 1.0]], [[2.0, 0.0]]])  # same, orthogonal; opposite, scaled
    torch.testing.assert_close(distances[0], expected)
    torch.testing.assert_close(distances[1], expected)


def test_cosine_loss_position_and_flattened_terms_sum_over_levels() -> None:
    targets, rebuilt = levels()
    position = 1 - (1.0 + 0.0 - 1.0 + 1.0) / 4  # mean per-position cosine
    # flattened maps: sample 0 (1, 1, 0, 0) . (2, 0, 0, 5); sample 1 (1, 0, 0, 3) . (-1, 0, 0, 1)
    flat = 1 - (2 / (2**0.5 * 29**0.5) + 2 / (10**0.5 * 2**0.5)) / 2
    torch.testing.assert_close(cosine_loss(targets, rebuilt, True, False), torch.tensor(position))
    torch.testing.assert_close(cosine_loss(targets, rebuilt, False, True), torch.tensor(flat))
    both = cosine_loss(targets * 2, rebuilt * 2, True, True)
    torch.testing.assert_close(both, torch.tensor(2 * (position + flat)))
    assert float(cosine_loss(targets, rebuilt, False, False)) == 0.0
