"""Reading images and masks, listing image folders, and writing maps and overlays.

Every image enters the library as ``H x W x 3`` RGB whatever its format (PNG, JPEG, BMP,
TIFF), bit depth (8/16-bit, float TIFF) or channels (gray, RGB, RGBA), so no other module ever
sees a file format: :func:`read_pixels` / :func:`as_pixels` keep the file's pixel type (uint8,
uint16; a decoded image costs its bytes) for prediction, whose strategies convert each tile
window to float32 in [0, 1] as they cut it (:func:`pixels_to_unit`); :func:`read_image` /
:func:`as_image` give the whole image as float32 in [0, 1] (12 bytes a pixel). Files are decoded from bytes (``cv2.imdecode``) so that
paths with non-ASCII characters work everywhere; gray and RGB TIFFs go through tifffile, which reads
float and multi-sample files that OpenCV rejects; TIFFs in another colour model (palette, CMYK,
YCbCr, MinIsWhite) through OpenCV, whose libtiff turns them into RGB (at 8 bits; deeper ones are
refused in one line). Writes are atomic (temporary file + rename), so an
interrupted run never leaves a half-written map behind; written files get the process umask's
permissions like any other file.

Hostile files: before any pixel is decoded, the width and height are read from the file's
header (PIL's header parsers for PNG/JPEG/BMP, tifffile for TIFF) and checked against the
pixel budget (:func:`max_pixels`: :data:`DEFAULT_MAX_PIXELS`, the ``HRAD_MAX_PIXELS``
environment variable, or :func:`pixel_budget`), so a decompression bomb costs a few bytes of
header, never its decoded size; a TIFF page's decoded bytes (its samples per pixel, up to 65535,
which the pixel count does not see) are held to :data:`MAX_PIXEL_BYTES` a pixel of that budget. A file no header parser recognises as PNG, JPEG, BMP or TIFF
is refused, whatever OpenCV could decode. A file whose header reads but whose pixel data does
not decode is "truncated or corrupt"; a PNG's chunks are walked (lengths, critical chunks'
CRCs and order, IEND) and its pixel data inflated (one zlib stream, the header's rows, valid
filter types) before libpng sees it (:mod:`hrad.data.png_check`), because libpng prints its own "libpng error: ..." line to
stderr, which no log level silences, and OpenCV's log is silenced while hrad decodes: the one
line hrad raises is the whole report. A whole PNG reaches libpng without what libpng would only
warn about (ancillary chunks but its transparency, bytes after the pixel data's zlib stream), so
a folder of such files does not print a "libpng warning: ..." line per image either.

Pixel values: integer images are divided by their type's maximum (8-bit by 255, 16-bit by
65535, negative values of signed types clipped to 0); float images must already lie in
[0, 1] (values within 1e-3 outside are clipped) and must be finite. Files and in-memory arrays
(:func:`to_unit_float`) follow the same rule; floats are checked once on entry, integers scaled
wherever pixels become float (:func:`pixels_to_unit`).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import logging
import math
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import cv2
import numpy as np
import tifffile

from hrad.data.bit_depth import display_bits, model_range, to_full_range
from hrad.data.png_check import PNG_SIGNATURE, png_damage, png_for_libpng, png_head_without_bad_chunks
from hrad.errors import ArtifactError, ConfigError, ImageTooLargeError, InputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF

#: The default pixel budget: 2**28 pixels (268 megapixels) = 16384 x 16384, or an 8K line-scan
#: strip of 8192 x 32768. Decoded as 8-bit RGB that is 805 MB (prediction keeps the file's
#: pixel type and converts tile by tile); larger images need a larger budget (``hrad
#: --max-pixels``, ``HRAD_MAX_PIXELS``) and the memory to match.
DEFAULT_MAX_PIXELS = 2**28
#: Values this far outside [0, 1] in float images are rounding, not another scale.
FLOAT_TOLERANCE = 1e-3
#: Values converted at a time where a whole image is turned into another type in bands (16 MB as float32).
_BAND_VALUES = 2**22

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("hrad_max_pixels", default=None)


def _checked_budget(value: int | float | str, source: str) -> int:
    try:
        budget = int(float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: pixel budget {value!r} is not a number") from None
    if budget < 1:
        raise ConfigError(f"{source}: pixel budget must be at least 1 pixel, got {value!r}")
    return budget


def max_pixels() -> int:
    """The pixel budget in force: :func:`pixel_budget` / :func:`set_max_pixels`, else
    ``HRAD_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    value = _BUDGET.get()
    if value is not None:
        return value
    environment = os.environ.get("HRAD_MAX_PIXELS")
    if environment:
        return _checked_budget(environment, "HRAD_MAX_PIXELS")
    return DEFAULT_MAX_PIXELS


def set_max_pixels(value: int | float | None) -> None:
    """Set the pixel budget for this context (None = back to the default)."""
    _BUDGET.set(None if value is None else _checked_budget(value, "max_pixels"))


@contextlib.contextmanager
def pixel_budget(value: int | float | None) -> Iterator[int]:
    """Read images under another pixel budget inside the block."""
    token = _BUDGET.set(None if value is None else _checked_budget(value, "max_pixels"))
    try:
        yield max_pixels()
    finally:
        _BUDGET.reset(token)


_PIL_WARNINGS = threading.Lock()


def _header_size_pil(path: Path, prefix: bytes) -> tuple[int, int] | None:
    """(height, width) from PIL's header parser for PNG/JPEG/BMP/TIFF; None if none accepts it.

    The format plugins are called directly: ``Image.open`` would apply PIL's own (smaller,
    global) decompression-bomb limit instead of ours.
    """
    from PIL import Image

    Image.init()
    for name in ("PNG", "JPEG", "BMP", "TIFF"):
        factory, accept = Image.OPEN[name]
        if accept is not None and not accept(prefix):
            continue
        try:
            # catch_warnings swaps the process's warning filters: two threads' blocks interleaving
            # (hrad serve's uploads, loader threads) left "ignore" in place for good, silencing
            # every later warning of the process; one block at a time restores them in order
            with path.open("rb") as handle, _PIL_WARNINGS, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the error below says it
                # an ancillary chunk with a bad CRC, which PIL refuses and libpng (the decode) drops
                head = png_head_without_bad_chunks(handle, os.fstat(handle.fileno()).st_size) if name == "PNG" else None
                opened = factory(io.BytesIO(head) if head is not None else handle, str(path))
                width, height = opened.size
        except Exception as error:  # noqa: BLE001 - PIL raises many types for broken headers
            raise InputError(f"{path}: not a readable image (broken {name} header: {_one_line(error)})") from None
        return int(height), int(width)
    return None


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header alone, without decoding pixels."""
    path = Path(path)
    _check_file(path)
    try:
        with path.open("rb") as handle:
            prefix = handle.read(16)
    except OSError as error:
        raise InputError(f"{path}: not a readable image ({_one_line(error)})") from None
    if prefix[:4] in _TIFF_MAGIC:
        try:
            with _TIFFFILE.reading(), tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001,S110 - PIL's TIFF parser below gives the verdict
            pass
    size = _header_size_pil(path, prefix)
    if size is None:
        raise InputError(f"{path}: not a readable image (not a PNG, JPEG, BMP or TIFF file)")
    return size


def check_pixel_budget(path: str | os.PathLike[str], budget: int | None = None) -> tuple[int, int]:
    """The header's ``(height, width)``; :class:`ImageTooLargeError` if over the pixel budget."""
    height, width = image_size(path)
    limit = max_pixels() if budget is None else _checked_budget(budget, "max_pixels")
    if height * width > limit:
        raise ImageTooLargeError(
            f"{path}: image is {width}x{height} = {height * width} pixels, over the pixel budget of {limit} "
            "(raise it with hrad --max-pixels or HRAD_MAX_PIXELS if this is intended)"
        )
    if height == 0 or width == 0:
        raise InputError(f"{path}: not a readable image (zero-sized)")
    return height, width


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


def missing_reason(path: Path, or_folder: bool = False) -> str:
    """Why ``path`` (which does not exist) is missing: a dangling symbolic link says where it
    points; links that point at each other (a.png -> b.png -> a.png) are a loop, not a missing target.
    ``or_folder``: the path may name an image or a folder of them (predict's inputs), so a name
    without an image's extension is a missing folder (``good/``, a mistyped ``goood``), or with
    another extension a missing file or folder, not a missing file."""
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            return f"{path}: broken symbolic link"
        try:
            path.stat()
        except OSError as error:
            if error.errno == errno.ELOOP:
                return f"{path}: symbolic link loop (it points to {target}, which leads back to it)"
        return f"{path}: broken symbolic link (its target {target} does not exist)"
    if or_folder and path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"{path}: {'file or folder' if path.suffix else 'folder'} not found"
    return f"{path}: file not found"


def mask_problem(image_path: str | os.PathLike[str] | None, reason: str) -> str:
    """A mask file's problem as one line that names first the image it labels: ``<image>: mask
    <reason>``, where ``reason`` starts with the mask's path (``<mask>: empty file``), so a
    dataset's broken mask reads as a problem of that test image and says it is the mask."""
    return f"{image_path}: mask {reason}" if image_path is not None else f"mask {reason}"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(missing_reason(path))
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")


def decode_raw(path: Path, budget: int | None = None) -> np.ndarray:
    """Decode a file into its raw array: ``H x W`` or ``H x W x C`` in RGB(A) channel order
    (alpha kept: what :func:`read_pixels` builds on, and what a reader that needs alpha takes).

    The header is checked against the pixel budget first; the decoded array must have the
    header's size (a file whose pixel data disagrees with its header is refused).
    """
    height, width = check_pixel_budget(path, budget)
    array = _decode_checked(path, max_pixels() if budget is None else _checked_budget(budget, "max_pixels"))
    if array.shape[:2] != (height, width):
        raise InputError(
            f"{path}: not a readable image (header says {width}x{height}, pixel data is "
            f"{array.shape[1] if array.ndim > 1 else 0}x{array.shape[0]})"
        )
    return array


class _QuietTifffile(logging.Filter):
    """tifffile's log records dropped on a thread while it reads a file for hrad: tifffile logs a
    broken file (``<tifffile.TiffPages @32728> invalid offset to first page 32728``) to stderr
    beside the one-line error hrad gives for it. Per thread, so loader threads reading at once
    and other users of tifffile in the process keep theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "reading", 0)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        self.local.reading = getattr(self.local, "reading", 0) + 1
        try:
            yield
        finally:
            self.local.reading -= 1


_TIFFFILE = _QuietTifffile()
logging.getLogger("tifffile").addFilter(_TIFFFILE)

_OPENCV_LOG = threading.Lock()
_OPENCV_QUIET = [0, 0]  # decodes in progress, the log level to restore when the last one ends


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV's log silenced while hrad decodes: its decoders log a broken file at length to
    stderr ("[ERROR:0@0.2] ... Unexpected end of input stream"), which the one-line error says.
    Counted, so loader threads decoding at once restore the caller's level only at the last."""
    with _OPENCV_LOG:
        if _OPENCV_QUIET[0] == 0:
            _OPENCV_QUIET[1] = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _OPENCV_QUIET[0] += 1
    try:
        yield
    finally:
        with _OPENCV_LOG:
            _OPENCV_QUIET[0] -= 1
            if _OPENCV_QUIET[0] == 0:
                cv2.utils.logging.setLogLevel(_OPENCV_QUIET[1])


#: TIFF colour models whose samples tifffile returns as stored, which are the pixels: gray
#: (MinIsBlack) and RGB; the others (MinIsWhite, palette, CMYK, YCbCr, CIELab, ...) are not
_TIFF_AS_STORED = frozenset({tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB})


#: bytes a decoded pixel may take at most (float32 RGBA): with the pixel budget, the bound on what a
#: TIFF's page decodes to, whose samples per pixel (up to 65535) the pixel budget does not see
MAX_PIXEL_BYTES = 16


def _tiff_colour_model(path: Path, page: tifffile.TiffPage, budget: int) -> bool:
    """Whether a TIFF page's samples are its pixels as they are (gray or RGB); False when they
    need a colour conversion that libtiff does and OpenCV's reader applies (MinIsWhite, palette,
    CMYK, YCbCr at 8 bits or fewer). A colour model neither reads right is refused in one line:
    taken as stored, a palette image read as its indices, a MinIsWhite one inverted, CMYK ink
    as RGB, and predicted without a word."""
    if page.nbytes > budget * MAX_PIXEL_BYTES:
        raise ImageTooLargeError(
            f"{path}: image decodes to {page.nbytes} bytes ({page.imagewidth}x{page.imagelength}, {page.samplesperpixel} samples "
            f"of {page.dtype} a pixel), over the {budget * MAX_PIXEL_BYTES} bytes the pixel budget of {budget} allows "
            f"({MAX_PIXEL_BYTES} a pixel; raise it with hrad --max-pixels or HRAD_MAX_PIXELS if this is intended)"
        )
    photometric = page.photometric
    if photometric in _TIFF_AS_STORED:
        return True
    if page.bitspersample <= 8 and page.sampleformat == tifffile.SAMPLEFORMAT.UINT:
        return False
    name = getattr(photometric, "name", str(photometric))
    raise InputError(
        f"{path}: not a readable image ({page.bitspersample}-bit TIFF in the {name} colour model; "
        "hrad reads gray and RGB TIFFs of any depth and other colour models at 8 bits: save it as gray or RGB)"
    )


def _decode_checked(path: Path, budget: int) -> np.ndarray:
    if path.suffix.lower() in _TIFF_EXTENSIONS:
        try:
            with _TIFFFILE.reading(), tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                as_stored = _tiff_colour_model(path, page, budget)  # type: ignore[arg-type]
                array = page.asarray() if as_stored else None
                planar = array is not None and (
                    getattr(page, "planarconfig", 1) == 2
                    or (array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (1, 2, 3, 4))
                )
            if array is not None:
                return np.moveaxis(array, 0, -1) if array.ndim == 3 and planar else np.asarray(array)
            tiff_error: Exception | None = None  # another colour model: OpenCV (libtiff) converts it to RGB
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - fall back to OpenCV, which reports its own failure
            tiff_error = error
    else:
        tiff_error = None
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise InputError(f"{path}: not a readable image ({_one_line(error)})") from None
    gray_alpha = False
    if data[: len(PNG_SIGNATURE)].tobytes() == PNG_SIGNATURE:
        gray_alpha = len(data) > 25 and data[25] == 4  # IHDR's colour type: gray + alpha
        walk = png_damage(data.data)
        if walk.damage is not None:
            raise InputError(f"{path}: truncated or corrupt image ({walk.damage})")
        data = png_for_libpng(data, walk)
    try:
        with _quiet_opencv():
            decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as error:  # e.g. over OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS, 2**30)
        raise InputError(f"{path}: not a readable image (OpenCV: {_one_line(error)})") from None
    if decoded is None:  # the header was read (check_pixel_budget), so the pixel data is what is broken
        reason = _one_line(tiff_error) if tiff_error is not None else "OpenCV cannot decode its pixel data"
        raise InputError(f"{path}: truncated or corrupt image ({reason})")
    array = np.asarray(decoded)
    # in place: the decoded array is ours, and a second copy would double the peak of a large image
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB, dst=array)
    elif array.ndim == 3 and array.shape[2] == 4 and gray_alpha:
        # libpng expands a gray + alpha PNG to BGRA for OpenCV: back to gray + alpha, so the image
        # is gray as the file is (is_gray) and holds 2 bytes a pixel, not 4
        array = array[:, :, [0, 3]]
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA, dst=array)
    return array


def _float_pixels(array: np.ndarray, name: str | os.PathLike[str]) -> np.ndarray:
    """A float image as float32 after the float half of the value rule: finite, within [0, 1]
    up to :data:`FLOAT_TOLERANCE` (clipped only where it strays, so an in-range float32 array
    is returned as it is, not copied)."""
    converted = array.astype(np.float32, copy=False)
    if not converted.size:
        return converted
    if not np.isfinite(converted).all():
        raise InputError(f"{name}: image has NaN or infinite pixel values")
    low, high = float(converted.min()), float(converted.max())
    if low < -FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
        raise InputError(
            f"{name}: float pixel values span [{low:g}, {high:g}], not [0, 1] "
            "(scale them to [0, 1]: 8-bit data / 255, or pass the integer array)"
        )
    return np.clip(converted, 0.0, 1.0) if low < 0 or high > 1 else converted


def _checked_pixels(array: np.ndarray, name: str | os.PathLike[str]) -> np.ndarray:
    """Integers and bools as they are; floats through :func:`_float_pixels`; anything else refused."""
    dtype = array.dtype
    if np.issubdtype(dtype, np.floating):
        return _float_pixels(array, name)
    if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
        return array
    raise InputError(f"{name}: not a readable image (unsupported pixel type {dtype})")


def pixels_to_unit(array: np.ndarray) -> np.ndarray:
    """Pixels in their own type -> float32 in [0, 1]: the per-tile half of the value rule.

    Integers are divided by their type's maximum (uint8 by 255, uint16 by 65535; negative values
    of signed types clip to 0), bools are 0/1, floats are cast to float32 (not copied when they
    already are). Floats are not checked here: :func:`read_pixels` and :func:`as_pixels` check
    them once, on entry (:func:`to_unit_float` does both halves at once).
    """
    dtype = array.dtype
    divisor = unit_divisor(dtype)
    if divisor is None:
        return array.astype(np.float32, copy=False)
    if dtype == np.bool_:
        return array.astype(np.float32)
    source = np.clip(array, 0, None) if np.issubdtype(dtype, np.signedinteger) else array
    return np.divide(source, np.float32(divisor), dtype=np.float32)


def unit_divisor(dtype: np.dtype) -> float | None:
    """What pixels of ``dtype`` are divided by to lie in [0, 1] (the value rule of
    :func:`pixels_to_unit`, which the strategies' device copies follow too): an integer type's
    maximum (in float32, as the division runs), 1 for bools, None for floats (cast as they are);
    any other type is refused in one line."""
    if np.issubdtype(dtype, np.floating):
        return None
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        return float(np.float32(np.iinfo(dtype).max))
    raise InputError(f"image array: not a readable image (unsupported pixel type {dtype})")


def to_unit_float(array: np.ndarray, name: str | os.PathLike[str] = "image array") -> np.ndarray:
    """Pixel values as float32 in [0, 1], the same rule for files and arrays.

    Integers are divided by their type's maximum (uint8 by 255, uint16 by 65535; negative values
    of signed types clip to 0); bools are 0/1; floats must be finite and lie in [0, 1] (up to
    :data:`FLOAT_TOLERANCE`). A float image on a 0-255 scale is refused, never silently clipped
    to white: divide it by 255 or pass the uint8 array. ``name`` starts the error message.
    Always a new array.
    """
    checked = _checked_pixels(array, name)
    if np.issubdtype(checked.dtype, np.floating):
        return np.array(checked, dtype=np.float32, copy=True)
    return pixels_to_unit(checked)


def _rgb_pixels(array: np.ndarray, name: str | os.PathLike[str]) -> np.ndarray:
    """``H x W``, ``H x W x 1`` (gray), ``x 2`` (gray + alpha), ``x 3`` or ``x 4`` (RGB(A)) ->
    ``H x W x 3`` in the array's own type, without copying pixels.

    Gray is repeated as a read-only broadcast view (its bytes once, not three times); alpha is
    dropped by slicing. ``name`` starts the error messages.
    """
    if array.ndim == 3 and array.shape[2] in (1, 2):
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] >= 3:
        array = array[:, :, :3]
    elif array.ndim != 2:
        raise InputError(f"{name}: not a readable image (unsupported shape {array.shape})")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name}: not a readable image (zero-sized)")
    array = _checked_pixels(array, name)
    if array.ndim == 2:
        return np.broadcast_to(array[:, :, None], (*array.shape, 3))
    return array


def is_gray(pixels: np.ndarray) -> bool:
    """Whether an ``H x W x 3`` image of :func:`read_pixels` or :func:`as_pixels` came as gray (a
    one-channel file or array, with or without alpha): its one plane is repeated as a broadcast
    view, no stride between the channels, so this costs no pixel read. A colour file whose three
    channels happen to be equal is colour: it is the decoded file's channels that are told (a gray
    PNG with alpha is gray: :func:`decode_raw` keeps it gray + alpha)."""
    return pixels.ndim == 3 and pixels.strides[2] == 0


def stored_gray(value: object, where: str) -> bool | None:
    """Whether a model's training images were gray (:func:`is_gray`), read back from its manifest
    (``where`` names it); a model saved before hrad kept it has None."""
    if value is not None and not isinstance(value, bool):
        raise ArtifactError(f"{where}: gray {value!r} is not true or false; the file is corrupt")
    return value


def read_pixels(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """Read any supported image as ``H x W x 3`` RGB in the file's own pixel type.

    8-bit files stay uint8 and 16-bit files uint16, so a decoded image costs its bytes (3 a
    pixel for 8-bit RGB, 1 for 8-bit gray, which is a read-only broadcast view), not 12 as
    float32; float TIFFs are checked (finite, in [0, 1]) and come back as float32. Strategies
    convert each tile window to float when they cut it (:func:`pixels_to_unit`), so results
    equal those of :func:`read_image`. ``max_pixels`` is as for :func:`read_image`.
    """
    path = Path(path)
    return _rgb_pixels(decode_raw(path, max_pixels), path)


def read_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """Read any supported image as float32 ``H x W x 3`` RGB in [0, 1] (gray replicated, alpha dropped).

    ``max_pixels`` overrides the pixel budget (:func:`max_pixels`) for this call; an image over
    it raises :class:`~hrad.errors.ImageTooLargeError` before any pixel is decoded. This costs
    12 bytes a pixel; :func:`read_pixels` keeps the file's type for prediction.
    """
    return np.ascontiguousarray(pixels_to_unit(read_pixels(path, max_pixels)))


def read_mask(
    path: str | os.PathLike[str],
    shape: tuple[int, int] | None = None,
    image_path: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Read a ground-truth mask as bool ``H x W``: any value > 0 in any channel is anomalous.

    ``shape`` is the ``(H, W)`` of the image the mask belongs to; a mask of another size is an
    error (resizing it would silently move defect borders). A file that does not decode is the
    decoder's line about it, as :func:`mask_problem` of ``image_path``.
    """
    path = Path(path)
    try:
        array = decode_raw(path)
    except InputError as error:
        raise type(error)(mask_problem(image_path, str(error))) from None
    if array.ndim == 3:
        channels = array.shape[2]
        # an alpha channel is not part of the label
        array = array[:, :, : 3 if channels == 4 else (1 if channels == 2 else channels)]
        array = array.max(axis=2)
    elif array.ndim != 2:
        raise InputError(f"{path}: not a readable mask (unsupported shape {array.shape})")
    mask = np.asarray(array > 0)
    if shape is not None and tuple(mask.shape) != tuple(shape):
        owner = f"its image {image_path}" if image_path is not None else "its image"
        raise InputError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but {owner} is {shape[1]}x{shape[0]}"
        )
    return mask


def is_image_file(path: Path) -> bool:
    """An image by its name (a supported extension, not hidden) that is a file, or a symbolic
    link whose target is missing: a dangling ``part.png`` is listed, so that reading it fails
    naming it like any other unreadable image, instead of vanishing from the folder."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
        return False
    return path.is_file() or (path.is_symlink() and not path.exists())


def list_images(folder: str | os.PathLike[str], allow_empty: bool = False) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; an error if there are none
    (unless ``allow_empty``: a watched folder, where images will come).

    Listed by name (:func:`is_image_file`): a file that is broken, empty or a dangling symbolic
    link is listed like the others and refused when it is read, in one line naming it, so each
    command treats it as any unreadable image (``fit`` stops, exit 2; ``predict`` writes a
    ``failed`` row and exits 3; ``evaluate`` warns, skips it and exits 3).
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    images = sorted(path for path in folder.iterdir() if is_image_file(path))
    if not images and not allow_empty:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(f"{folder}: no images in this folder (looked for {extensions})")
    return images


class ImageList(Sequence[np.ndarray]):
    """A lazy sequence of images read on access, so a dataset never sits in memory at once.

    Images come in their file's pixel type (:func:`read_pixels`: uint8, uint16, float32), which
    every strategy converts a tile window at a time, and which a model needs to learn the bit
    depth of 16-bit data (:mod:`hrad.data.bit_depth`). ``cache_size`` keeps the most recently
    read images (LRU); 0 disables caching, which is the default because high-resolution images
    are large (a 4096x4096 RGB image is 50 MB at 8 bits, 100 MB at 16).
    """

    def __init__(
        self, paths: Iterable[str | os.PathLike[str]], cache_size: int = 0, max_pixels: int | None = None
    ) -> None:
        self.paths: list[Path] = [Path(path) for path in paths]
        self.cache_size = max(0, int(cache_size))
        self.max_pixels = max_pixels
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        """The file of image ``index``, for errors about it."""
        return str(self.paths[index])

    def _read(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        image = read_pixels(self.paths[index], self.max_pixels)
        if self.cache_size:
            self._cache[index] = image
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self._read(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        return self._read(index)

    def __repr__(self) -> str:
        return f"ImageList({len(self)} images, cache_size={self.cache_size})"


def process_umask() -> int:
    """The process umask (read from /proc on Linux, where reading it does not change it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask (mkstemp alone gives 0600)."""
    return 0o666 & ~process_umask()


def prepare_output_dir(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Create the output folder ``path`` (and parents) and check it is writable, before any work.

    ``inputs`` (the folders and files being predicted): the output folder must not be one of the
    input folders, or the maps, masks and overlays written there would be read as images by the
    next run over that folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: output folder is an existing file")
    if path.is_dir() and any(Path(raw).is_dir() and Path(raw).resolve() == path.resolve() for raw in inputs):
        raise InputError(f"{path}: output folder is also an input folder; its maps would be read as images next time (choose another --out)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".hrad-write-check.", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or _one_line(error)
        raise InputError(f"{path}: output folder is not writable ({reason})") from None
    return path


def prepare_output_file(path: str | os.PathLike[str], what: str) -> Path:
    """Check, before any work, that the file ``path`` (``what`` it is, for the message: 'ONNX
    model') can be written: not a folder, and its folder (created with its parents) takes a file.
    A command that found out only at its last write ended in a traceback from the temporary file
    (``hrad export --out /proc/m.onnx``, ``--out`` an existing folder)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: cannot write the {what} there (a folder)")
    folder = next((above for above in path.parents if above.exists()), None)
    if folder is not None and not folder.is_dir():
        raise InputError(f"{path}: cannot write the {what} there ({folder} is a file)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".hrad-write-check.", dir=path.parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise InputError(f"{path}: cannot write the {what} there ({error.strerror or _one_line(error)})") from None
    return path


#: the error handler of every text file hrad writes, and reads back, in UTF-8 (scores.csv, the
#: summary page, reports, the log file): a file name that is not UTF-8 (a Latin-1 name from an
#: old share, which Python holds as lone surrogates) is written as the bytes it is, so scores.csv
#: names the file exactly and ``--resume`` finds it again; strict UTF-8 stopped predict, evaluate
#: and the log file at such a name with a traceback
TEXT_ERRORS = "surrogateescape"


def text_bytes(text: str) -> bytes:
    """``text`` as the bytes of one of hrad's text files (UTF-8, file names' own bytes kept: :data:`TEXT_ERRORS`)."""
    return text.encode("utf-8", TEXT_ERRORS)


def atomic_write(path: Path, write: Callable[[str], object], suffix: str = ".tmp") -> None:
    """``write(temporary path)`` in ``path``'s folder (made if missing), then the file renamed over
    ``path``, so a reader or an interrupted run never sees half a file; the file gets the umask's
    mode, as ``open()`` would give it (mkstemp alone gives 0600: an export unreadable to the
    service account that serves it). ``suffix``: the temporary's, for a writer that picks its
    format by it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(handle, default_file_mode())
        os.close(handle)
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))


def _encode(path: Path, array: np.ndarray) -> bytes:
    extension = path.suffix.lower() or ".png"
    ok, buffer = cv2.imencode(extension, array)
    if not ok:
        raise InputError(f"{path}: cannot encode an image with extension {extension!r}")
    return buffer.tobytes()


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    array = np.asarray(anomaly_map, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"an anomaly map must be H x W, got shape {array.shape}")
    return array


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a float ``H x W x 3`` RGB (or ``H x W`` gray) image in [0, 1] as 8-bit, atomically."""
    path = Path(path)
    unit = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    array: np.ndarray = np.round(unit * 255.0).astype(np.uint8)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    atomic_write_bytes(path, _encode(path, array))


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a bool mask as a 0/255 8-bit PNG (the MVTec convention), atomically."""
    path = Path(path)
    atomic_write_bytes(path, _encode(path, np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)))


def write_map_png16(path: str | os.PathLike[str], anomaly_map: np.ndarray, vmin: float, vmax: float) -> None:
    """Write a map as a 16-bit PNG: ``vmin`` -> 0 and ``vmax`` -> 65535, clipped (lossless to 1/65535)."""
    if not vmax > vmin:
        raise ValueError(f"vmax ({vmax}) must be larger than vmin ({vmin})")
    path = Path(path)
    scaled = (_as_map(anomaly_map).astype(np.float64) - vmin) / (vmax - vmin)
    array = np.round(np.clip(np.nan_to_num(scaled), 0.0, 1.0) * 65535.0).astype(np.uint16)
    atomic_write_bytes(path, _encode(path.with_suffix(".png"), array))


def write_map_tiff(
    path: str | os.PathLike[str], anomaly_map: np.ndarray, dtype: type | np.dtype = np.float32
) -> None:
    """Write a single-channel float TIFF (float16 is the MVTec AD 2 submission format)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"a TIFF map is float32 or float16, not {dtype}")
    pixels = _as_map(anomaly_map).astype(dtype)
    atomic_write(Path(path), lambda temporary: tifffile.imwrite(temporary, pixels, photometric="minisblack"), suffix=".tiff")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image in any pixel type (uint8, uint16, float in [0, 1], ...) as 8-bit, for pictures.

    uint8 is used as it is; other types are scaled by the value rule (:func:`pixels_to_unit`,
    floats clipped to [0, 1]) and rounded a band of rows at a time, so a large 16-bit image is
    never held as float32 whole. A 16-bit image is first scaled by its own significant bits
    (:func:`~hrad.data.bit_depth.display_bits`), so 12-bit camera data is not drawn black.
    """
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    bits = display_bits(array)
    picture = np.empty(array.shape, dtype=np.uint8)
    rows = max(1, _BAND_VALUES // max(1, array[0].size)) if array.ndim else 1
    for top in range(0, len(array), rows):
        unit = np.clip(pixels_to_unit(to_full_range(array[top : top + rows], bits)), 0.0, 1.0)
        picture[top : top + rows] = np.round(unit * 255.0)
    return picture


def thumbnail(array: np.ndarray, side: int = 320, longest: int = 1280) -> np.ndarray:
    """Area-downscaled copy of at most ``side x side`` pixels' area and ``longest`` along its long
    side: a square image becomes 320 x 320, a 1:8 line-scan strip about 113 x 905 (a bound on the
    long side alone would leave it 40 px high, too thin to show a defect). Bool stays bool, any
    other type becomes float32. Evaluation reports and ``hrad predict``'s summary page use it."""
    height, width = array.shape[:2]
    scale = min(1.0, side / math.sqrt(height * width), longest / max(height, width))
    if scale == 1.0:
        return array.copy()
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if array.dtype == bool:
        return cv2.resize(array.astype(np.uint8), size, interpolation=cv2.INTER_AREA) > 0
    return cv2.resize(array.astype(np.float32), size, interpolation=cv2.INTER_AREA)


def overlay_image(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float | None = None,
    contour_mask: np.ndarray | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.45,
    inspected: np.ndarray | None = None,
) -> np.ndarray:
    """An 8-bit RGB picture: the image with a JET heatmap blended on it.

    Red contours outline ``map >= threshold`` (the prediction); green contours outline
    ``contour_mask`` (usually the ground truth). The heatmap spans ``vmin..vmax`` (default: the
    map's own range, which makes every map look anomalous - pass calibrated bounds to compare).
    ``inspected`` (bool ``H x W``, the model's region of interest; None: all of it) is drawn by
    :func:`mark_inspected`, so "not inspected" does not read as "inspected and fine".
    """
    picture = to_uint8(image)
    if picture.ndim == 2:
        picture = np.repeat(picture[:, :, None], 3, axis=2)
    score = _as_map(anomaly_map)
    height, width = picture.shape[:2]
    if score.shape != (height, width):
        score = cv2.resize(score, (width, height), interpolation=cv2.INTER_LINEAR)
    low = float(np.nanmin(score)) if vmin is None else float(vmin)
    high = float(np.nanmax(score)) if vmax is None else float(vmax)
    unit = np.clip((score - low) / (high - low), 0, 1) if high > low else np.zeros_like(score)
    heat = cv2.applyColorMap(np.round(unit * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(picture, 1.0 - alpha, heat, alpha, 0.0)
    thickness = max(1, round(max(height, width) / 500))
    if inspected is not None:
        mark_inspected(blended, picture, inspected, thickness)

    def draw(region: np.ndarray, color: tuple[int, int, int]) -> None:
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(blended, contours, -1, color, thickness)

    if contour_mask is not None:
        region = np.asarray(contour_mask, dtype=bool)
        if region.shape != (height, width):
            raise ValueError(
                f"contour mask is {region.shape[1]}x{region.shape[0]}, image is {width}x{height}"
            )
        draw(region, (0, 255, 0))
    if threshold is not None:
        draw(score >= threshold, (255, 0, 0))
    return blended


#: colour of the region of interest's outline in overlays (red: prediction, green: ground truth)
INSPECTED_OUTLINE = (255, 255, 255)


def mark_inspected(blended: np.ndarray, picture: np.ndarray, inspected: np.ndarray, thickness: int = 1) -> None:
    """Show a region of interest on an overlay, in place: outside it the plain image at half
    brightness (``picture >> 1``, no heat: nothing there is inspected), and its outline, the
    inside pixels within ``thickness`` of an outside one, in :data:`INSPECTED_OUTLINE` (the
    image's own edges are not outlined). ``blended`` and ``picture`` are 8-bit ``H x W x 3``;
    ``inspected`` is bool, stretched (nearest) when its size differs. Works a band of rows at a
    time and makes no float copy of the image; a region covering everything draws nothing."""
    height, width = blended.shape[:2]
    region = np.asarray(inspected, dtype=bool)
    if region.shape != (height, width):
        region = cv2.resize(region.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).view(bool)
    if region.all():
        return
    inside = np.ascontiguousarray(region).view(np.uint8)
    # the erosion's border counts as inside, so the image's own edges are no outline
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * thickness + 1, 2 * thickness + 1))
    eroded = cv2.erode(inside, kernel)
    outline = cv2.subtract(inside, eroded, dst=eroded).view(bool)  # in place: one byte a pixel in all
    rows = max(1, _BAND_VALUES // max(1, blended[0].size))
    for top in range(0, height, rows):
        band = slice(top, top + rows)
        np.right_shift(picture[band], 1, out=blended[band], where=~region[band, :, None])
        blended[band][outline[band]] = INSPECTED_OUTLINE


def write_overlay(
    path: str | os.PathLike[str],
    image: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float | None = None,
    contour_mask: np.ndarray | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.45,
    inspected: np.ndarray | None = None,
) -> None:
    """Write :func:`overlay_image` as a PNG (or JPEG by extension), atomically."""
    path = Path(path)
    picture = overlay_image(image, anomaly_map, threshold, contour_mask, vmin, vmax, alpha, inspected)
    atomic_write_bytes(path, _encode(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)))


def expand_image_paths(paths: Iterable[str | os.PathLike[str]], allow_empty: bool = False) -> list[Path]:
    """Files as given and the images directly inside folders (sorted); missing paths are errors,
    and so is a folder without images unless ``allow_empty``. A file named twice (a folder and
    a file in it, ``a`` and ``./a/``) is listed once, where it first came: one row, one set of
    files, not two numbered ones."""
    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images.extend(list_images(path, allow_empty))
        elif not path.exists():
            raise InputError(missing_reason(path, or_folder=True))
        elif not is_image_file(path):
            raise InputError(f"{path}: not an image file (PNG, JPEG, BMP or TIFF)")
        else:
            images.append(path)
    unique: dict[str, Path] = {}
    for path in images:
        unique.setdefault(os.path.abspath(path), path)
    return list(unique.values())


def model_input(image: np.ndarray | str | Path, bit_depth: int | None, name: str | None = None) -> tuple[np.ndarray, str]:
    """An image as a predictor (the model, an exported model) takes it, and what its errors and
    warnings call it (``name``, else the path, else "image array"): in its pixel type
    (:func:`as_pixels`), 16-bit data of ``bit_depth`` significant bits scaled to the full range
    (:func:`~hrad.data.bit_depth.model_range`; in place when the array is its own decoding of a file)."""
    owned = isinstance(image, (str, Path))
    label = name or (str(image) if owned else "image array")
    return model_range(as_pixels(image), bit_depth, label, owned), label


def as_pixels(image: np.ndarray | str | Path) -> np.ndarray:
    """Accept a path, or an array (gray, RGB or RGBA; any integer type, bool, or float in [0, 1]),
    as ``H x W x 3`` in its own pixel type (:func:`read_pixels` for paths): what prediction
    takes, so a uint8 image is never held as float32 whole.

    The value rule is checked here, once (floats finite and within [0, 1], NaN/inf or a 0-255
    float scale refused; unsupported types refused); integers are scaled per tile later
    (:func:`pixels_to_unit`). An in-range float32 RGB array is returned as it is, not copied.
    """
    if isinstance(image, (str, Path)):
        return read_pixels(Path(image))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (1, 2):  # gray, gray + alpha
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"image array of shape {array.shape} is not H x W, H x W x 1, x 3 or x 4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"image array of shape {array.shape} is empty")
    if array.ndim == 3:
        array = array[..., :3]
    return _rgb_pixels(array, f"image array of shape {array.shape}")


def as_image(image: np.ndarray | str | Path) -> np.ndarray:
    """Accept a path, or an array (gray, RGB or RGBA; any integer type, bool, or float in [0, 1]),
    as float32 H x W x 3 in [0, 1] (a new array).

    Arrays follow the files' rule (:func:`hrad.data.images.to_unit_float`): integers are divided
    by their type's maximum (uint8 by 255, uint16 by 65535), floats must be finite and in
    [0, 1] - a float array on a 0-255 scale is refused, not clipped. :func:`as_pixels` is the
    same without the float32 copy.
    """
    pixels = as_pixels(image)
    unit = np.ascontiguousarray(pixels_to_unit(pixels))
    return unit.copy() if np.may_share_memory(unit, pixels) else unit
