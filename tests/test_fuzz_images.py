"""Fuzzing the image reader: random bytes and mutated headers of PNG, JPEG, BMP and TIFF.

Whatever the bytes, :func:`read_image` returns a float32 ``H x W x 3`` image in [0, 1] within
the pixel budget, or raises :class:`InputError`; nothing else (no cv2.error, no MemoryError,
no struct.error, no hang). The budget is small here so that mutated sizes are refused, not
decoded.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hrad.data.images import pixel_budget, read_image
from hrad.errors import InputError

BUDGET = 256 * 256
FORMATS = (".png", ".jpg", ".bmp", ".tiff")
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _seed_image(suffix: str) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    if suffix == ".tiff":
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, pixels, compression="zlib")
        return buffer.getvalue()
    ok, data = cv2.imencode(suffix, pixels)
    assert ok
    return data.tobytes()


SEEDS = {suffix: _seed_image(suffix) for suffix in FORMATS}


def _check(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(data)
        with pixel_budget(BUDGET):
            try:
                image = read_image(path)
            except InputError as error:
                assert "\n" not in str(error) and str(path) in str(error)
                return
    assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= BUDGET
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(FORMATS))
def test_random_bytes_are_an_image_or_one_input_error(data: bytes, suffix: str) -> None:
    _check(data, suffix)


@FUZZ
@given(
    suffix=st.sampled_from(FORMATS),
    edits=st.lists(st.tuples(st.integers(0, 95), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(1, 4096)),
)
def test_mutated_headers_are_an_image_or_one_input_error(suffix: str, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(SEEDS[suffix])
    for offset, value in edits:  # the first 96 bytes hold every format's size fields
        data[offset % len(data)] = value
    _check(bytes(data[:cut] if cut else data), suffix)


@pytest.mark.parametrize("suffix", FORMATS)
def test_seed_images_read(suffix: str) -> None:
    _check(SEEDS[suffix], suffix)  # the unmutated seeds are valid images
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"seed{suffix}"
        path.write_bytes(SEEDS[suffix])
        assert read_image(path).shape == (24, 32, 3)
