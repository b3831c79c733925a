"""MVTec AD 2 protocol: submission export for the evaluation server and the public-test metrics.

Submission layout (the official ``mvtec_ad_2_public_offline.py`` dataset class writes the same
paths relative to the dataset root that holds the object folders)::

    <out_dir>/anomaly_images/<object>/<split>/<stem>.tiff              single-channel float16 map
    <out_dir>/anomaly_images_thresholded/<object>/<split>/<stem>.png   uint8 0/255 binary map

for ``<split>`` in ``test_private`` and ``test_private_mixed`` (``test_public`` keeps its
``good``/``bad`` subfolder). Maps have the image's own size. The server computes AU-PRO_0.05
from the TIFFs and SegF1 from the PNGs, so the binary maps must come from a threshold that
never saw test data: the model's pixel threshold, mean + 3 std of the pixel values of the
normal ``validation/good`` images (fit with ``validation=ImageList(dataset.validation)``).

:func:`evaluate_ad2` computes the same three numbers on ``test_public`` (the split with ground
truth), on the maps exactly as submitted (rounded to float16, binarised with ``>=``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hrad.data.datasets import Dataset
from hrad.data.images import read_pixels, write_map_tiff, write_mask
from hrad.errors import ConfigError, InputError
from hrad.metrics import PixelMetrics, image_metrics
from hrad.model import AnomalyModel
from hrad.progress import ProgressCallback, no_progress

PRIVATE_SPLITS = ("test_private", "test_private_mixed")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def as_submitted(anomaly_map: np.ndarray) -> np.ndarray:
    """The map as the server reads it: float16 (clipped to its finite range), back as float32."""
    return np.clip(anomaly_map, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16).astype(np.float32)


def pixel_threshold(model: AnomalyModel) -> float:
    """The model's validation threshold (mean + k std of normal validation pixels)."""
    if model.thresholds is None:
        raise ConfigError(
            "the model has no pixel threshold; fit it with validation images "
            "(MVTec AD 2: validation=ImageList(dataset.validation)) for SegF1 and binary maps"
        )
    return float(model.thresholds.pixel)


def _split_root(dataset: Dataset, split: str) -> Path:
    return dataset.root / split


def submission_paths(dataset: Dataset, split: str, image: Path, out_dir: Path) -> tuple[Path, Path]:
    """``(tiff, png)`` paths of one image in the server's layout (subfolders inside the split are kept)."""
    try:
        relative = image.relative_to(_split_root(dataset, split))
    except ValueError:
        relative = Path(image.name)
    inside = Path(dataset.category) / split / relative
    return (
        out_dir / "anomaly_images" / inside.with_suffix(".tiff"),
        out_dir / "anomaly_images_thresholded" / inside.with_suffix(".png"),
    )


def export_submission(
    model: AnomalyModel,
    dataset: Dataset,
    out_dir: str | Path,
    splits: Sequence[str] = PRIVATE_SPLITS,
    thresholded: bool = True,
    progress: ProgressCallback = no_progress,
) -> dict[str, int]:
    """Write float16 TIFF maps (and 0/255 PNG masks) for every image of ``splits``; returns counts per split.

    ``splits`` may also name ``test_public``. Missing private splits are an error: a submission
    without them is rejected by the server.
    """
    if dataset.layout != "mvtec_ad2":
        raise InputError(f"{dataset.root}: export_submission needs an MVTec AD 2 layout, got {dataset.layout!r}")
    threshold = pixel_threshold(model) if thresholded else None
    out = Path(out_dir)
    lists: dict[str, list[Path]] = {}
    for split in splits:
        if split == "test_public":
            lists[split] = [sample.path for sample in dataset.test]
        elif split in dataset.extra:
            lists[split] = list(dataset.extra[split])
        else:
            raise InputError(f"{dataset.root / split}: no images for the {split} split")
    total = sum(len(paths) for paths in lists.values())
    done = 0
    counts: dict[str, int] = {}
    for split, paths in lists.items():
        for path in paths:
            submitted = as_submitted(model.predict(path).anomaly_map)  # the file's pixel type, as hrad predict reads it
            tiff_path, png_path = submission_paths(dataset, split, path, out)
            write_map_tiff(tiff_path, submitted, dtype=np.float16)
            if threshold is not None:
                write_mask(png_path, submitted >= threshold)
            done += 1
            progress(done, total, f"writing {split} maps")
        counts[split] = len(paths)
    return counts


def evaluate_ad2(
    model: AnomalyModel,
    dataset: Dataset,
    progress: ProgressCallback = no_progress,
) -> dict[str, Any]:
    """AU-PRO_0.05, AU-ROC_0.05 (both normalised to [0, 1]) and SegF1 at the validation threshold on ``test_public``.

    Also returns the image metrics, the threshold used and timing. Maps are rounded to
    float16 first, as in a submission.
    """
    if not dataset.test:
        raise InputError(f"{dataset.root / 'test_public'}: no labelled test images to evaluate")
    threshold = pixel_threshold(model)
    pixels = PixelMetrics(seg_thresholds=[threshold])
    scores: list[float] = []
    labels: list[int] = []
    seconds = 0.0
    for index, sample in enumerate(dataset.test):
        image = read_pixels(sample.path)  # the file's pixel type: 16-bit data is scaled by the model's bit depth
        start = time.perf_counter()
        prediction = model.predict(image, name=str(sample.path))
        seconds += time.perf_counter() - start
        pixels.add(as_submitted(prediction.anomaly_map), sample.load_mask(image.shape[:2]), name=str(sample.path))
        scores.append(prediction.score)
        labels.append(sample.label)
        progress(index + 1, len(dataset.test), "evaluating test_public")
    return {
        "aupro_05": pixels.aupro(0.05),
        "pixel_auroc_05": pixels.auroc(0.05),
        "seg_f1": pixels.f1_at(threshold),
        "seg_threshold": threshold,
        **image_metrics(np.asarray(scores), np.asarray(labels)),
        "images": len(dataset.test),
        "seconds_per_image": seconds / len(dataset.test),
    }
