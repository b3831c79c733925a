"""Data input: images and masks from files, dataset layouts, and synthetic dataset builders."""

from hrad.data.datasets import ANOMALOUS, GOOD, UNKNOWN, Dataset, Sample, detect_layout, load_dataset
from hrad.data.hd_builder import build_hd_dataset
from hrad.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageList,
    image_size,
    list_images,
    max_pixels,
    overlay_image,
    pixel_budget,
    read_image,
    read_mask,
    to_unit_float,
    write_image,
    write_map_png16,
    write_map_tiff,
    write_mask,
    write_overlay,
)
from hrad.data.synthetic import make_demo_dataset

__all__ = [
    "ANOMALOUS",
    "DEFAULT_MAX_PIXELS",
    "GOOD",
    "IMAGE_EXTENSIONS",
    "UNKNOWN",
    "Dataset",
    "ImageList",
    "Sample",
    "build_hd_dataset",
    "detect_layout",
    "image_size",
    "list_images",
    "load_dataset",
    "make_demo_dataset",
    "max_pixels",
    "overlay_image",
    "pixel_budget",
    "read_image",
    "read_mask",
    "to_unit_float",
    "write_image",
    "write_map_png16",
    "write_map_tiff",
    "write_mask",
    "write_overlay",
]
