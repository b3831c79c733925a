"""Data input: images and masks from files, dataset layouts, and synthetic dataset builders."""

from hrad.data.datasets import ANOMALOUS, GOOD, UNKNOWN, Dataset, Sample, detect_layout, load_dataset
from hrad.data.hd_builder import build_hd_dataset
from hrad.data.images import (
    IMAGE_EXTENSIONS,
    ImageList,
    list_images,
    overlay_image,
    read_image,
    read_mask,
    write_image,
    write_map_png16,
    write_map_tiff,
    write_mask,
    write_overlay,
)
from hrad.data.synthetic import make_demo_dataset

__all__ = [
    "ANOMALOUS",
    "GOOD",
    "IMAGE_EXTENSIONS",
    "UNKNOWN",
    "Dataset",
    "ImageList",
    "Sample",
    "build_hd_dataset",
    "detect_layout",
    "list_images",
    "load_dataset",
    "make_demo_dataset",
    "overlay_image",
    "read_image",
    "read_mask",
    "write_image",
    "write_map_png16",
    "write_map_tiff",
    "write_mask",
    "write_overlay",
]
