"""16-bit images that hold fewer significant bits: Mono10/12/14 camera data.

Machine-vision cameras deliver 10-, 12- and 14-bit pixels in 16-bit files with the low bits
aligned, so a 12-bit image's brightest pixel is 4095. The value rule of
:func:`~hrad.data.images.pixels_to_unit` (uint16 / 65535) maps that to 0.06: the backbone sees
an almost black image and its features lose most of their contrast (VisA capsules stored as
12-bit, tiled PatchCore: AUPRO@30 0.923 instead of the 8-bit originals' 0.988; as 10-bit 0.765;
scaled first, 0.988 for both: ``benchmarks/results/bit_depth.md``). A model therefore learns how many bits its 16-bit training
images use (:func:`significant_bits`: the smallest camera depth that holds every pixel) and
brings every 16-bit image to the full 16-bit range (:func:`to_full_range`) before anything
else sees it, in fit, calibration, thresholds and predict alike. Pictures scale each 16-bit
image by its own depth (:func:`display_bits`), so a 12-bit overlay is not black either.

Most-significant-bit aligned data (a 12-bit value times 16) already spans the 16-bit range and
is left as it is; 8-bit and float images are never touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hrad.errors import ArtifactError, warn

#: the bit depths machine-vision cameras deliver in 16-bit containers (GenICam Mono10/12/14/16)
CAMERA_BIT_DEPTHS = (10, 12, 14, 16)
#: values mapped at a time by :func:`to_full_range` (8 MB of uint16)
_BAND_VALUES = 2**22


def is_wide(array: np.ndarray) -> bool:
    """Whether ``array`` holds 16-bit pixels, the only type a bit depth applies to."""
    return np.asarray(array).dtype == np.uint16


def significant_bits(peak: int) -> int:
    """The smallest of :data:`CAMERA_BIT_DEPTHS` whose range ``0 .. 2**bits - 1`` holds ``peak``."""
    return next(bits for bits in CAMERA_BIT_DEPTHS if int(peak) < 2**bits or bits == 16)


def display_bits(array: np.ndarray) -> int | None:
    """The depth a picture scales a 16-bit image by (its own :func:`significant_bits`); None for
    other types, which pictures take by the value rule."""
    return significant_bits(int(array.max())) if is_wide(array) and array.size else None


def full_range_table(bits: int) -> np.ndarray:
    """The lookup table ``value -> round(value * 65535 / (2**bits - 1))``, saturating at 65535."""
    scale = 65535.0 / (2**bits - 1)
    return np.minimum(np.rint(np.arange(65536, dtype=np.float64) * scale), 65535).astype(np.uint16)


def to_full_range(array: np.ndarray, bits: int | None, in_place: bool = False) -> np.ndarray:
    """A 16-bit image of ``bits`` significant bits scaled to the full 16-bit range (values above
    ``2**bits - 1`` saturate, as a camera's do); any other type, ``bits`` None or 16, comes back
    as it is. A band of rows at a time through one lookup table, so the only full-size array is
    the result: ``in_place`` writes it into ``array`` (when writable) instead of a new one. A gray
    image broadcast to RGB (:func:`~hrad.data.images.read_pixels` of a gray file) stays one plane
    (2 bytes a pixel), read-only like the view it replaces."""
    if bits is None or bits >= 16 or not is_wide(array):
        return array
    if array.ndim == 3 and array.strides[2] == 0:  # a gray image broadcast to RGB: scale its one plane
        plane = to_full_range(array[..., 0], bits, in_place=in_place)
        return np.broadcast_to(plane[..., None], array.shape)
    table = full_range_table(bits)
    out = array if in_place and array.flags.writeable else np.empty_like(array)
    rows = max(1, _BAND_VALUES // max(1, array[0].size)) if array.ndim else 1
    for top in range(0, len(array), rows):
        out[top : top + rows] = table[array[top : top + rows]]
    return out


def exceeds(array: np.ndarray, bits: int | None) -> int | None:
    """The peak of a 16-bit image when it lies above ``bits`` bits' range (the camera was set to
    another depth than the training images', so :func:`to_full_range` saturates it), else None."""
    if bits is None or bits >= 16 or not is_wide(array) or not array.size:
        return None
    peak = int(array.max())
    return peak if peak >= 2**bits else None


def stored_bit_depth(value: Any, where: str) -> int | None:
    """A bit depth read back from a manifest or sidecar (``where`` names it): 9..16, or None for
    files written before it (16-bit images as stored); anything else is a corrupt file."""
    if value is not None and (type(value) is not int or not 9 <= value <= 16):
        raise ArtifactError(f"{where}: bit_depth {value!r} is not a number of bits from 9 to 16; the file is corrupt")
    return value


def warn_saturated(name: str, peak: int, bits: int, at_fit: bool = False, stacklevel: int = 1) -> None:
    """The one warning that image ``name`` holds brighter pixels (up to ``peak``) than ``bits``
    allow, which :func:`to_full_range` saturates: at predict (the camera's depth changed since
    the fit) or ``at_fit`` (``bit_depth`` set below the files' depth). ``stacklevel`` counts from
    the caller of this function (:func:`hrad.errors.warn`: ``hrad serve`` returns it too)."""
    if at_fit:
        message = f"exceed the fit's {bits}-bit depth (bit_depth, 0..{2**bits - 1}); they saturate"
    else:
        message = (
            f"exceed the {bits}-bit range of the training images (0..{2**bits - 1}); they saturate "
            "(fit with bit_depth set if the camera's depth changed)"
        )
    warn(f"{name}: pixel values up to {peak} {message}", stacklevel=stacklevel + 1)


def model_range(array: np.ndarray, bit_depth: int | None, name: str, owned: bool = False) -> np.ndarray:
    """A 16-bit image at a model's ``bit_depth`` scaled to the full range
    (:func:`~hrad.data.bit_depth.to_full_range`; in place when ``owned``, the predictor's own
    decoding of a file), with a warning naming ``name`` when it holds brighter pixels than the
    training images' depth allows, which saturate. One rule for the model and its exports."""
    peak = exceeds(array, bit_depth)
    if peak is not None and bit_depth is not None:
        warn_saturated(name, peak, bit_depth, stacklevel=4)  # the caller of the predictor's predict
    return to_full_range(array, bit_depth, in_place=owned)
