"""Build an MVTec-HD-style high-resolution benchmark from an MVTec-layout dataset (HiAD, Sec. III).

HiAD upscales MVTec AD / VisA with StableSR, then makes "tiny" anomalies by cutting real
defect regions out of the anomalous test images, downscaling them and Poisson-blending them
into normal images; the original anomalous images (upscaled) are the "large" anomalies.
StableSR is not available here, so images are upscaled with bicubic interpolation.

Choices the paper leaves open, fixed here so the benchmark is reproducible from ``seed``:

- Images keep their aspect ratio: the long side becomes ``target_size``.
- Tiny hosts are good test images; a host is written to ``test/tiny`` only, never also to
  ``test/good`` (no duplicated backgrounds). By default half of the good test images (at
  least one when there are two or more) become hosts.
- Each host gets ``k`` defects, ``k = tiny_per_image[0]`` with probability 0.6, otherwise uniform
  in ``tiny_per_image`` (the paper: "most images contain one anomaly region, a small number up
  to five"). Transplanted defects do not overlap.
- A defect is one connected component of a ground-truth mask. It is resized so its bounding
  box's long side is uniform in [smallest size giving a short side >= ``min_side``,
  ``max(that, min(its natural size, tiny_max_side))``]; components that would need a long side
  above ``4 * tiny_max_side`` to satisfy ``min_side`` (very thin, long scratches) are skipped.
- The ground truth is the resized component mask, binarised at 0.5; the Poisson blend region
  is that mask dilated by a few pixels so the seam lies outside the defect.
- Placement is uniform over the host (no foreground model; for objects on plain backgrounds
  some defects land on the background, which the paper avoided by manual selection).

A ``hd_manifest.json`` records where every tiny defect came from and where it went.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from hrad.data.datasets import ANOMALOUS, GOOD, load_dataset
from hrad.data.images import read_image, read_mask, write_image, write_mask
from hrad.errors import ConfigError, InputError
from hrad.staging import move_into_place, staging_beside

_BLEND_MARGIN = 3  # pixels of Poisson region around a defect, and free border around the crop


@dataclass(frozen=True)
class DefectSource:
    """One connected component of a real defect mask, at the source image's resolution."""

    image: Path
    mask: Path
    x: int
    y: int
    width: int
    height: int
    label: int  # component label in the mask's connected-component image


@dataclass
class TinyPlacement:
    host: str
    output: str
    source_image: str
    source_box_xywh: list[int]
    placed_box_xywh: list[int]


def upscaled_size(width: int, height: int, target_size: int) -> tuple[int, int]:
    """``(W, H)`` with the long side equal to ``target_size`` and the aspect ratio kept."""
    scale = target_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _upscale_image(image: np.ndarray, target_size: int) -> np.ndarray:
    size = upscaled_size(image.shape[1], image.shape[0], target_size)
    if size == (image.shape[1], image.shape[0]):
        return image
    interpolation = cv2.INTER_CUBIC if size[0] > image.shape[1] else cv2.INTER_AREA
    return np.clip(cv2.resize(image, size, interpolation=interpolation), 0.0, 1.0)


def _upscale_mask(mask: np.ndarray, target_size: int) -> np.ndarray:
    size = upscaled_size(mask.shape[1], mask.shape[0], target_size)
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5


def _defect_sources(anomalous: list[tuple[Path, Path]]) -> list[DefectSource]:
    sources: list[DefectSource] = []
    for image_path, mask_path in anomalous:
        mask = read_mask(mask_path, image_path=image_path)
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        for label in range(1, count):
            x, y, width, height, _area = (int(v) for v in stats[label])
            sources.append(DefectSource(image_path, mask_path, x, y, width, height, label))
    return sources


def _size_range(source: DefectSource, min_side: int, tiny_max_side: int) -> tuple[float, float] | None:
    """Range of the resized bounding box's long side; None if ``min_side`` cannot be met sensibly."""
    long_side, short_side = max(source.width, source.height), min(source.width, source.height)
    lowest = min_side * long_side / max(short_side, 1) + 1.0  # +1: binarising may shave a pixel
    if lowest > 4 * tiny_max_side:
        return None
    return lowest, max(lowest, min(float(long_side), float(tiny_max_side)))


def _cut_defect(
    source: DefectSource, long_side: float, image_cache: dict[Path, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """The defect's crop and component mask, resized so the box's long side is ``long_side``."""
    if source.image not in image_cache:
        image_cache.clear()  # keep one source image in memory at a time
        image = read_image(source.image)
        _, labels = cv2.connectedComponents(
            read_mask(source.mask, image.shape[:2], source.image).astype(np.uint8), connectivity=8
        )
        image_cache[source.image] = (image, labels)
    image, labels = image_cache[source.image]
    box = np.s_[source.y : source.y + source.height, source.x : source.x + source.width]
    crop, component = image[box], (labels[box] == source.label).astype(np.float32)
    scale = long_side / max(source.width, source.height)
    size = (max(1, round(source.width * scale)), max(1, round(source.height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    crop = np.clip(cv2.resize(crop, size, interpolation=interpolation), 0.0, 1.0)
    component_mask = cv2.resize(component, size, interpolation=cv2.INTER_LINEAR) >= 0.5
    return crop, component_mask


def keep_components_at_least(mask: np.ndarray, min_side: int) -> np.ndarray:
    """``mask`` without the connected components whose bounding box has a side below ``min_side``."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = np.minimum(stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]) >= min_side
    return keep[labels]


def _to_bgr8(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


def _paste(
    host: np.ndarray, occupied: np.ndarray, crop: np.ndarray, defect: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """Poisson-blend ``crop`` into ``host`` at a random free spot; the new image, its defect mask, (x, y)."""
    margin = _BLEND_MARGIN
    height, width = defect.shape
    padded_h, padded_w = height + 2 * margin, width + 2 * margin
    host_h, host_w = host.shape[:2]
    if padded_h + 2 > host_h or padded_w + 2 > host_w:
        return None
    blend_region = np.zeros((padded_h, padded_w), dtype=np.uint8)
    blend_region[margin : margin + height, margin : margin + width] = defect
    blend_region = cv2.dilate(blend_region, np.ones((2 * margin - 1, 2 * margin - 1), np.uint8))
    source = cv2.copyMakeBorder(_to_bgr8(crop), margin, margin, margin, margin, cv2.BORDER_REFLECT)
    for _ in range(50):
        top = int(rng.integers(1, host_h - padded_h))
        left = int(rng.integers(1, host_w - padded_w))
        window = np.s_[top : top + padded_h, left : left + padded_w]
        if occupied[window].any():
            continue
        # seamlessClone centres the bounding box of the mask's non-zero pixels at ``center``
        ys, xs = np.nonzero(blend_region)
        center = (
            left + (int(xs.min()) + int(xs.max()) + 1) // 2,
            top + (int(ys.min()) + int(ys.max()) + 1) // 2,
        )
        blended = cv2.seamlessClone(source, _to_bgr8(host), blend_region * 255, center, cv2.NORMAL_CLONE)
        result = cv2.cvtColor(blended, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        mask = np.zeros(host.shape[:2], dtype=bool)
        mask[top + margin : top + margin + height, left + margin : left + margin + width] = defect
        return result, mask, (left + margin, top + margin)
    return None


def _default_tiny_hosts(n_good: int) -> int:
    return n_good // 2 if n_good >= 2 else 0


#: the file that marks a folder as a dataset of :func:`build_hd_dataset` (which a new one replaces whole)
HD_MANIFEST = "hd_manifest.json"


def _staging_folder(out: Path) -> Path:
    """A new hidden folder beside ``out`` to build the dataset in (:func:`~hrad.staging.move_into_place`
    puts it at ``out`` once complete), after refusing an ``out`` that is a file, or a folder holding
    anything but an earlier dataset of this builder: a second build into one folder mixed the two
    (a seed's host image in ``test/good`` and another's in ``test/tiny``: one image, two labels), and
    a build stopped midway left a dataset that loads, with some images missing. Staging folders of
    killed builds beside ``out`` are removed; one that cannot be made is a one-line InputError."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is a file; give a new or empty folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not (out / HD_MANIFEST).is_file():
        raise InputError(
            f"{out}: not empty and not a dataset of hrad make-hd (it has no {HD_MANIFEST}); give a new or empty "
            "folder (a make-hd dataset there is replaced whole)"
        )
    above = next((folder for folder in out.parents if folder.exists()), None)
    if above is not None and not above.is_dir():
        raise InputError(f"{out}: cannot write the dataset there ({above} is a file)")
    try:
        return staging_beside(out)
    except OSError as error:
        raise InputError(f"{out}: cannot write the dataset there ({error.strerror or error})") from None


def build_hd_dataset(
    source_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    target_size: int = 2048,
    seed: int = 0,
    tiny_per_image: tuple[int, int] = (1, 5),
    min_side: int = 16,
    tiny_max_side: int = 96,
    n_tiny: int | None = None,
    category: str | None = None,
) -> Path:
    """Write the high-resolution benchmark to ``out_dir`` (MVTec layout) and return ``out_dir``.

    ``out_dir`` gets ``train/good``, ``test/good``, ``test/tiny``, ``test/large`` and
    ``ground_truth/{tiny,large}/<stem>_mask.png``. ``n_tiny`` hosts (default: half of the good
    test images) receive transplanted defects.
    """
    low, high = tiny_per_image
    if not 1 <= low <= high:
        raise ConfigError(f"tiny_per_image must be (low, high) with 1 <= low <= high, got {tiny_per_image}")
    if min_side < 1 or tiny_max_side < min_side:
        raise ConfigError(f"need 1 <= min_side <= tiny_max_side, got {min_side} and {tiny_max_side}")
    if target_size < 4 * min_side:
        raise ConfigError(f"target_size {target_size} is too small for defects of at least {min_side} px")
    dataset = load_dataset(source_root, layout="auto", category=category)
    if dataset.layout not in ("mvtec", "visa", "mvtec_ad2"):
        raise InputError(
            f"{dataset.root}: a {dataset.layout!r} layout has no normal/anomalous split to build from"
        )
    goods = [sample.path for sample in dataset.test if sample.label == GOOD]
    anomalous = [
        (s.path, s.mask_path) for s in dataset.test if s.label == ANOMALOUS and s.mask_path is not None
    ]
    if not anomalous:
        raise InputError(f"{dataset.root}: no anomalous test images with masks to take defects from")
    n_tiny = _default_tiny_hosts(len(goods)) if n_tiny is None else n_tiny
    if not 0 <= n_tiny <= len(goods):
        raise ConfigError(f"n_tiny={n_tiny} but {dataset.root} has {len(goods)} good test images")

    rng = np.random.default_rng(seed)
    final = Path(out_dir)
    out = _staging_folder(final)  # a bad --out now, before the images are read
    try:
        for path in dataset.train:
            write_image(
                out / "train" / "good" / f"{path.stem}.png", _upscale_image(read_image(path), target_size)
            )

        host_indices = set(rng.permutation(len(goods))[:n_tiny].tolist())
        for index, path in enumerate(goods):
            if index not in host_indices:
                write_image(
                    out / "test" / "good" / f"{path.stem}.png", _upscale_image(read_image(path), target_size)
                )

        for path, mask_path in anomalous:
            image = read_image(path)
            mask = read_mask(mask_path, image.shape[:2], image_path=path)
            stem = f"{path.parent.name}_{path.stem}"
            write_image(out / "test" / "large" / f"{stem}.png", _upscale_image(image, target_size))
            write_mask(out / "ground_truth" / "large" / f"{stem}_mask.png", _upscale_mask(mask, target_size))

        sources = [
            (source, size_range)
            for source in _defect_sources(anomalous)
            if (size_range := _size_range(source, min_side, tiny_max_side)) is not None
        ]
        if n_tiny and not sources:
            raise InputError(
                f"{dataset.root}: no defect region can be shrunk to a box with sides >= {min_side} px"
            )
        placements: list[TinyPlacement] = []
        cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
        for index in sorted(host_indices):
            host_path = goods[index]
            host = _upscale_image(read_image(host_path), target_size)
            wanted = low if rng.random() < 0.6 else int(rng.integers(low, high + 1))
            mask = np.zeros(host.shape[:2], dtype=bool)
            occupied = np.zeros(host.shape[:2], dtype=bool)
            output = f"{host_path.stem}.png"
            placed_here = 0
            for _ in range(wanted * 5):
                if placed_here >= wanted:
                    break
                source, (lowest, highest) = sources[int(rng.integers(len(sources)))]
                crop, defect = _cut_defect(source, float(rng.uniform(lowest, highest)), cache)
                defect = keep_components_at_least(defect, min_side)
                if not defect.any():
                    continue
                pasted = _paste(host, occupied, crop, defect, rng)
                if pasted is None:
                    continue
                host, placed, (x, y) = pasted
                placed_here += 1
                mask |= placed
                pad = 2 * _BLEND_MARGIN
                occupied[
                    max(0, y - pad) : y + defect.shape[0] + pad, max(0, x - pad) : x + defect.shape[1] + pad
                ] = True
                placements.append(
                    TinyPlacement(
                        host=str(host_path),
                        output=f"test/tiny/{output}",
                        source_image=str(source.image),
                        source_box_xywh=[source.x, source.y, source.width, source.height],
                        placed_box_xywh=[x, y, defect.shape[1], defect.shape[0]],
                    )
                )
            if not mask.any():
                # the host stays normal rather than being dropped: keep the test set complete
                write_image(out / "test" / "good" / output, host)
                continue
            write_image(out / "test" / "tiny" / output, host)
            write_mask(out / "ground_truth" / "tiny" / f"{host_path.stem}_mask.png", mask)

        manifest = {
            "source_root": str(dataset.root),
            "category": dataset.category,
            "target_size": target_size,
            "seed": seed,
            "tiny_per_image": [low, high],
            "min_side": min_side,
            "tiny_max_side": tiny_max_side,
            "upscaling": "bicubic (StableSR unavailable)",
            "tiny": [asdict(placement) for placement in placements],
        }
        (out / HD_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        move_into_place(out, final)
    except BaseException:  # an error, Ctrl-C, SIGTERM: nothing half-built is left for a fit to take for a dataset
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final
