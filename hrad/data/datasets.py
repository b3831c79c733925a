"""Dataset layouts: MVTec AD, VisA (original layout + split CSV), MVTec AD 2 and a plain folder.

:func:`load_dataset` turns any of them into one :class:`Dataset` of paths (images are read
lazily, later). Problems that can be found from file names alone (no normal images, an anomalous
image without a mask) are reported here, before any model runs; a mask of the wrong size is
found when the mask is read (:meth:`Sample.load_mask`), since that needs the image size.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hrad.data.images import (
    IMAGE_EXTENSIONS,
    is_image_file,
    list_images,
    mask_problem,
    missing_reason,
    read_mask,
)
from hrad.errors import InputError, warn

LAYOUTS = ("auto", "mvtec", "visa", "mvtec_ad2", "folder")
GOOD = 0
ANOMALOUS = 1
UNKNOWN = -1
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
_MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg")


@dataclass
class Sample:
    """One test image: ``label`` is 0 good, 1 anomalous, -1 unknown (unlabeled data)."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None

    def load_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The bool ``H x W`` ground truth; all False for good images (they have no mask file)."""
        if self.mask_path is not None:
            return read_mask(self.mask_path, shape, image_path=self.path)
        if self.label == GOOD:
            return np.zeros(shape, dtype=bool)
        raise InputError(
            f"{self.path}: no ground-truth mask for this {'unlabeled' if self.label == UNKNOWN else 'anomalous'} image"
        )


@dataclass
class Dataset:
    """Paths of one category: normal training images, normal validation images, test samples.

    ``extra`` holds further unlabeled image lists a layout ships (MVTec AD 2:
    ``test_private``, ``test_private_mixed``).
    """

    root: Path
    layout: str
    category: str
    train: list[Path]
    validation: list[Path]
    test: list[Sample]
    extra: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def defect_types(self) -> list[str]:
        return sorted({sample.defect_type for sample in self.test})

    def __repr__(self) -> str:
        anomalous = sum(sample.label == ANOMALOUS for sample in self.test)
        return (
            f"Dataset({self.layout} {self.category!r} at {self.root}: {len(self.train)} train, "
            f"{len(self.validation)} validation, {len(self.test)} test ({anomalous} anomalous))"
        )


def _images_or_empty(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if is_image_file(path))


def _normal_images(folder: Path, training: bool = True) -> list[Path]:
    """The normal training images in ``folder``: none is an error only when ``training`` (the
    caller fits; an evaluation of a model fitted elsewhere needs only the test part)."""
    images = _images_or_empty(folder)
    if not images and training:
        raise InputError(f"{folder}: no normal images" + ("" if folder.is_dir() else " (folder not found)"))
    return images


def _is_mask_file(image: Path, mask: Path) -> bool:
    """Whether ``mask`` is a file; a dangling symbolic link there is refused naming its target, as a
    dangling image is (it is the mask the dataset names, not a missing one)."""
    if mask.is_symlink() and not mask.exists():
        raise InputError(mask_problem(image, missing_reason(mask)))
    return mask.is_file()


def _find_mask(ground_truth: Path, image: Path) -> Path:
    """``<stem>_mask.png`` (MVTec), falling back to ``<stem>.png`` and other extensions."""
    candidates = [ground_truth / f"{image.stem}_mask{ext}" for ext in _MASK_EXTENSIONS]
    candidates += [ground_truth / f"{image.stem}{ext}" for ext in _MASK_EXTENSIONS]
    for candidate in candidates:
        if _is_mask_file(image, candidate):
            return candidate
    raise InputError(f"{image}: no mask at {candidates[0]}{_masks_named_otherwise(ground_truth, image)}")


def _masks_named_otherwise(ground_truth: Path, image: Path) -> str:
    """The files of ``ground_truth`` named like ``image`` but not as a mask is looked for
    ('000_gt.png'), for the 'no mask at' line: it named only the first name looked for, and a
    user whose masks carry another suffix could not tell the mask was there all along."""
    try:
        near = sorted(entry.name for entry in ground_truth.iterdir() if entry.name.startswith(image.stem) and entry.suffix.lower() in _MASK_EXTENSIONS)
    except OSError:
        return "" if ground_truth.is_dir() else f" ({ground_truth}: {'not a folder' if ground_truth.exists() else 'folder not found'})"
    if not near:
        return ""
    return f" (that folder holds {', '.join(near[:3])}{', ...' if len(near) > 3 else ''}: name masks {image.stem}_mask.png or {image.stem}.png)"


def _mvtec_test(test_root: Path, ground_truth_root: Path) -> list[Sample]:
    """Test samples from ``<test_root>/<type>/`` with masks in ``<ground_truth_root>/<type>/``."""
    if not test_root.is_dir():
        raise InputError(f"{test_root}: folder not found (expected one subfolder per defect type)")
    samples: list[Sample] = []
    for type_folder in sorted(path for path in test_root.iterdir() if path.is_dir()):
        if type_folder.name == "ground_truth":
            continue
        for image in _images_or_empty(type_folder):
            if type_folder.name == "good":
                samples.append(Sample(image, GOOD, "good", None))
            else:
                mask = _find_mask(ground_truth_root / type_folder.name, image)
                samples.append(Sample(image, ANOMALOUS, type_folder.name, mask))
    if not samples:
        raise InputError(f"{test_root}: no test images in its subfolders")
    return samples


def _load_mvtec(root: Path, category: str, training: bool) -> Dataset:
    train = _normal_images(root / "train" / "good", training)
    test = _mvtec_test(root / "test", root / "ground_truth")
    return Dataset(root, "mvtec", category, train, [], test)


def _load_mvtec_ad2(root: Path, category: str, training: bool) -> Dataset:
    train = _normal_images(root / "train" / "good", training)
    validation = _images_or_empty(root / "validation" / "good")
    public = root / "test_public"
    test = _mvtec_test(public, public / "ground_truth") if public.is_dir() else []
    extra: dict[str, list[Path]] = {}
    for name in ("test_private", "test_private_mixed"):
        folder = root / name
        images = _images_or_empty(folder)
        # some releases keep private images in a subfolder (e.g. test_private/<anything>/)
        if not images and folder.is_dir():
            images = sorted(path for path in folder.rglob("*") if is_image_file(path))
        if images:
            extra[name] = images
    if not test and not extra:
        raise InputError(f"{root}: MVTec AD 2 layout without test_public, test_private or test_private_mixed")
    return Dataset(root, "mvtec_ad2", category, train, validation, test, extra)


def _visa_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
            if missing:
                raise InputError(f"{csv_path}: split CSV lacks column(s) {', '.join(sorted(missing))}")
            return [{key: (value or "").strip() for key, value in row.items() if key} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{csv_path}: not a readable split CSV ({error})") from None


def _load_visa(root: Path, category: str | None, training: bool) -> Dataset:
    csv_path = root / VISA_SPLIT_CSV
    rows = _visa_rows(csv_path)
    objects = sorted({row["object"] for row in rows})
    if category is None:
        if len(objects) != 1:
            raise InputError(
                f"{csv_path}: lists {len(objects)} objects; pick one with --category (category= in Python): {', '.join(objects)}"
            )
        category = objects[0]
    if category not in objects:
        raise InputError(f"{csv_path}: no object {category!r}; known: {', '.join(objects)}")
    train: list[Path] = []
    test: list[Sample] = []
    for row in rows:
        if row["object"] != category:
            continue
        image = root / row["image"]
        if not image.is_file():
            raise InputError(f"{image}: file not found (listed in {csv_path})")
        anomalous = row["label"].lower() in {"anomaly", "anomalous", "bad", "1"}
        if row["split"].lower() == "train":
            if anomalous:
                continue  # the one-class split never trains on anomalies
            train.append(image)
        elif anomalous:
            mask = root / row["mask"] if row["mask"] else None
            if mask is None or not _is_mask_file(image, mask):
                expected = mask if mask is not None else "(no mask column value)"
                raise InputError(f"{image}: no mask at {expected}")
            test.append(Sample(image, ANOMALOUS, "bad", mask))
        else:
            test.append(Sample(image, GOOD, "good", None))
    if not train and training:
        raise InputError(f"{csv_path}: no normal images for {category!r} in the train split")
    return Dataset(root, "visa", category, sorted(train), [], test)


def _load_folder(root: Path, category: str) -> Dataset:
    images = list_images(root)
    return Dataset(
        root, "folder", category, [], [], [Sample(path, UNKNOWN, "unknown", None) for path in images]
    )


def detect_layout(root: Path) -> str:
    """The layout of ``root`` guessed from the files present; an error when nothing fits."""
    if (root / VISA_SPLIT_CSV).is_file():
        return "visa"
    if (root / "test_public").is_dir() or (
        (root / "train").is_dir() and any((root / name).is_dir() for name in ("validation", "test_private", "test_private_mixed"))
    ):
        return "mvtec_ad2"
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "mvtec"
    if _images_or_empty(root):
        return "folder"
    categories = _category_folders(root)
    if categories:
        raise InputError(
            f"{root}: holds several categories; pick one with --category (category= in Python): {', '.join(categories)}"
        )
    extensions = " ".join(sorted(IMAGE_EXTENSIONS))
    raise InputError(
        f"{root}: no known dataset layout (no train/, test/, split_csv/1cls.csv, or images with {extensions})"
    )


def _category_folders(root: Path) -> list[str]:
    """The category folders of a multi-category root: each holds a train or a test part."""
    return sorted(path.name for path in root.iterdir() if path.is_dir() and any((path / part).is_dir() for part in ("train", "test", "test_public")))


def _tell_nested_images(folder: Path, used: int) -> None:
    """One warning when a plain folder of good images has images in its subfolders too (a
    camera's day folders): a folder's images are those directly in it, and a fit on
    ``good/`` with ``good/line1/day1/*.jpg`` learned from the one top-level image, without a word.
    Symbolic links to folders are not followed (a link to ``..`` would loop)."""
    nested: dict[str, int] = {}
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # .thumbnails and the like
        if Path(parent) == folder:
            continue
        count = sum(is_image_file(Path(parent) / name) for name in files)
        if count:
            top = Path(parent).relative_to(folder).parts[0]
            nested[top] = nested.get(top, 0) + count
    if nested:
        total = sum(nested.values())
        names = ", ".join(sorted(nested)[:5]) + (", ..." if len(nested) > 5 else "")
        warn(
            f"{folder}: {total} image{'' if total == 1 else 's'} in its subfolders ({names}) not used: a folder of good "
            f"images is the images directly in it ({used} here); move them there to train on them",
            stacklevel=3,
        )


def training_images(root: str | os.PathLike[str], category: str | None = None) -> tuple[list[Path], list[Path]]:
    """What ``fit`` learns from: ``(train, validation)`` normal images of a dataset (MVTec AD,
    VisA, MVTec AD 2; ``category`` picks one of a multi-category root), or every image of a
    plain folder of good images (validation empty)."""
    dataset = load_dataset(root, category=category)
    if dataset.layout == "folder":
        _tell_nested_images(dataset.root, len(dataset.test))
        return [sample.path for sample in dataset.test], []
    return dataset.train, dataset.validation


def load_dataset(
    root: str | os.PathLike[str], layout: str = "auto", category: str | None = None, training: bool = True
) -> Dataset:
    """Load the paths of one dataset category.

    ``root`` is a category folder (``.../bottle``) or, with ``category=``, the folder holding
    categories (``.../mvtec_ad`` + ``category="bottle"``); for VisA it is the folder with
    ``split_csv/1cls.csv`` and ``category`` picks the object. ``training=False``: the caller
    needs only the test part (``hrad evaluate`` of a model fitted elsewhere, on a labelled test
    set: MVTec's ``test/`` and ``ground_truth/`` alone), so a missing train part is no error.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise InputError(f"unknown dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if not root.exists():  # a link to nowhere or a loop says so, as an image's link does
        raise InputError(missing_reason(root) if root.is_symlink() else f"{root}: dataset folder not found")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    is_visa = layout == "visa" or (layout == "auto" and (root / VISA_SPLIT_CSV).is_file())
    if category is not None and not is_visa:
        if (root / category).is_dir():
            root = root / category
        elif (root / category).is_symlink() and not (root / category).exists():
            raise InputError(missing_reason(root / category))
        elif category != root.name:  # a category folder given together with its own name is fine
            known = _category_folders(root)
            listing = f"categories here: {', '.join(known)}" if known else "it holds no category folders"
            raise InputError(f"{root}: no category {category!r} ({listing})")
    if layout == "auto":
        layout = detect_layout(root)
    name = category if category is not None else root.name
    if layout == "mvtec":
        return _load_mvtec(root, name, training)
    if layout == "mvtec_ad2":
        return _load_mvtec_ad2(root, name, training)
    if layout == "visa":
        if not (root / VISA_SPLIT_CSV).is_file():
            raise InputError(f"{root / VISA_SPLIT_CSV}: file not found (VisA layout needs its split CSV)")
        return _load_visa(root, category, training)
    return _load_folder(root, name)
