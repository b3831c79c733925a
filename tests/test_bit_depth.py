"""16-bit images of 10/12/14 significant bits: the exact scaling, and a model that learns the
depth once and applies it everywhere (fit, thresholds, predict, artifact, export)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run as run_cli
from conftest import textured_image, with_spot
from export_helpers import make_model

import hrad
from hrad.artifact import MANIFEST
from hrad.data import bit_depth
from hrad.data.bit_depth import exceeds, significant_bits, to_full_range
from hrad.errors import ArtifactError
from hrad.export import OnnxPredictor, export_onnx

TILED = {"name": "tiled", "tile": 48, "stride": 32}
DETECTOR = {"name": "patchcore", "coreset_ratio": 0.25}


def at_bits(image: np.ndarray, bits: int) -> np.ndarray:
    """A float image in [0, 1] stored as a camera of ``bits`` bits writes it into 16-bit files."""
    return np.rint(image * (2**bits - 1)).astype(np.uint16)


@pytest.mark.parametrize(
    ("peak", "bits"),
    [(0, 10), (1023, 10), (1024, 12), (4095, 12), (4096, 14), (16383, 14), (16384, 16), (65535, 16)],
)
def test_significant_bits_is_the_smallest_camera_depth_holding_the_peak(peak: int, bits: int) -> None:
    assert significant_bits(peak) == bits


def test_full_range_scales_rounds_and_saturates_exactly() -> None:
    values = np.array([[0, 1, 2048, 4094, 4095, 4096, 65535]], dtype=np.uint16)
    scaled = to_full_range(values, 12)
    expected = np.minimum(np.rint(values.astype(np.float64) * 65535 / 4095), 65535).astype(np.uint16)
    np.testing.assert_array_equal(scaled, expected)
    assert scaled[0, 4] == 65535 and scaled[0, 5] == 65535 and scaled[0, 2] == 32776
    assert values[0, 4] == 4095  # a new array unless asked
    assert exceeds(values, 12) == 65535 and exceeds(values[:, :5], 12) is None and exceeds(values, None) is None


def test_full_range_leaves_other_types_and_full_depths_alone() -> None:
    eight = np.full((4, 4, 3), 200, np.uint8)
    sixteen = np.full((4, 4, 3), 40000, np.uint16)
    assert to_full_range(eight, 12) is eight
    assert to_full_range(sixteen, 16) is sixteen and to_full_range(sixteen, None) is sixteen


def test_full_range_in_bands_and_in_place_equals_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    image = np.random.default_rng(0).integers(0, 1024, size=(37, 11, 3), dtype=np.uint16)
    whole = to_full_range(image, 10)
    monkeypatch.setattr(bit_depth, "_BAND_VALUES", 40)  # a band of one row
    copy = image.copy()
    assert to_full_range(copy, 10, in_place=True) is copy
    np.testing.assert_array_equal(copy, whole)


def cli_fit(folder: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *options: str) -> int:
    """``hrad fit`` of a small tiled PatchCore on ``folder``'s images; its exit status."""
    return run_cli(
        ["fit", "--data", str(folder), "--out", str(out), "--backbone", "tiny-cnn", *options,
         "--strategy", "tiled", "--tile", "48", "--set", "detector.coreset_ratio=0.25", "--device", "cpu"],
        monkeypatch,
    )  # fmt: skip


@pytest.fixture(scope="module")
def float_images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [textured_image(rng, 90, 130) for _ in range(5)]


@pytest.fixture(scope="module")
def spotted() -> np.ndarray:
    return with_spot(textured_image(np.random.default_rng(9), 90, 130), 30, 70, 9)[0]


def test_model_learns_the_depth_and_equals_a_fit_on_full_range_images(
    float_images: list[np.ndarray], spotted: np.ndarray, tmp_path: Path
) -> None:
    """Fitting on 12-bit data with bit_depth auto is fitting on the same data scaled to the full
    16-bit range, in every step (thresholds included), and predicting a 12-bit image is
    predicting its full-range copy; the artifact keeps the depth."""
    twelve = [at_bits(image, 12) for image in float_images]
    learned = make_model(TILED, DETECTOR).fit(twelve)
    assert learned.bit_depth == 12
    reference = make_model(TILED, DETECTOR)
    reference.config.bit_depth = 16
    reference.fit([to_full_range(image, 12) for image in twelve])
    assert reference.bit_depth is None
    assert learned.thresholds is not None and reference.thresholds is not None
    assert learned.thresholds.image == reference.thresholds.image

    test = at_bits(spotted, 12)
    untouched = test.copy()
    got = learned.predict(test)
    expected = reference.predict(to_full_range(test, 12))
    np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)
    assert got.score == expected.score and got.is_anomalous
    np.testing.assert_array_equal(test, untouched)  # the caller's array is not scaled in place

    cv2.imwrite(str(tmp_path / "part.png"), cv2.cvtColor(test, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(learned.predict(tmp_path / "part.png").anomaly_map, got.anomaly_map)
    [batched] = learned.predict_batch([test])
    np.testing.assert_array_equal(batched.anomaly_map, got.anomaly_map)

    learned.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / MANIFEST).read_text())["bit_depth"] == 12
    loaded = hrad.load(tmp_path / "model")
    assert loaded.bit_depth == 12
    np.testing.assert_array_equal(loaded.predict(test).anomaly_map, got.anomaly_map)


def test_auto_depth_leaves_eight_bit_and_full_range_data_alone(float_images: list[np.ndarray]) -> None:
    eight = make_model(TILED, DETECTOR).fit([np.rint(image * 255).astype(np.uint8) for image in float_images])
    full = make_model(TILED, DETECTOR).fit([at_bits(image, 16) for image in float_images])
    fixed = make_model(TILED, DETECTOR)
    fixed.config.bit_depth = 10
    fixed.fit([at_bits(image, 10) for image in float_images])
    assert (eight.bit_depth, full.bit_depth, fixed.bit_depth) == (None, None, 10)


def test_brighter_pixels_than_the_learned_depth_warn_and_saturate(float_images: list[np.ndarray], spotted: np.ndarray) -> None:
    model = make_model(TILED, DETECTOR).fit([at_bits(image, 10) for image in float_images])
    assert model.bit_depth == 10
    with pytest.warns(UserWarning, match=r"image array: pixel values up to 4095 exceed the 10-bit range .*0\.\.1023"):
        saturated = model.predict(at_bits(spotted, 12))
    assert np.isfinite(saturated.anomaly_map).all()


def test_a_corrupt_bit_depth_in_the_manifest_is_one_line(float_images: list[np.ndarray], tmp_path: Path) -> None:
    make_model(TILED, DETECTOR).fit([at_bits(image, 12) for image in float_images]).save(tmp_path / "model")
    manifest = tmp_path / "model" / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "bit_depth": 3}))
    with pytest.raises(ArtifactError, match=r"bit_depth 3 is not a number of bits from 9 to 16; the file is corrupt"):
        hrad.load(tmp_path / "model")


def test_export_carries_the_depth(float_images: list[np.ndarray], spotted: np.ndarray, tmp_path: Path) -> None:
    model = make_model(TILED, DETECTOR).fit([at_bits(image, 12) for image in float_images])
    export_onnx(model, tmp_path / "model.onnx")
    assert json.loads((tmp_path / "model.json").read_text())["bit_depth"] == 12
    test = at_bits(spotted, 12)
    expected = model.predict(test)
    got = OnnxPredictor(tmp_path / "model.onnx").predict(test)
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-4 * float(np.abs(expected.anomaly_map).max())
    assert got.score == pytest.approx(expected.score, rel=1e-4)


def test_cli_fit_on_twelve_bit_files_learns_the_depth(
    float_images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    for index, image in enumerate(float_images):
        cv2.imwrite(str(folder / f"{index}.png"), cv2.cvtColor(at_bits(image, 12), cv2.COLOR_RGB2BGR))
    status = cli_fit(folder, tmp_path / "model", monkeypatch)
    assert status == 0
    assert json.loads((tmp_path / "model" / MANIFEST).read_text())["bit_depth"] == 12
    brightest = max(range(len(float_images)), key=lambda index: int(at_bits(float_images[index], 12).max()))
    assert (
        "16-bit images: 12 significant bits, scaled to the full range (bit_depth); brightest training pixel "
        f"{int(at_bits(float_images[brightest], 12).max())}, in {folder / f'{brightest}.png'}\n"
    ) in capfd.readouterr().err


def test_pictures_scale_a_sixteen_bit_image_by_its_own_depth() -> None:
    """A 12-bit image is drawn as bright as its 8-bit original (not at 1/16 of it), a
    full-range one as the value rule says; every picture (overlays, case grids) goes through it."""
    from hrad.data.images import to_uint8

    eight = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    twelve = at_bits(eight / 255.0, 12)
    assert np.abs(to_uint8(twelve).astype(int) - eight).max() <= 1
    full = at_bits(eight / 255.0, 16)
    np.testing.assert_array_equal(to_uint8(full), eight)


def test_cli_predict_names_a_too_bright_image_in_one_warning_line(
    float_images: list[np.ndarray], spotted: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The warning is hrad's one line (Python's own format prints the file, line and source of
    the warn call besides), and the overlay of a 12-bit image is drawn at its own brightness."""
    make_model(TILED, DETECTOR).fit([at_bits(image, 10) for image in float_images]).save(tmp_path / "model")
    image = tmp_path / "parts" / "bright.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), cv2.cvtColor(at_bits(spotted, 12), cv2.COLOR_RGB2BGR))
    capfd.readouterr()
    status = run_cli(["predict", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), str(image.parent)], monkeypatch)
    assert status == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "exceed" in line]
    assert lines == [f"hrad: warning: {image}: pixel values up to 4095 exceed the 10-bit range of the training images "
                     "(0..1023); they saturate (fit with bit_depth set if the camera's depth changed)"], err
    assert "UserWarning" not in err


def test_a_gray_image_broadcast_to_rgb_stays_one_plane() -> None:
    """read_pixels gives a gray 16-bit file as a broadcast view (2 bytes a pixel); scaled, it
    stays one: an 8K line-scan strip does not triple."""
    gray = np.random.default_rng(2).integers(0, 4096, size=(50, 400), dtype=np.uint16)
    view = np.broadcast_to(gray[..., None], (50, 400, 3))
    scaled = to_full_range(view, 12)
    assert scaled.shape == (50, 400, 3) and scaled.base is not None and scaled.base.nbytes == gray.nbytes
    np.testing.assert_array_equal(scaled, to_full_range(np.ascontiguousarray(view), 12))
    np.testing.assert_array_equal(gray, view[..., 0])  # the view's plane is not written


def test_cli_fit_names_each_training_image_brighter_than_a_set_depth_once(
    float_images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """bit_depth set below the files' depth clips the training parts: each file says so once (it
    is read more than once in a fit), as predict does for a too bright part."""
    folder = tmp_path / "good"
    folder.mkdir()
    for index, image in enumerate(float_images):
        cv2.imwrite(str(folder / f"{index}.png"), cv2.cvtColor(at_bits(image, 12), cv2.COLOR_RGB2BGR))
    capfd.readouterr()
    status = cli_fit(folder, tmp_path / "model", monkeypatch, "--set", "bit_depth=10")
    assert status == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "exceed" in line]
    expected = [
        f"hrad: warning: {folder / f'{index}.png'}: pixel values up to {int(at_bits(image, 12).max())} exceed the fit's "
        "10-bit depth (bit_depth, 0..1023); they saturate"
        for index, image in enumerate(float_images)
    ]
    assert sorted(lines) == sorted(expected)
    assert "16-bit images: 10 significant bits, scaled to the full range (bit_depth); set, not learned\n" in err


def png16_bytes(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return buffer.tobytes()


def test_served_predictions_return_their_own_warnings(
    float_images: list[np.ndarray], spotted: np.ndarray, tmp_path: Path
) -> None:
    """hrad serve returns what hrad warned of while predicting an upload (a 16-bit upload brighter
    than a 12-bit model saturates) with that upload's result, in /predict and per batch item:
    one line naming the upload, every time it is sent; a normal upload gets []. Typed in the schema."""
    from fastapi.testclient import TestClient

    from hrad.service import create_app

    make_model(TILED, DETECTOR).fit([at_bits(image, 12) for image in float_images]).save(tmp_path / "model")
    client = TestClient(create_app(tmp_path / "model"))
    bright, normal = png16_bytes(at_bits(spotted, 16)), png16_bytes(at_bits(spotted, 12))
    expected = (
        f"bright.png: pixel values up to {int(at_bits(spotted, 16).max())} exceed the 12-bit range of the training "
        "images (0..4095); they saturate (fit with bit_depth set if the camera's depth changed)"
    )
    for _ in range(2):  # the warnings module shows a repeated warning once; the response every time
        with pytest.warns(UserWarning, match="bright.png"):  # the server's console keeps its line
            body = client.post("/predict", files={"image": ("bright.png", bright, "image/png")}).json()
        assert body["warnings"] == [expected]
    assert client.post("/predict", files={"image": ("normal.png", normal, "image/png")}).json()["warnings"] == []
    files = [("images", ("normal.png", normal)), ("images", ("bright.png", bright)), ("images", ("junk.png", b"junk"))]
    with pytest.warns(UserWarning, match="bright.png"):
        results = client.post("/predict/batch", files=files).json()["results"]
    assert [result.get("warnings") for result in results] == [[], [expected], None]
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictResponse"]["properties"]["warnings"]
    assert schema["type"] == "array" and schema["items"] == {"type": "string"}


def test_collected_warnings_are_each_threads_own() -> None:
    """Two threads collecting at once, their warnings interleaved: each gets its own only (what
    catch_warnings, which swaps process-wide state, cannot promise)."""
    import threading
    import warnings

    from hrad.errors import collecting_warnings, warn

    turns = [threading.Event() for _ in range(4)]
    got: dict[str, list[str]] = {}

    def worker(name: str, mine: list[int]) -> None:
        with collecting_warnings() as collected:
            for turn in mine:
                turns[turn].wait(10)
                warn(f"{name} {turn}")
                if turn + 1 < len(turns):
                    turns[turn + 1].set()
        got[name] = collected

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=worker, args=("a", [0, 2])), threading.Thread(target=worker, args=("b", [1, 3]))]
        for thread in threads:
            thread.start()
        turns[0].set()
        for thread in threads:
            thread.join(10)
    assert got == {"a": ["a 0", "a 2"], "b": ["b 1", "b 3"]}


class CountingImages:
    """A training source that counts how often each image is read (decoded, for a folder)."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images
        self.reads = [0] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        self.reads[index] += 1
        return self.images[index]


@pytest.mark.parametrize(("bits", "reads"), [(8, [1, 1, 1, 1, 1]), (12, [1, 2, 2, 2, 2])])
def test_a_fit_reads_each_training_image_once_besides_the_depths_pass(
    float_images: list[np.ndarray], bits: int, reads: list[int]
) -> None:
    """8-bit images are read once (the first too: its type and size are looked at before
    training and it is handed on); learning a 16-bit depth is one more pass, which reads the
    first image for the fit as well."""
    training = CountingImages([np.rint(image * 255).astype(np.uint8) if bits == 8 else at_bits(image, bits) for image in float_images])
    held_out = CountingImages([training.images[0].copy(), training.images[1].copy()])
    model = make_model(TILED, DETECTOR)
    model.config.postprocess.border_calibration = False  # one thresholds pass over the held-out images
    model.fit(training, validation=held_out)
    assert model.fitted_size == (90, 130) and model.bit_depth == (None if bits == 8 else 12)
    assert training.reads == reads and held_out.reads == [1, 1]


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def test_cli_fit_tells_a_folder_mixing_eight_and_sixteen_bit_files_in_one_line(
    float_images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Two cameras or a converted subset: the depth is learned from the 16-bit files alone and the
    8-bit ones are read as full range. One line names the first 8-bit file and how many there are."""
    folder = tmp_path / "good"
    for index, image in enumerate(float_images):
        write_png(folder / f"{index}.png", np.rint(image * 255).astype(np.uint8) if index in (2, 4) else at_bits(image, 12))
    capfd.readouterr()
    status = cli_fit(folder, tmp_path / "model", monkeypatch)
    assert status == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    assert lines == [
        f"hrad: warning: {folder / '2.png'}: an 8-bit training image among 16-bit ones (2 of 5 are not 16-bit, this the "
        f"first; {folder / '0.png'} is 16-bit): the model reads 16-bit ones scaled from 12 significant bits, 8-bit ones "
        "as 0..255; two cameras, or a converted subset? Fit on images of one type"
    ]


def test_a_mix_is_told_once_whichever_type_comes_first(float_images: list[np.ndarray]) -> None:
    """An 8-bit first image learns no depth (no reading pass): the mix is told once the fit has
    read every image, the 16-bit ones read as stored."""
    images = [at_bits(image, 12) if index == 3 else np.rint(image * 255).astype(np.uint8) for index, image in enumerate(float_images)]
    with pytest.warns(UserWarning) as record:
        model = make_model(TILED, DETECTOR).fit(images)
    assert model.bit_depth is None
    assert [str(warning.message) for warning in record] == [
        "image 3: a 16-bit training image among 8-bit ones (1 of 5 are not 8-bit, this the first; image 0 is 8-bit): "
        "the model reads 16-bit ones as stored (0..65535), 8-bit ones as 0..255; two cameras, or a converted subset? "
        "Fit on images of one type"
    ]


def test_sixteen_bit_training_images_of_far_apart_depths_are_told(float_images: list[np.ndarray]) -> None:
    """10-bit files among 14-bit ones: scaled from 14 bits they reach the backbone at 1/16 of the
    range. One line names the first and how many; 12-bit among 14-bit (a dim part) is not told."""
    images = [at_bits(image, 10) if index in (1, 2) else at_bits(image, 14) for index, image in enumerate(float_images)]
    with pytest.warns(UserWarning) as record:
        model = make_model(TILED, DETECTOR).fit(images)
    assert model.bit_depth == 14 and model.brightest is not None
    peak, where = model.brightest
    assert [str(warning.message) for warning in record] == [
        f"image 1: a 16-bit training image of another depth: its brightest pixel is {int(images[1].max())} (10 bits), "
        f"the training images' {peak} (14 bits, in {where}); 2 of 5 are as dark (this the first) and, scaled from 14 "
        "bits, reach the backbone almost black; two cameras, or a converted subset? Fit on images of one depth"
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_model(TILED, DETECTOR).fit([at_bits(image, 12) if index == 1 else at_bits(image, 14) for index, image in enumerate(float_images)])


def test_a_validation_set_of_another_pixel_type_than_the_training_images_is_told(float_images: list[np.ndarray]) -> None:
    """8-bit validation images for a 12-bit model: the thresholds would come from images read
    as 0..255 against training images scaled from 12 bits. One line names the first; a
    validation set of the training images' type says nothing."""
    training = [at_bits(image, 12) for image in float_images[:3]]
    validation = [at_bits(float_images[3], 12), np.rint(float_images[4] * 255).astype(np.uint8)]
    with pytest.warns(UserWarning) as record:
        model = make_model(TILED, DETECTOR).fit(training, validation=validation)
    assert model.bit_depth == 12 and model.thresholds is not None
    assert [str(warning.message) for warning in record] == [
        "image 1: an 8-bit validation image among 16-bit training ones (1 of 2 validation images are not 16-bit, "
        "this the first; image 0 is 16-bit): the model reads 16-bit ones scaled from 12 significant bits, 8-bit "
        "ones as 0..255; the thresholds come from images read unlike the training ones; two cameras, or a "
        "converted subset? Fit on images of one type"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_model(TILED, DETECTOR).fit(training, validation=[at_bits(image, 12) for image in float_images[3:]])


def test_cli_fit_tells_a_dataset_whose_validation_folder_is_of_another_pixel_type(
    float_images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """An MVTec AD 2 layout's validation/good comes apart from train/good: 12-bit training files
    with 8-bit validation ones get one warning line naming the first validation file."""
    root = tmp_path / "part"
    for index, image in enumerate(float_images[:3]):
        write_png(root / "train" / "good" / f"{index}.png", at_bits(image, 12))
    for index, image in enumerate(float_images[3:]):
        write_png(root / "validation" / "good" / f"{index}.png", np.rint(image * 255).astype(np.uint8))
    write_png(root / "test_private" / "0.png", at_bits(float_images[0], 12))
    capfd.readouterr()
    assert cli_fit(root, tmp_path / "model", monkeypatch) == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    assert lines == [
        f"hrad: warning: {root / 'validation' / 'good' / '0.png'}: an 8-bit validation image among 16-bit training "
        f"ones (2 of 2 validation images are not 16-bit, this the first; {root / 'train' / 'good' / '0.png'} is "
        "16-bit): the model reads 16-bit ones scaled from 12 significant bits, 8-bit ones as 0..255; the thresholds "
        "come from images read unlike the training ones; two cameras, or a converted subset? Fit on images of one type"
    ]
