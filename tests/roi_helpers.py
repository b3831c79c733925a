"""What the region-of-interest tests share (``test_roi.py``, ``test_roi_pictures.py``): a small
tiled PatchCore, its textured images and a mask that inspects their left half."""

from __future__ import annotations

import numpy as np
from conftest import textured_image

TILED = {"name": "tiled", "tile": 48, "stride": 32}
DETECTOR = {"name": "patchcore", "coreset_ratio": 0.25}
HEIGHT, WIDTH = 90, 130


def textured_images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [textured_image(rng, HEIGHT, WIDTH) for _ in range(6)]


def left_half_mask() -> np.ndarray:
    """Inspect the left half only."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[:, : WIDTH // 2] = 255
    return mask
