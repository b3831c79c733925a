"""The synthetic dataset behind ``hrad demo``: textured surfaces with drawn defects and exact masks.

Textures come from images scikit-image ships inside its wheel (``brick``, ``grass``,
``gravel``), so the demo runs offline. A texture is mirrored into a seamless periodic tile,
then each image is a randomly shifted, flipped, rotated and brightness-jittered crop of it:
normal images differ from each other the way real products do, without seams that would look
like defects. Defects are drawn with OpenCV into a mask first and the image changes only
inside that mask (by a guaranteed minimum amount), so the ground truth is exact to the pixel.

Defect kinds span the sizes a high-resolution detector must handle: thin ``scratch`` lines
(16 px up to a few hundred), small ``spot`` blobs (16-40 px), large branching ``crack`` lines
and large ``stain`` blobs (hundreds of pixels).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from hrad.data.images import write_image, write_mask
from hrad.errors import ConfigError

TEXTURES = ("brick", "grass", "gravel")
DEFECT_KINDS = ("scratch", "spot", "crack", "stain")
# Demo defaults: 8 train / 4 good / 8 anomalous images at 2048x2048 keep `hrad demo`
# (fit + evaluate with a tiled EfficientNet-Lite0 PatchCore) to a few minutes on 2 CPU cores.
DEFAULT_N_TRAIN = 8
DEFAULT_N_TEST_GOOD = 4
DEFAULT_N_TEST_BAD = 8
MIN_CHANGE = 0.08  # smallest intensity change inside a defect, so every masked pixel differs


@lru_cache(maxsize=len(TEXTURES))
def _texture_source(name: str) -> np.ndarray:
    import skimage.data

    if name not in TEXTURES:
        raise ConfigError(f"unknown demo texture {name!r}; known: {', '.join(TEXTURES)}")
    gray = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    # mirror into a periodic tile: opposite borders match, so tiling and wrapping show no seams
    periodic = np.concatenate([gray, gray[:, ::-1]], axis=1)
    periodic = np.concatenate([periodic, periodic[::-1, :]], axis=0)
    periodic.setflags(write=False)
    return periodic


def normal_image(
    rng: np.random.Generator, size: int, texture: str = "gravel", color: bool = False
) -> np.ndarray:
    """A defect-free float32 ``size x size x 3`` image in [0, 1]: a varied crop of a periodic texture."""
    tile = _texture_source(texture)
    # the source textures are 512 px; scale them with the image so the pattern keeps its look
    scale = max(size / 1024.0, 0.125)
    if scale != 1.0:
        tile_size = (max(8, round(tile.shape[1] * scale)), max(8, round(tile.shape[0] * scale)))
        tile = cv2.resize(tile, tile_size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    tile = np.rot90(tile, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    shift_y, shift_x = (int(value) for value in rng.integers(0, tile.shape[:2]))
    reps_y = -(-(size + shift_y) // tile.shape[0])
    reps_x = -(-(size + shift_x) // tile.shape[1])
    canvas = np.tile(tile, (reps_y, reps_x))[shift_y : shift_y + size, shift_x : shift_x + size]
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.06, 0.06)
    gray = np.clip((canvas - canvas.mean()) * contrast + canvas.mean() + brightness, 0.0, 1.0)
    if color:
        tint = np.array([1.0, 0.85, 0.65], dtype=np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
        image = np.clip(gray[:, :, None] * tint[None, None, :], 0.0, 1.0)
    else:
        image = np.repeat(gray[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image, dtype=np.float32)


def _random_walk(
    rng: np.random.Generator, start: np.ndarray, length: float, step: float, wobble: float
) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    points = [start.astype(np.float64)]
    travelled = 0.0
    while travelled < length:
        angle += rng.normal(0.0, wobble)
        points.append(points[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
        travelled += step
    return np.round(np.array(points)).astype(np.int32)


def _draw_scratch(rng: np.random.Generator, mask: np.ndarray, size: int) -> None:
    length = rng.uniform(16, min(320, 0.45 * size))
    thickness = int(rng.integers(2, 5))
    start = rng.uniform(0.1 * size, 0.9 * size, 2)
    points = _random_walk(rng, start, length, step=max(4.0, length / 12), wobble=0.08)
    cv2.polylines(mask, [points], isClosed=False, color=1, thickness=thickness, lineType=cv2.LINE_8)


def _draw_spot(rng: np.random.Generator, mask: np.ndarray, size: int) -> None:
    diameter = rng.uniform(16, 40)
    center = tuple(int(v) for v in rng.uniform(0.05 * size, 0.95 * size, 2))
    axes = (max(2, round(diameter / 2)), max(2, round(diameter / 2 * rng.uniform(0.6, 1.0))))
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, color=1, thickness=-1)


def _draw_crack(rng: np.random.Generator, mask: np.ndarray, size: int) -> None:
    length = rng.uniform(0.15, 0.35) * size
    start = rng.uniform(0.25 * size, 0.75 * size, 2)
    trunk = _random_walk(rng, start, length, step=max(3.0, size / 200), wobble=0.35)
    thickness = max(2, round(size / 400 * rng.uniform(1.0, 2.0)))
    cv2.polylines(mask, [trunk], isClosed=False, color=1, thickness=thickness, lineType=cv2.LINE_8)
    for _ in range(int(rng.integers(1, 4))):
        branch_start = trunk[int(rng.integers(len(trunk)))]
        branch = _random_walk(
            rng, branch_start, length * rng.uniform(0.2, 0.5), step=max(3.0, size / 200), wobble=0.4
        )
        cv2.polylines(
            mask, [branch], isClosed=False, color=1, thickness=max(1, thickness - 1), lineType=cv2.LINE_8
        )


def _draw_stain(rng: np.random.Generator, mask: np.ndarray, size: int) -> None:
    radius = rng.uniform(0.05, 0.12) * size
    center = rng.uniform(0.25 * size, 0.75 * size, 2)
    for _ in range(int(rng.integers(3, 7))):
        offset = rng.normal(0.0, radius * 0.45, 2)
        axes = (max(2, round(radius * rng.uniform(0.4, 0.8))), max(2, round(radius * rng.uniform(0.3, 0.7))))
        blob_center = tuple(int(v) for v in np.clip(center + offset, 0, size - 1))
        cv2.ellipse(mask, blob_center, axes, float(rng.uniform(0, 180)), 0, 360, color=1, thickness=-1)


_DRAWERS = {"scratch": _draw_scratch, "spot": _draw_spot, "crack": _draw_crack, "stain": _draw_stain}


def _apply(image: np.ndarray, region: np.ndarray, rng: np.random.Generator, kind: str) -> None:
    """Change ``image`` in place, only inside ``region``, by at least MIN_CHANGE per pixel."""
    inside = image[region]
    if kind in ("stain",):
        target = np.clip(np.array([0.55, 0.35, 0.2]) * rng.uniform(0.6, 1.2), 0, 1)
        strength = rng.uniform(0.35, 0.55)
    else:
        target = np.full(3, 0.05 if rng.random() < 0.7 else 0.95)
        strength = rng.uniform(0.45, 0.7)
    changed = inside * (1.0 - strength) + target[None, :] * strength
    delta = changed - inside
    # where the texture already has the defect's colour, push the pixel further (or back)
    # so that no masked pixel stays unchanged: the mask is exact by construction
    small = np.abs(delta).max(axis=1) < MIN_CHANGE
    direction = np.where(inside[small].mean(axis=1, keepdims=True) > 0.5, -1.0, 1.0)
    changed[small] = inside[small] + direction * MIN_CHANGE
    image[region] = np.clip(changed, 0.0, 1.0)


def add_defects(
    image: np.ndarray, rng: np.random.Generator, kind: str, count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` defects of ``kind`` on a copy of a square image; return it and its bool mask.

    The returned image differs from the input exactly on the mask (after 8-bit quantisation too:
    each masked pixel moves by at least ``MIN_CHANGE`` in some channel).
    """
    if kind not in _DRAWERS:
        raise ConfigError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    size = image.shape[0]
    result = np.array(image, dtype=np.float32, copy=True)
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    for _ in range(count):
        region = np.zeros_like(mask)
        _DRAWERS[kind](rng, region, size)
        region_bool = region.astype(bool) & ~mask.astype(bool)  # never re-blend a pixel
        _apply(result, region_bool, rng, kind)
        mask |= region
    return result, mask.astype(bool)


def check_demo_size(image_size: int) -> None:
    """Refuse a demo image side under 64 pixels (one-line ConfigError)."""
    if image_size < 64:
        raise ConfigError(f"demo image_size must be at least 64 pixels, got {image_size}")


def make_demo_dataset(
    out_dir: str | os.PathLike[str],
    image_size: int = 2048,
    n_train: int = DEFAULT_N_TRAIN,
    n_test_good: int = DEFAULT_N_TEST_GOOD,
    n_test_bad: int = DEFAULT_N_TEST_BAD,
    seed: int = 0,
    texture: str = "gravel",
    color: bool = False,
) -> Path:
    """Write a synthetic MVTec-layout dataset to ``out_dir`` and return ``out_dir``.

    Layout: ``train/good``, ``test/good``, ``test/<kind>`` and ``ground_truth/<kind>/<stem>_mask.png``
    (0/255) for kinds scratch, spot, crack, stain, assigned in turn to the anomalous images.
    Everything is a PNG and a function of ``seed`` alone.
    """
    check_demo_size(image_size)
    if min(n_train, n_test_good, n_test_bad) < 0 or n_train == 0:
        raise ConfigError("demo dataset needs n_train >= 1 and non-negative test counts")
    if texture not in TEXTURES:
        raise ConfigError(f"unknown demo texture {texture!r}; known: {', '.join(TEXTURES)}")
    out = Path(out_dir)
    # one independent stream per image: adding test images never changes the training ones
    streams = np.random.SeedSequence(seed).spawn(n_train + n_test_good + n_test_bad)
    rngs = iter(np.random.default_rng(stream) for stream in streams)
    for index in range(n_train):
        write_image(
            out / "train" / "good" / f"{index:03d}.png", normal_image(next(rngs), image_size, texture, color)
        )
    for index in range(n_test_good):
        write_image(
            out / "test" / "good" / f"{index:03d}.png", normal_image(next(rngs), image_size, texture, color)
        )
    for index in range(n_test_bad):
        rng = next(rngs)
        kind = DEFECT_KINDS[index % len(DEFECT_KINDS)]
        count = int(rng.integers(1, 4)) if kind in ("scratch", "spot") else 1
        image, mask = add_defects(normal_image(rng, image_size, texture, color), rng, kind, count)
        stem = f"{index:03d}"
        write_image(out / "test" / kind / f"{stem}.png", image)
        write_mask(out / "ground_truth" / kind / f"{stem}_mask.png", mask)
    return out
