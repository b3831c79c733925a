"""Image I/O round trips, every user-facing error, and dataset layout detection."""

from __future__ import annotations

import csv
import re
import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from hrad.data import (
    ImageList,
    list_images,
    load_dataset,
    read_image,
    read_mask,
    read_pixels,
    write_map_png16,
    write_map_tiff,
    write_overlay,
)
from hrad.data.images import as_pixels, is_gray
from hrad.errors import InputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAPSULES = SHARED / "data" / "visa" / "capsules"


def _rgb8(height: int = 5, width: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------- reading images


@pytest.mark.parametrize("extension", [".png", ".bmp", ".tif", ".tiff", ".PNG"])
def test_rgb8_lossless_formats_round_trip_in_rgb_order(tmp_path: Path, extension: str) -> None:
    rgb = _rgb8()
    path = tmp_path / f"x{extension}"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == (5, 7, 3)
    np.testing.assert_array_equal(np.round(image * 255).astype(np.uint8), rgb)


def test_jpeg_reads_close_to_the_original_in_rgb_order(tmp_path: Path) -> None:
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 200  # pure-ish red: a BGR mix-up would put it in channel 2
    path = tmp_path / "x.jpeg"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    image = read_image(path)
    assert image.shape == (32, 48, 3)
    assert abs(image[..., 0].mean() - 200 / 255) < 0.03 and image[..., 2].mean() < 0.05


def test_jpeg_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    """Pixels as stored (the README's rule): a viewer would turn this image to 32 x 48, hrad's
    maps keep the stored 48 x 32 so they line up with the file's pixels."""
    from PIL import Image

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :8, 0] = 255  # a red band at the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "turned.jpg"
    Image.fromarray(rgb).save(path, quality=95, exif=exif)
    assert Image.open(path).getexif()[0x0112] == 6
    image = read_image(path)
    assert image.shape == (32, 48, 3)
    assert image[:, :4, 0].mean() > 0.9 and image[:, -4:, 0].mean() < 0.1


@pytest.mark.parametrize("extension", [".png", ".tif"])
def test_16bit_scaled_by_65535(tmp_path: Path, extension: str) -> None:
    rgb16 = np.random.default_rng(1).integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    path = tmp_path / f"x{extension}"
    if extension == ".tif":
        tifffile.imwrite(path, rgb16, photometric="rgb")
    else:
        cv2.imwrite(str(path), cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    np.testing.assert_allclose(read_image(path), rgb16 / 65535.0, atol=1e-6)


@pytest.mark.parametrize("extension", [".png", ".tif", ".jpg", ".bmp"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grayscale_replicated_to_three_channels(tmp_path: Path, extension: str, dtype: type) -> None:
    if extension in (".jpg", ".bmp") and dtype is np.uint16:
        pytest.skip("JPEG/BMP have no 16-bit grayscale")
    maximum = np.iinfo(dtype).max
    gray: np.ndarray = (np.linspace(0, 1, 8 * 9).reshape(8, 9) * maximum).astype(dtype)
    path = tmp_path / f"g{extension}"
    if extension == ".tif":
        tifffile.imwrite(path, gray)
    else:
        cv2.imwrite(str(path), gray, [cv2.IMWRITE_JPEG_QUALITY, 100] if extension == ".jpg" else [])
    image = read_image(path)
    assert image.shape == (8, 9, 3) and is_gray(read_pixels(path))
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    tolerance = 0.02 if extension == ".jpg" else 1e-6
    np.testing.assert_allclose(image[..., 1], gray / maximum, atol=tolerance)


@pytest.mark.parametrize("extension", [".png", ".tif"])
def test_rgba_alpha_is_dropped(tmp_path: Path, extension: str) -> None:
    rgba = np.concatenate([_rgb8(), np.zeros((5, 7, 1), np.uint8)], axis=2)  # fully transparent
    path = tmp_path / f"a{extension}"
    if extension == ".tif":
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    else:
        cv2.imwrite(str(path), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    image = read_image(path)
    np.testing.assert_array_equal(np.round(image * 255).astype(np.uint8), rgba[..., :3])
    assert not is_gray(read_pixels(path))


def test_gray_is_told_by_the_file_s_channels_not_by_equal_values(tmp_path: Path) -> None:
    """What a fit tells apart in a folder mixing cameras: a one-channel file (with alpha too) or
    array is gray; a colour file whose three channels are equal is colour, as stored."""
    plane = _rgb8()[..., 0]
    tifffile.imwrite(tmp_path / "gray_alpha.tif", np.dstack([plane, np.full_like(plane, 255)]), photometric="minisblack", extrasamples=["unassalpha"])
    cv2.imwrite(str(tmp_path / "equal.png"), np.dstack([plane, plane, plane]))
    assert is_gray(read_pixels(tmp_path / "gray_alpha.tif")) and is_gray(as_pixels(plane)) and is_gray(as_pixels(plane[..., None]))
    assert not is_gray(read_pixels(tmp_path / "equal.png")) and not is_gray(as_pixels(_rgb8()))


def _gray_alpha_png(path: Path, gray: np.ndarray, alpha: np.ndarray) -> None:
    """A PNG of colour type 4 (gray + alpha), 8- or 16-bit as ``gray``'s type, written by hand:
    OpenCV writes no such file."""
    samples = np.dstack([gray, alpha]).astype(gray.dtype.newbyteorder(">"))
    rows = b"".join(b"\0" + row.tobytes() for row in samples)  # filter type 0 on every row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    height, width = gray.shape
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([gray.dtype.itemsize * 8, 4, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_gray_png_with_alpha_is_gray(tmp_path: Path, dtype: type) -> None:
    """libpng hands OpenCV a gray + alpha PNG as BGRA: it was read as a colour image (4 bytes a
    pixel, and a false 'gray among colour' warning in a fit of gray files)."""
    maximum = np.iinfo(dtype).max
    gray = (np.linspace(0, 1, 5 * 7).reshape(5, 7) * maximum).astype(dtype)
    path = tmp_path / "gray_alpha.png"
    _gray_alpha_png(path, gray, np.full_like(gray, maximum))
    pixels = read_pixels(path)
    assert is_gray(pixels) and pixels.dtype == dtype
    np.testing.assert_array_equal(pixels[..., 1], gray)
    from hrad.postprocess.roi import read_roi

    _gray_alpha_png(path, gray, np.full_like(gray, maximum // 2))
    with pytest.raises(InputError, match="transparency"):  # a region of interest on a transparent layer stays refused
        read_roi(path)


def test_float_and_planar_tiff(tmp_path: Path) -> None:
    values = np.random.default_rng(2).random((3, 10, 11)).astype(np.float32)
    tifffile.imwrite(tmp_path / "planar.tif", values, photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "planar.tif"), np.moveaxis(values, 0, -1), atol=1e-7)


def _two_colours() -> np.ndarray:
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :8], image[:, 8:] = (200, 30, 30), (20, 180, 60)
    return image


@pytest.mark.parametrize("mode", ["CMYK", "P", "YCbCr", "miniswhite"])
def test_tiffs_of_other_colour_models_read_as_their_colours(mode: str, tmp_path: Path) -> None:
    """A palette TIFF was read as its indices (a gray image), a CMYK one as its ink, a YCbCr one
    as its raw samples and a MinIsWhite one inverted, each predicted without a word; they are now
    their colours, as an image viewer (here PIL) shows them."""
    from PIL import Image

    path = tmp_path / f"{mode}.tif"
    if mode == "miniswhite":
        tifffile.imwrite(path, 255 - _two_colours()[..., 0], photometric="miniswhite")
    else:
        Image.fromarray(_two_colours()).convert(mode).save(path)
    expected = np.asarray(Image.open(path).convert("RGB")).astype(int)
    pixels = read_pixels(path)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - expected).max() <= 2  # YCbCr -> RGB rounding differs by a level


def test_a_tiff_colour_model_hrad_cannot_convert_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ink16.tif"
    tifffile.imwrite(path, np.full((8, 8, 4), (0, 60000, 60000, 0), np.uint16), photometric="separated")
    with pytest.raises(InputError, match=r"ink16\.tif: not a readable image \(16-bit TIFF in the SEPARATED colour model") as info:
        read_pixels(path)
    assert "\n" not in str(info.value)


def test_missing_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.png: file not found"):
        read_image(tmp_path / "nope.png")
    garbage = tmp_path / "x.png"
    garbage.write_bytes(b"this is not a PNG at all" * 10)
    with pytest.raises(InputError, match=r"x\.png: not a readable image") as info:
        read_image(garbage)
    assert "\n" not in str(info.value)
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.tif: empty file"):
        read_image(tmp_path / "empty.tif")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage" * 4)
    with pytest.raises(InputError, match=r"bad\.tif: not a readable image"):
        read_image(tmp_path / "bad.tif")
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


# ---------------------------------------------------------------- masks, folders, lazy lists


def test_read_mask_any_positive_value_and_size_check(tmp_path: Path) -> None:
    labels = np.zeros((6, 4), np.uint8)
    labels[1, 2], labels[4, 0] = 1, 7  # VisA-style class indices
    cv2.imwrite(str(tmp_path / "m.png"), labels)
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, labels > 0)
    assert read_mask(tmp_path / "m.png", shape=(6, 4)).shape == (6, 4)
    with pytest.raises(InputError) as info:
        read_mask(tmp_path / "m.png", shape=(6, 5), image_path=tmp_path / "img.png")
    message = str(info.value)
    assert "m.png" in message and "4x6" in message and "5x6" in message and "img.png" in message
    assert "\n" not in message


def test_a_mask_that_does_not_decode_is_named_as_the_mask_of_its_image(tmp_path: Path) -> None:
    # it read "<mask>: not a readable image (empty file)", as if the mask were a test image
    (tmp_path / "m.png").write_bytes(b"")
    with pytest.raises(InputError) as info:
        read_mask(tmp_path / "m.png", shape=(6, 4), image_path=tmp_path / "img.png")
    assert str(info.value) == f"{tmp_path / 'img.png'}: mask {tmp_path / 'm.png'}: empty file"
    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    with pytest.raises(InputError) as info:
        read_mask(tmp_path / "m.png")
    assert str(info.value).startswith(f"mask {tmp_path / 'm.png'}: not a readable image (")


def test_list_images_sorted_case_insensitive_and_errors(tmp_path: Path) -> None:
    for name in ["b.JPG", "a.png", "c.TiFf", "d.bmp", "e.jpeg", "notes.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.TiFf", "d.bmp", "e.jpeg"]
    with pytest.raises(InputError, match="missing: folder not found"):
        list_images(tmp_path / "missing")
    with pytest.raises(InputError, match=r"a\.png: not a folder"):
        list_images(tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no images"):
        list_images(tmp_path / "empty")


def test_image_list_is_lazy_and_bounded(tmp_path: Path) -> None:
    paths = []
    for index in range(4):
        path = tmp_path / f"{index}.png"
        cv2.imwrite(str(path), _rgb8(seed=index))
        paths.append(path)
    lazy = ImageList(paths)
    assert len(lazy) == 4 and lazy.paths == paths and not lazy._cache
    np.testing.assert_array_equal(lazy[-1], read_pixels(paths[3]))  # the file's pixel type, as strategies take it
    assert len(lazy[1:3]) == 2
    with pytest.raises(IndexError):
        lazy[4]
    cached = ImageList(paths, cache_size=2)
    for index in [0, 1, 2, 1]:
        cached[index]
    assert list(cached._cache) == [2, 1]  # least recently used image (0) was evicted
    paths[2].unlink()
    assert cached[2] is not None  # served from the cache
    with pytest.raises(InputError, match="file not found"):
        ImageList(paths)[2]


# ---------------------------------------------------------------- writing maps


def test_write_map_png16_and_tiff_round_trip(tmp_path: Path) -> None:
    anomaly_map = np.random.default_rng(3).random((9, 13)).astype(np.float32) * 4 - 1
    write_map_png16(tmp_path / "m.png", anomaly_map, vmin=-1.0, vmax=3.0)
    stored = np.asarray(cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED))
    assert stored.dtype == np.uint16 and stored.shape == (9, 13)
    np.testing.assert_allclose(stored / 65535.0 * 4 - 1, anomaly_map, atol=4 / 65535)
    write_map_tiff(tmp_path / "m.tiff", anomaly_map, dtype=np.float16)
    stored = tifffile.imread(tmp_path / "m.tiff")
    assert stored.dtype == np.float16 and stored.shape == (9, 13)
    np.testing.assert_allclose(stored, anomaly_map, atol=4e-3)
    write_map_tiff(tmp_path / "m32.tif", anomaly_map)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m32.tif"), anomaly_map)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "m.tiff", "m32.tif"]  # no temp files left


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """Every atomic file write of hrad (maps, CSVs, pages, exports) is :func:`atomic_write`: a
    writer that fails midway leaves what was there, and nothing beside it."""
    from hrad.data.images import atomic_write, atomic_write_bytes

    atomic_write_bytes(tmp_path / "sub" / "a.bin", b"old")  # the folder is made

    def half(temporary: str) -> None:
        Path(temporary).write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "sub" / "a.bin", half)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.bin"] and (tmp_path / "sub" / "a.bin").read_bytes() == b"old"


def test_write_overlay_draws_contours_of_the_threshold(tmp_path: Path) -> None:
    image = np.full((60, 80, 3), 0.5, np.float32)
    anomaly_map = np.zeros((60, 80), np.float32)
    anomaly_map[20:40, 30:50] = 1.0
    truth = np.zeros((60, 80), bool)
    truth[5:15, 5:15] = True
    write_overlay(tmp_path / "o.png", image, anomaly_map, threshold=0.5, contour_mask=truth)
    picture = cv2.cvtColor(np.asarray(cv2.imread(str(tmp_path / "o.png"))), cv2.COLOR_BGR2RGB)
    assert picture.shape == (60, 80, 3)
    np.testing.assert_array_equal(picture[20, 35], [255, 0, 0])  # red prediction contour
    np.testing.assert_array_equal(picture[5, 10], [0, 255, 0])  # green ground-truth contour
    assert not np.array_equal(picture[30, 40], picture[55, 75])  # heat inside vs outside


# ---------------------------------------------------------------- dataset layouts


def _write(path: Path, shape: tuple[int, int] = (12, 16), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*shape, 3), value, np.uint8))
    return path


def _write_mask(path: Path, shape: tuple[int, int] = (12, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(shape, np.uint8)
    mask[2:5, 3:7] = 255
    cv2.imwrite(str(path), mask)
    return path


def _mvtec(root: Path) -> Path:
    for name in ["000.png", "001.png"]:
        _write(root / "train" / "good" / name)
    _write(root / "test" / "good" / "000.png")
    _write(root / "test" / "crack" / "000.png")
    _write(root / "test" / "crack" / "001.png")
    _write_mask(root / "ground_truth" / "crack" / "000_mask.png")
    _write_mask(root / "ground_truth" / "crack" / "001_mask.png")
    return root


def test_mvtec_layout(tmp_path: Path) -> None:
    dataset = load_dataset(_mvtec(tmp_path / "bottle"))
    assert (dataset.layout, dataset.category) == ("mvtec", "bottle")
    assert [p.name for p in dataset.train] == ["000.png", "001.png"] and dataset.validation == []
    assert [(s.defect_type, s.label) for s in dataset.test] == [("crack", 1), ("crack", 1), ("good", 0)]
    assert dataset.test[1].mask_path == tmp_path / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    assert dataset.test[0].load_mask((12, 16)).sum() == 12
    assert not dataset.test[2].load_mask((12, 16)).any()
    # the same through the folder of categories
    assert load_dataset(tmp_path, category="bottle").root == tmp_path / "bottle"
    with pytest.raises(InputError, match="category="):
        load_dataset(tmp_path)


def test_mvtec_errors_name_the_file(tmp_path: Path) -> None:
    root = _mvtec(tmp_path / "bottle")
    with pytest.raises(InputError, match="dataset folder not found"):
        load_dataset(tmp_path / "absent")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(InputError) as info:
        load_dataset(root)
    assert (
        str(info.value)
        == f"{root / 'test/crack/001.png'}: no mask at {root / 'ground_truth/crack/001_mask.png'}"
    )
    # a mask named otherwise is pointed at: the line named only the first name looked for
    _write_mask(root / "ground_truth" / "crack" / "001_gt.png")
    with pytest.raises(InputError) as info:
        load_dataset(root)
    assert str(info.value) == (
        f"{root / 'test/crack/001.png'}: no mask at {root / 'ground_truth/crack/001_mask.png'} "
        "(that folder holds 001_gt.png: name masks 001_mask.png or 001.png)"
    )
    (root / "ground_truth" / "crack" / "001_gt.png").rename(root / "ground_truth" / "crack" / "001_mask.png")
    shutil.move(root / "ground_truth" / "crack", tmp_path / "moved")
    with pytest.raises(InputError) as info:
        load_dataset(root)
    assert str(info.value).endswith(f"no mask at {root / 'ground_truth/crack/000_mask.png'} ({root / 'ground_truth/crack'}: folder not found)")
    shutil.move(tmp_path / "moved", root / "ground_truth" / "crack")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    _write_mask(root / "ground_truth" / "crack" / "001_mask.png", shape=(10, 16))
    sample = load_dataset(root).test[1]
    with pytest.raises(InputError, match=r"001_mask\.png: mask is 16x10 but its image .*001\.png is 16x12"):
        sample.load_mask(read_image(sample.path).shape[:2])
    for path in (root / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(InputError) as info:
        load_dataset(root)
    assert str(info.value) == f"{root / 'train' / 'good'}: no normal images"


def test_a_labelled_test_set_alone_loads_for_evaluation(tmp_path: Path) -> None:
    """A model fitted elsewhere and only MVTec's test/ and ground_truth/ (or MVTec AD 2's
    test_public/, VisA's test rows): hrad evaluate refused it, '<root>/train/good: no normal
    images (folder not found)'. training=False needs the test part only; fit still needs both."""
    root = _mvtec(tmp_path / "mvtec" / "bottle")
    shutil.rmtree(root / "train")
    dataset = load_dataset(root, training=False)
    assert dataset.layout == "mvtec" and dataset.train == [] and len(dataset.test) == 3
    assert load_dataset(tmp_path / "mvtec", category="bottle", training=False).test == dataset.test
    with pytest.raises(InputError, match="category=.*: bottle$"):  # a test-only category is a category
        load_dataset(tmp_path / "mvtec", training=False)
    with pytest.raises(InputError, match=r"train/good: no normal images \(folder not found\)$"):
        load_dataset(root)
    # the test part missing is the error
    shutil.rmtree(root / "test")
    (root / "train" / "good").mkdir(parents=True)
    with pytest.raises(InputError, match=rf"^{re.escape(str(root / 'test'))}: folder not found \(expected one subfolder per defect type\)$"):
        load_dataset(root, training=False)
    # MVTec AD 2: test_public alone
    ad2 = tmp_path / "can"
    _write(ad2 / "test_public" / "good" / "000_regular.png")
    _write(ad2 / "test_public" / "bad" / "000_regular.png")
    _write_mask(ad2 / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png")
    dataset = load_dataset(ad2, training=False)
    assert dataset.layout == "mvtec_ad2" and dataset.train == [] and [s.label for s in dataset.test] == [1, 0]
    # VisA: no train rows for the object
    visa = tmp_path / "visa"
    _write(visa / "candle/Data/Images/Normal/0002.JPG")
    _write(visa / "candle/Data/Images/Anomaly/000.JPG")
    _write_mask(visa / "candle/Data/Masks/Anomaly/000.png")
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,normal,candle/Data/Images/Normal/0002.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
    )
    assert [s.label for s in load_dataset(visa, training=False).test] == [0, 1]
    with pytest.raises(InputError, match="no normal images for 'candle' in the train split"):
        load_dataset(visa)


def test_mvtec_ad2_layout(tmp_path: Path) -> None:
    root = tmp_path / "can"
    _write(root / "train" / "good" / "000_regular.png")
    _write(root / "validation" / "good" / "000_regular.png")
    _write(root / "test_public" / "good" / "000_regular.png")
    _write(root / "test_public" / "bad" / "000_regular.png")
    _write_mask(root / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png")
    _write(root / "test_private" / "000.png")
    _write(root / "test_private_mixed" / "000.png")
    _write(root / "test_private_mixed" / "001.png")
    dataset = load_dataset(root)
    assert dataset.layout == "mvtec_ad2" and len(dataset.train) == 1 and len(dataset.validation) == 1
    assert [(s.defect_type, s.label) for s in dataset.test] == [("bad", 1), ("good", 0)]
    assert dataset.test[0].mask_path == root / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png"
    assert {name: len(paths) for name, paths in dataset.extra.items()} == {
        "test_private": 1,
        "test_private_mixed": 2,
    }


def test_visa_original_layout_with_split_csv(tmp_path: Path) -> None:
    rows = [
        ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
        ("candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
        ("candle", "test", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
        (
            "candle",
            "test",
            "anomaly",
            "candle/Data/Images/Anomaly/000.JPG",
            "candle/Data/Masks/Anomaly/000.png",
        ),
        ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""),
    ]
    for _, _, _, image, mask in rows:
        _write(tmp_path / image)
        if mask:
            _write_mask(tmp_path / mask)
    (tmp_path / "split_csv").mkdir()
    with (tmp_path / "split_csv" / "1cls.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    dataset = load_dataset(tmp_path, category="candle")
    assert (dataset.layout, dataset.category) == ("visa", "candle")
    assert [p.name for p in dataset.train] == ["0000.JPG", "0001.JPG"]
    assert [(s.path.name, s.label) for s in dataset.test] == [("0002.JPG", 0), ("000.JPG", 1)]
    assert dataset.test[1].load_mask((12, 16)).sum() == 12
    with pytest.raises(InputError, match="category="):
        load_dataset(tmp_path)
    with pytest.raises(InputError, match="no object 'fryum'"):
        load_dataset(tmp_path, category="fryum")
    (tmp_path / "candle/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(InputError, match=r"000\.JPG: no mask at .*000\.png"):
        load_dataset(tmp_path, category="candle")


def test_plain_folder_is_unlabeled(tmp_path: Path) -> None:
    _write(tmp_path / "b.png")
    _write(tmp_path / "a.jpg")
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "folder" and dataset.train == []
    assert [(s.path.name, s.label) for s in dataset.test] == [("a.jpg", -1), ("b.png", -1)]
    with pytest.raises(InputError, match="no ground-truth mask"):
        dataset.test[0].load_mask((12, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no known dataset layout"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(InputError, match="empty: no images"):
        load_dataset(tmp_path / "empty", layout="folder")


@pytest.mark.skipif(not CAPSULES.is_dir(), reason="../shared/data/visa/capsules is absent")
def test_visa_capsules_in_mvtec_layout() -> None:
    dataset = load_dataset(CAPSULES)
    assert dataset.layout == "mvtec" and dataset.category == "capsules"
    assert len(dataset.train) == 300
    assert sum(s.label == 0 for s in dataset.test) == 60 and sum(s.label == 1 for s in dataset.test) == 100
    sample = next(s for s in dataset.test if s.label == 1)
    image = read_image(sample.path)
    assert image.shape == (1000, 1500, 3)
    mask = sample.load_mask(image.shape[:2])
    assert 0 < mask.mean() < 0.1
