"""Hostile and broken input never hurts (issue 13): one-line errors, the pixel budget, batch
prediction that survives bad files, self-verifying artifacts, the array rules, file modes."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from cli_helpers import run, write
from conftest import textured_image

import hrad
from hrad.artifact import MANIFEST, WEIGHTS
from hrad.config import load_config
from hrad.data import images as image_io
from hrad.data.datasets import load_dataset
from hrad.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageList,
    decode_raw,
    image_size,
    pixel_budget,
    read_image,
    read_pixels,
    to_unit_float,
    write_map_png16,
)
from hrad.errors import ArtifactError, ImageTooLargeError, InputError
from hrad.model import AnomalyModel

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(sys.executable).with_name("hrad")


# ------------------------------------------------------------------------------------ helpers
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB, with a few bytes of pixel data."""
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def encoded(image: np.ndarray, suffix: str) -> bytes:
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    if suffix in (".tif", ".tiff"):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, pixels)
        return buffer.getvalue()
    ok, data = cv2.imencode(suffix, pixels[..., ::-1])
    assert ok
    return data.tobytes()


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(11)
    config = load_config(
        None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "test-gaussian"}, "strategy": {"name": "downsample", "image_size": 64}}
    )
    model = AnomalyModel(config).fit([textured_image(rng, 64, 80) for _ in range(5)])
    return model.save(tmp_path_factory.mktemp("hostile") / "model")


@pytest.fixture
def model_copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    copy.mkdir()
    for name in (MANIFEST, WEIGHTS):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    return copy


# ------------------------------------------------------------------------------------ 3. one error path
needs_script = pytest.mark.skipif(not SCRIPT.is_file(), reason="the hrad console script is not installed in this environment")


def script(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        # tracebacks from socket.bind (OverflowError) and int(nan) once; 0 MB started a server that refused every upload
        (["--port", "99999"], "Invalid value for '--port': Input should be less than or equal to 65535"),
        (["--port", "-1"], "Invalid value for '--port': Input should be greater than or equal to 0"),
        (["--max-upload-mb", "nan"], "Invalid value for '--max-upload-mb'"),
        (["--max-upload-mb", "0"], "Invalid value for '--max-upload-mb': Input should be greater than or equal to 0.001"),
        # "[Errno -2] Name or service not known" from uvicorn's startup once, no host named, exit 3
        (["--host", "no-such-host.invalid"], "hrad: error: --host no-such-host.invalid: cannot listen there ("),
        (["--host", "192.0.2.1"], "hrad: error: --host 192.0.2.1: cannot listen there (Cannot assign requested address)"),
    ],
)
def test_serve_options_out_of_range_are_one_line(
    option: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["serve", "--model", str(tmp_path / "m"), *option], monkeypatch) == 2
    assert expected in one_line(capsys.readouterr().err)


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """uvicorn found it after the model loaded and the app started: "hrad: error: [Errno 98] error
    while attempting to bind on address ('127.0.0.1', N): address already in use", exit 3 (with
    --workers, "[Errno 98] Address already in use", exit 1), the host:port not said as the option."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):  # the model does not exist: refused before it is looked for
            assert run(["serve", "--model", str(tmp_path / "m"), "--port", str(port), "--workers", workers], monkeypatch) == 2
            assert one_line(capsys.readouterr().err) == (
                f"hrad: error: --port {port}: 127.0.0.1:{port} is in use (another server listens there); stop it or choose another --port"
            )


@needs_script
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["bogus"], "No such command 'bogus'"),
        (["fit"], "Missing option '--data'"),
        (["predict", "--model", "m", "x.png", "--out", "o", "--format", "bogus"], "--format"),
        (["fit", "--data", ".", "--out", "m", "--image-size", "abc"], "--image-size"),
        (["--max-pixels", "0", "list"], "--max-pixels"),
    ],
)
def test_usage_errors_of_the_installed_script_are_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    result = script(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("hrad: error:") and expected in line


@needs_script
def test_installed_script_without_arguments_shows_help_and_version_works(tmp_path: Path) -> None:
    bare = script(cwd=tmp_path)
    assert bare.returncode == 2 and "Usage" in bare.stdout + bare.stderr and "Traceback" not in bare.stderr
    version = script("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hrad {hrad.__version__}"


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("strategy.image_size=[1,2", "not valid YAML"),
        ("strategy=5", "strategy"),
        ("detector=[1]", "detector"),
        # tracebacks once: torch's seed takes 64 bits; a batch of 0 images stacked nothing
        ("seed=99999999999999999999", "invalid config at seed: Input should be less than or equal to 18446744073709551615"),
        ("strategy.batch_size=0", "invalid config at strategy.batch_size: Input should be greater than or equal to 1"),
        # the detector's and HiAD's seeds hold to the same range (hrad.seeds); they were tracebacks
        ("detector.seed=99999999999999999999", "invalid config at detector.seed: Input should be less than or equal to 18446744073709551615"),
        ("strategy={name: hiad, seed: -99999999999999999999}", "invalid config at strategy.seed: Input should be greater than or equal to -9223372036854775808"),
    ],
)
def test_bad_set_values_are_one_line(
    assignment: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((32, 32, 3), np.uint8))
    code = run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), "--set", assignment], monkeypatch)
    assert code == 2
    assert expected in one_line(capsys.readouterr().err)


def test_seeds_anywhere_in_torchs_range_fit_and_a_negative_one_is_its_twos_complement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HiAD's seed -1 crashed in KMeans (random_state) and numpy's default_rng, a detector seed of
    2**31 or more in faiss's IVF k-means: every seed torch takes now fits, and -1 fits the same
    model as 2**64 - 1, as torch reads it."""
    rng = np.random.default_rng(5)
    for index in range(4):
        write(tmp_path / "good" / f"{index}.png", textured_image(rng, 64, 96))
    weights = []
    for seed in (-1, 2**64 - 1):
        out = tmp_path / f"m{seed}"
        command = ["fit", "--data", str(tmp_path / "good"), "--out", str(out), "--backbone", "tiny-cnn", "--detector", "patchcore",
                   "--strategy", "hiad", "--set", "strategy.patch_size=32", "--set", "strategy.num_detectors=2",
                   "--set", "strategy.assignment=ra", "--set", f"strategy.seed={seed}", "--set", f"detector.seed={seed}",
                   "--set", "detector.index=ivf", "--set", "detector.nlist=2"]  # fmt: skip
        assert run(command, monkeypatch) == 0
        weights.append((out / WEIGHTS).read_bytes())
    assert weights[0] == weights[1]


@pytest.mark.parametrize(("where", "reason"), [("folder", "a folder"), ("taken/m.onnx", "{tmp}/taken is a file"), ("/proc/m.onnx", "No such file or directory")])
def test_an_export_that_cannot_be_written_there_is_one_line_before_the_model_loads(
    where: str, reason: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hrad export --out /proc/m.onnx (or an existing folder) exported, then ended in a traceback
    from the temporary file of the last write."""
    if where.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "folder").mkdir()
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr("hrad.model.load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    out = tmp_path / where
    assert run(["export", "--model", str(model_dir), "--out", str(out)], monkeypatch) == 2
    assert one_line(capsys.readouterr().err) == f"hrad: error: {out}: cannot write the ONNX model there ({reason.format(tmp=tmp_path)})"


@pytest.mark.parametrize(
    ("export_format", "taken", "what"),
    [("onnx", "m.json", "ONNX model's sidecar"), ("openvino", "m.json", "OpenVINO model's sidecar"),
     ("openvino", "m.bin", "OpenVINO model's .bin file")],
)  # fmt: skip
def test_an_export_whose_sidecar_cannot_be_written_is_one_line_before_the_model_loads(
    export_format: str, taken: str, what: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An existing folder where the sidecar goes (m.json beside --out m.onnx) was found only after
    the whole export, as a traceback."""
    (tmp_path / taken).mkdir()
    monkeypatch.setattr("hrad.model.load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    out = tmp_path / ("m.xml" if export_format == "openvino" else "m.onnx")
    assert run(["export", "--model", str(model_dir), "--out", str(out), "--format", export_format], monkeypatch) == 2
    assert one_line(capsys.readouterr().err) == f"hrad: error: {tmp_path / taken}: cannot write the {what} there (a folder)"
    assert run(["export", "--model", str(model_dir), "--out", str(tmp_path / "x.json")], monkeypatch) == 2
    assert "the sidecar is written to the .json beside the model" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["notes.txt", "model", "m.ONNX"])
def test_an_export_named_so_that_no_command_reads_it_is_refused_before_the_model_loads(
    name: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """hrad export --out notes.txt wrote the ONNX graph over the user's notes.txt, and hrad predict
    --model notes.txt then said 'not an hrad model': predict, evaluate and serve know an export by
    its .onnx / .xml suffix."""
    (tmp_path / "notes.txt").write_text("my notes")
    monkeypatch.setattr("hrad.model.load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    out = tmp_path / name
    assert run(["export", "--model", str(model_dir), "--out", str(out)], monkeypatch) == 2
    assert one_line(capsys.readouterr().err) == (
        f"hrad: error: --out {out}: an export's file name ends in .onnx (or .xml, OpenVINO), which hrad predict, evaluate "
        f"and serve know it by; give {out.with_suffix('.onnx').name}"
    )
    assert (tmp_path / "notes.txt").read_text() == "my notes" and sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_out_is_checked_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    # the model does not exist either: the --out error comes first, so nothing was loaded
    assert run(["predict", "--model", str(tmp_path / "none"), str(image), "--out", str(a_file)], monkeypatch) == 2
    assert "taken: output folder is an existing file" in one_line(capsys.readouterr().err)
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    # the data does not exist either: fit refuses the --out before looking at the data
    assert run(["fit", "--data", str(tmp_path / "no-data"), "--out", str(foreign)], monkeypatch) == 2
    assert "precious: exists and is not an hrad model" in one_line(capsys.readouterr().err)
    assert (foreign / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda manifest: [manifest], "not an object"),
        (lambda manifest: {**manifest, "thresholds": {"image": "high", "pixel": 1.0}}, "thresholds"),
        (lambda manifest: {**manifest, "thresholds": [1, 2]}, "thresholds"),
        (lambda manifest: {**manifest, "fitted_size": "big"}, "fitted_size"),
        (lambda manifest: {**manifest, "config": None}, "config"),
    ],
)
def test_broken_manifests_are_one_line(edit, expected: str, model_copy: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((model_copy / MANIFEST).read_text())
    (model_copy / MANIFEST).write_text(json.dumps(edit(manifest)))
    with pytest.raises(ArtifactError, match=expected) as caught:
        hrad.load(model_copy)
    assert "\n" not in str(caught.value) and str(model_copy) in str(caught.value)


def test_empty_arrays_are_input_errors(model_dir: Path) -> None:
    model = hrad.load(model_dir)
    for empty in (np.zeros((0, 0)), np.zeros((0, 5, 3), np.uint8), np.zeros((4, 0), np.float32)):
        with pytest.raises(InputError, match="empty"):
            model.predict(empty)


# ------------------------------------------------------------------------------------ 1. pixel budget
def test_a_tiff_whose_samples_per_pixel_overrun_the_budget_is_refused_before_decoding(tmp_path: Path) -> None:
    """The pixel budget counted pixels only: a TIFF header may declare 65535 samples a pixel, and
    a 4000x4000 one asked for a terabyte (200 samples of 100x100 here: 2 MB for 10000 pixels)."""
    path = tmp_path / "samples.tif"
    tifffile.imwrite(path, np.zeros((100, 100, 200), np.uint8), planarconfig="contig", photometric="minisblack")
    with pixel_budget(20000), pytest.raises(ImageTooLargeError) as caught:
        read_pixels(path)
    assert str(caught.value).startswith(f"{path}: image decodes to 2000000 bytes (100x100, 200 samples of uint8 a pixel), over the 320000 bytes")
    assert read_pixels(path).shape == (100, 100, 3)  # the default budget's bytes hold it


def test_a_bad_pixel_budget_in_the_environment_stops_the_command_once(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HRAD_MAX_PIXELS=abc failed each image of a predict in its own line (exit 3, a scores.csv of
    failures), and each upload of a server; it is now the command's one error, before any work."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((32, 32, 3), np.uint8))
    monkeypatch.setenv("HRAD_MAX_PIXELS", "abc")
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out)], monkeypatch) == 2
    assert one_line(capsys.readouterr().err) == "hrad: error: HRAD_MAX_PIXELS: pixel budget 'abc' is not a number"
    assert not out.exists()


def test_decompression_bombs_are_refused_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    for side in (30000, 60000):  # 60000 made OpenCV raise cv2.error; 30000 asked for 20 GiB
        path = tmp_path / f"bomb{side}.png"
        path.write_bytes(header_only_png(side, side))
        with pytest.raises(ImageTooLargeError, match=rf"{side}x{side} = {side * side} pixels, over the pixel budget of {DEFAULT_MAX_PIXELS}"):
            read_image(path)


def test_header_checks_in_many_threads_leave_the_warning_filters_as_they_were(tmp_path: Path) -> None:
    # each check muted PIL's warnings with catch_warnings, which swaps process-wide filters: two
    # threads' blocks interleaving left "ignore" in front for good, so every later warning of
    # the process (hrad serve's saturation lines) went unseen
    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), np.zeros((32, 32, 3), np.uint8))
    before = list(warnings.filters)

    def check() -> None:
        for _ in range(200):
            image_size(path)

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == before


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff"])
def test_budget_is_read_from_each_formats_header(suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"image{suffix}"
    path.write_bytes(encoded(textured_image(np.random.default_rng(0), 48, 64), suffix))
    assert image_size(path) == (48, 64)
    with pixel_budget(48 * 64):
        assert read_image(path).shape == (48, 64, 3)
    decoded: list[str] = []
    original_imdecode, original_asarray = cv2.imdecode, tifffile.TiffPage.asarray
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: decoded.append("cv2") or original_imdecode(*a, **k))
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: decoded.append("tiff") or original_asarray(*a, **k))
    with pixel_budget(48 * 64 - 1), pytest.raises(ImageTooLargeError, match="over the pixel budget of 3071"):
        read_image(path)
    with pytest.raises(ImageTooLargeError):
        read_image(path, max_pixels=100)
    monkeypatch.setenv("HRAD_MAX_PIXELS", "100")
    with pytest.raises(ImageTooLargeError, match="budget of 100 "):
        read_image(path)
    assert decoded == []


def test_files_that_are_no_supported_format_are_refused(tmp_path: Path) -> None:
    ok, data = cv2.imencode(".ppm", np.zeros((8, 8, 3), np.uint8))  # OpenCV would decode it by content
    path = tmp_path / "disguised.png"
    path.write_bytes(data.tobytes())
    with pytest.raises(InputError, match="disguised.png: not a readable image .not a PNG, JPEG, BMP or TIFF"):
        read_image(path)


# ------------------------------------------------------------------------------------ 2. batches survive bad files
def test_predict_over_a_folder_survives_bad_files(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(2)
    cv2.imwrite(str(folder / "a.png"), (textured_image(rng, 64, 80) * 255).astype(np.uint8))
    (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "c_bomb.png").write_bytes(header_only_png(30000, 30000))
    cv2.imwrite(str(folder / "d.png"), (textured_image(rng, 64, 80) * 255).astype(np.uint8))
    strip = folder / "e_strip.png"  # decodes, then refused by the model's size check, which sees only the array
    cv2.imwrite(str(strip), (textured_image(rng, 4, 80) * 255).astype(np.uint8))
    out = tmp_path / "out"
    assert run(["--max-pixels", "100000", "predict", "--model", str(model_dir), str(folder), "--out", str(out)], monkeypatch) == 3
    err = capsys.readouterr().err
    assert "b_corrupt.png" in err and "c_bomb.png" in err and "Traceback" not in err
    assert f"hrad: error: skipped: {strip}: image is 80x4, its short side is under 1/8" in err  # names the file
    with (out / "scores.csv").open() as handle:
        table = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert list(table) == ["a.png", "b_corrupt.png", "c_bomb.png", "d.png", "e_strip.png"]
    assert [table[name]["status"] for name in table] == ["ok", "failed", "failed", "ok", "failed"]
    assert table["e_strip.png"]["error"].startswith(f"{strip}: image is 80x4")
    assert "not a readable image" in table["b_corrupt.png"]["error"] and table["b_corrupt.png"]["score"] == ""
    assert "pixel budget of 100000" in table["c_bomb.png"]["error"]
    for name in ("a", "d"):
        assert float(table[f"{name}.png"]["score"]) > 0 and (out / f"{name}_map.png").is_file()


def test_file_names_with_brackets_are_reported_as_they_are(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # paths are text, not rich markup: this one reads ".../in [/red] b.png", whose "[/red]" once
    # crashed the report with MarkupError, and "[bold]" vanished from the output folder's name
    folder = tmp_path / "in ["
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), (textured_image(np.random.default_rng(3), 64, 80) * 255).astype(np.uint8))
    bad = folder / "red] b.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out [bold]"
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out)], monkeypatch) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"hrad: error: skipped: {bad}: not a readable image" in err
    assert f"1 prediction written to {out}: " in err and f"1 of 2 images failed (status 'failed' in {out / 'scores.csv'})" in err


def test_an_interrupted_predict_keeps_the_rows_it_finished(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(5):
        cv2.imwrite(str(folder / f"{index}.png"), (textured_image(np.random.default_rng(index), 64, 80) * 255).astype(np.uint8))
    original = AnomalyModel.predict_batch
    calls = []

    def interrupted(self: AnomalyModel, images: list[np.ndarray], **overrides: float | None) -> object:
        calls.append(1)
        if len(calls) == 2:  # in the second batch of two images
            raise KeyboardInterrupt
        return original(self, images, **overrides)

    monkeypatch.setattr(AnomalyModel, "predict_batch", interrupted)
    out = tmp_path / "out"
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out), "--batch-images", "2"], monkeypatch) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"  # said so, not a silent status 130
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["path"]).name for row in rows] == ["0.png", "1.png"] and {row["status"] for row in rows} == {"ok"}


# ------------------------------------------------------------------------------------ 4. artifacts verify themselves
def test_bit_flipped_weights_are_refused(model_copy: Path) -> None:
    weights = model_copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data, past the header
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 .* does not match the manifest") as caught:
        hrad.load(model_copy)
    assert "\n" not in str(caught.value)


def test_swapped_weights_are_refused(model_copy: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model_copy / WEIGHTS))
    other = {key: np.zeros(value.shape, value.dtype) + 0.5 for key, value in tensors.items()}  # same shapes
    save_file(other, str(model_copy / WEIGHTS))
    with pytest.raises(ArtifactError, match="sha256"):
        hrad.load(model_copy)
    key = sorted(tensors)[0]
    save_file({**other, key: np.zeros((*tensors[key].shape, 2), tensors[key].dtype)}, str(model_copy / WEIGHTS))
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' has shape .*weights of another model"):
        hrad.load(model_copy)


def test_artifacts_without_a_digest_still_load(model_copy: Path, model_dir: Path) -> None:
    manifest = json.loads((model_copy / MANIFEST).read_text())
    assert set(manifest["weights"]) >= {"sha256", "bytes", "tensors"}
    del manifest["weights"]
    (model_copy / MANIFEST).write_text(json.dumps(manifest))
    image = textured_image(np.random.default_rng(4), 64, 80)
    assert hrad.load(model_copy).predict(image).score == pytest.approx(hrad.load(model_dir).predict(image).score)


def test_an_overwrite_killed_between_its_renames_leaves_the_old_model_loadable(model_copy: Path) -> None:
    image = textured_image(np.random.default_rng(5), 64, 80)
    before = hrad.load(model_copy).predict(image).score
    model_copy.rename(model_copy.with_name(f".{model_copy.name}.old"))  # where write_artifact is killed
    assert hrad.load(model_copy).predict(image).score == pytest.approx(before)
    rng = np.random.default_rng(6)
    newer = AnomalyModel(hrad.load(model_copy).config).fit([textured_image(rng, 64, 80) for _ in range(4)])
    newer.save(model_copy)
    assert sorted(path.name for path in model_copy.parent.iterdir()) == ["model"]
    assert hrad.load(model_copy).predict(image).score == pytest.approx(newer.predict(image).score)


def test_stale_staging_folders_are_cleaned(model_copy: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    host = socket.gethostname()
    dead = model_copy.parent / f".model.staging-{host}-{int(finished.stdout)}-deadbeef"
    alive = model_copy.parent / f".model.staging-{host}-{os.getpid()}-cafecafe"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / WEIGHTS).write_bytes(b"half written")
    hrad.load(model_copy).save(model_copy)
    assert not dead.exists() and alive.exists()


def test_written_files_get_the_umask(model_dir: Path, tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        hrad.load(model_dir).save(tmp_path / "m")
        write_map_png16(tmp_path / "map.png", np.zeros((4, 4), np.float32), 0.0, 1.0)
        image_io.write_map_tiff(tmp_path / "map.tiff", np.zeros((4, 4), np.float32))
    finally:
        os.umask(previous)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750
    for path in (tmp_path / "m" / WEIGHTS, tmp_path / "m" / MANIFEST, tmp_path / "map.png", tmp_path / "map.tiff"):
        assert path.stat().st_mode & 0o777 == 0o640, path


# ------------------------------------------------------------------------------------ 5. input arrays
def test_pixel_value_rule_on_small_arrays() -> None:
    np.testing.assert_array_equal(to_unit_float(np.array([0, 51, 255], np.uint8)), np.float32([0, 0.2, 1]))
    np.testing.assert_array_equal(to_unit_float(np.array([0, 65535], np.uint16)), np.float32([0, 1]))
    np.testing.assert_array_equal(to_unit_float(np.array([-5, 0, 32767], np.int16)), np.float32([0, 0, 1]))
    np.testing.assert_array_equal(to_unit_float(np.array([True, False])), np.float32([1, 0]))
    np.testing.assert_array_equal(to_unit_float(np.array([-0.0005, 0.5, 1.0005], np.float64)), np.float32([0, 0.5, 1]))
    for bad, message in (([0.0, 255.0], r"span \[0, 255\], not \[0, 1\]"), ([0.5, np.nan], "NaN"), ([np.inf, 0.0], "infinite")):
        with pytest.raises(InputError, match=message):
            to_unit_float(np.array(bad, np.float32), "x")


def test_arrays_are_scaled_like_files_and_nonsense_is_refused(model_dir: Path, tmp_path: Path) -> None:
    model = hrad.load(model_dir)
    pixels = (textured_image(np.random.default_rng(7), 64, 80) * 255).round().astype(np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), pixels[..., ::-1])
    from_file = model.predict(tmp_path / "x.png").score
    assert model.predict(pixels).score == pytest.approx(from_file, rel=1e-6)
    assert model.predict(pixels.astype(np.uint16) * 257).score == pytest.approx(from_file, rel=1e-5)
    assert model.predict(pixels / 255.0).score == pytest.approx(from_file, rel=1e-5)
    with pytest.raises(InputError, match=r"not \[0, 1\]"):
        model.predict(pixels.astype(np.float32))  # 0-255 floats used to be clipped to white
    broken = pixels / 255.0
    broken[3, 4, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        model.predict(broken)


def test_images_far_smaller_than_the_fitted_ones_are_refused(model_dir: Path) -> None:
    model = hrad.load(model_dir)  # fitted on 64x80: the short side 64 allows down to 8
    with pytest.raises(InputError, match=r"image is 1x1, its short side is under 1/8 of the 80x64 images"):
        model.predict(np.full((1, 1, 3), 0.5, np.float32))
    with pytest.raises(InputError, match="1/8"):
        model.predict(np.full((7, 300, 3), 0.5, np.float32))
    assert np.isfinite(model.predict(np.full((8, 8, 3), 0.5, np.float32)).score)


# ------------------------------------------------------------------------------------ 6. truncated files, dangling links, sizes
def _png8(path: Path, seed: int, height: int = 64, width: int = 80) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), (textured_image(np.random.default_rng(seed), height, width) * 255).astype(np.uint8))
    return path.read_bytes()


def _predict_without_chatter(
    model_dir: Path, folder: Path, out: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> tuple[str, dict[str, str]]:
    """``hrad predict`` over a folder with broken images: status 3, no decoder line on fd 2 (capfd
    sees what libpng and OpenCV print there themselves); its stderr and each file's error."""
    capfd.readouterr()
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out)], monkeypatch) == 3
    err = capfd.readouterr().err
    assert "libpng" not in err and "[ERROR" not in err and "[ WARN" not in err and "Traceback" not in err
    with (out / "scores.csv").open() as handle:
        return err, {Path(row["path"]).name: row["error"] for row in csv.DictReader(handle)}


def _fit_with_broken_image(broken: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """``hrad fit`` on three good images and ``broken`` as ``3.png``: it stops there with status 2,
    no model and no decoder line; the broken file's path and stderr."""
    good = tmp_path / "good"
    for index in range(3):
        _png8(good / f"{index}.png", index)
    (good / "3.png").write_bytes(broken)
    model = tmp_path / "model"
    code = run(["fit", "--data", str(good), "--out", str(model), "--backbone", "tiny-cnn", "--detector", "test-gaussian",
                "--strategy", "downsample", "--image-size", "32"], monkeypatch)
    err = capfd.readouterr().err
    assert code == 2 and not model.exists() and "libpng" not in err and "Traceback" not in err
    return good / "3.png", err


def test_truncated_images_are_one_line_naming_them_without_decoder_chatter(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # libpng printed "libpng error: PNG input buffer is incomplete" itself and OpenCV logged
    # "[ERROR:0@0.2] ... Unexpected end of input stream" for a BMP, both on fd 2 (capfd sees them)
    folder = tmp_path / "in"
    data = _png8(folder / "a.png", 0)
    cut = folder / "b_half.png"
    cut.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    (folder / "c_flipped.png").write_bytes(bytes(flipped))
    ok, bmp = cv2.imencode(".bmp", np.zeros((64, 80, 3), np.uint8))
    (folder / "d_half.bmp").write_bytes(bmp.tobytes()[: len(bmp) // 2])
    (folder / "e_bomb.png").write_bytes(header_only_png(30000, 30000))
    out = tmp_path / "out"
    err, table = _predict_without_chatter(model_dir, folder, out, monkeypatch, capfd)
    assert table["a.png"] == ""
    assert table["b_half.png"].startswith(f"{cut}: truncated or corrupt image (the file ends at byte {len(data) // 2}, inside its IDAT chunk")
    assert table["c_flipped.png"].startswith(f"{folder / 'c_flipped.png'}: truncated or corrupt image (CRC mismatch in its IDAT chunk")
    assert table["d_half.bmp"] == f"{folder / 'd_half.bmp'}: truncated or corrupt image (OpenCV cannot decode its pixel data)"
    assert table["e_bomb.png"].startswith(f"{folder / 'e_bomb.png'}: image is 30000x30000 = 900000000 pixels, over the pixel budget")
    for name in ("b_half", "c_flipped", "d_half", "e_bomb"):
        assert not (out / f"{name}_map.png").exists()  # nothing written for a failed image

    # fit stops at the first unreadable training image: one line naming it, status 2, no model
    path, err = _fit_with_broken_image(cut.read_bytes(), tmp_path, monkeypatch, capfd)
    assert f"hrad: error: {path}: truncated or corrupt image (the file ends at byte" in err


def _gray_png(
    path: Path, pixel_data: bytes, height: int = 64, width: int = 80, depth: int = 8, colour: int = 0, chunks: bytes | None = None
) -> None:
    """A PNG (gray unless ``colour``) with whole chunks and right CRCs: its header, then ``chunks``
    if given, else one IDAT of ``pixel_data``, then IEND."""
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, colour, 0, 0, 0])
    body = png_chunk(b"IDAT", pixel_data) if chunks is None else chunks
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + body + png_chunk(b"IEND", b""))


def test_broken_png_streams_and_chunks_are_one_line_without_decoder_chatter(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # chunks and CRCs whole, the zlib stream inside IDAT broken: libpng printed "libpng error:
    # IDAT: invalid distance too far back" (or "incorrect data check", "Not enough image data",
    # "bad adaptive filter value") on fd 2 beside hrad's line
    folder = tmp_path / "in"
    _png8(folder / "a.png", 0)
    rows = np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8)
    stream = zlib.compress(np.concatenate([np.zeros((64, 1), np.uint8), rows], axis=1).tobytes())
    _gray_png(folder / "b_garbage.png", stream[:2] + bytes((index * 37 + 11) % 256 for index in range(400)))
    _gray_png(folder / "c_cut.png", stream[: len(stream) // 2])
    _gray_png(folder / "d_checksum.png", stream[:-4] + bytes(4))
    _gray_png(folder / "e_filter.png", zlib.compress(np.concatenate([np.full((64, 1), 9, np.uint8), rows], axis=1).tobytes()))
    _gray_png(folder / "f_short.png", zlib.compress(np.concatenate([np.zeros((32, 1), np.uint8), rows[:32]], axis=1).tobytes()))
    # and chunks libpng refuses where they stand (each printed "libpng error: ..." too)
    _gray_png(folder / "g_critical.png", b"", chunks=png_chunk(b"ABCD", b"") + png_chunk(b"IDAT", stream))
    _gray_png(folder / "h_split.png", b"", chunks=png_chunk(b"IDAT", stream[:9]) + png_chunk(b"tEXt", b"a\0b") + png_chunk(b"IDAT", stream[9:]))
    _gray_png(folder / "i_palette.png", stream, colour=3)
    out = tmp_path / "out"
    err, table = _predict_without_chatter(model_dir, folder, out, monkeypatch, capfd)
    reasons = {name: error.removeprefix(f"{folder / name}: truncated or corrupt image (") for name, error in table.items()}
    assert table["a.png"] == "" and all(reasons[name] != table[name] for name in reasons if name != "a.png")
    assert reasons["b_garbage.png"] == "its pixel data is not a valid zlib stream: invalid distance too far back)"
    assert reasons["c_cut.png"].startswith("its pixel data ends inside its zlib stream, after ")
    assert reasons["d_checksum.png"] == "its pixel data is not a valid zlib stream: incorrect data check)"
    assert reasons["e_filter.png"] == "a row of its pixel data has filter type 9, not 0-4)"
    assert reasons["f_short.png"] == "its pixel data inflates to 2592 bytes, its 80x64 header calls for 5184)"
    assert reasons["g_critical.png"] == "ABCD chunk at byte 33: an unknown critical chunk)"
    assert reasons["h_split.png"] == "IDAT chunk at byte 69: not next to the IDAT chunks before it)"
    assert reasons["i_palette.png"] == "IDAT chunk at byte 33: pixel data of a palette image before its PLTE chunk)"
    for name in table:
        assert f"hrad: error: skipped: {table[name]}" in err or name == "a.png"

    # fit stops at the first one: one line naming it, status 2, no model
    path, err = _fit_with_broken_image((folder / "b_garbage.png").read_bytes(), tmp_path, monkeypatch, capfd)
    assert f"hrad: error: {path}: truncated or corrupt image (its pixel data is not a valid zlib stream: invalid distance" in err


def test_pngs_a_decoder_only_warns_about_read_as_their_clean_twin_without_a_line_on_fd2(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # libpng decodes these but printed "libpng warning: gAMA: out of place" (iCCP: too short,
    # sRGB: invalid, gAMA: duplicate, IDAT: Extra compressed data, PLTE: ignored in grayscale
    # PNG, PLTE: out of place, IEND: invalid) on fd 2 for every such file
    rows = np.random.default_rng(1).integers(0, 256, (64, 80), dtype=np.uint8)
    stream = zlib.compress(np.concatenate([np.zeros((64, 1), np.uint8), rows], axis=1).tobytes())
    gamma = png_chunk(b"gAMA", (45455).to_bytes(4, "big"))
    folder = tmp_path / "in"
    folder.mkdir()
    _gray_png(folder / "clean.png", stream)
    _gray_png(folder / "gamma_after.png", b"", chunks=png_chunk(b"IDAT", stream) + gamma)
    _gray_png(folder / "gamma_twice.png", b"", chunks=gamma + gamma + png_chunk(b"IDAT", stream))
    _gray_png(folder / "icc_short.png", b"", chunks=png_chunk(b"iCCP", b"x\0\0" + zlib.compress(b"ab" * 40)) + png_chunk(b"IDAT", stream))
    _gray_png(folder / "srgb_bad.png", b"", chunks=png_chunk(b"sRGB", b"\x09") + png_chunk(b"IDAT", stream))
    _gray_png(folder / "extra_data.png", b"", chunks=png_chunk(b"IDAT", stream[:9]) + png_chunk(b"IDAT", stream[9:] + b"\0\0junk"))
    _gray_png(folder / "gray_palette.png", b"", chunks=png_chunk(b"PLTE", bytes(range(48))) + png_chunk(b"IDAT", stream))
    _gray_png(folder / "palette_after.png", b"", chunks=png_chunk(b"IDAT", stream) + png_chunk(b"PLTE", bytes(range(48))))
    (folder / "end_data.png").write_bytes((folder / "clean.png").read_bytes()[:-12] + png_chunk(b"IEND", b"x"))
    capfd.readouterr()
    clean = read_pixels(folder / "clean.png")
    for path in sorted(folder.iterdir()):
        np.testing.assert_array_equal(read_pixels(path), clean, err_msg=path.name)
    assert capfd.readouterr().err == ""
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(tmp_path / "out")], monkeypatch) == 0
    assert "libpng warning" not in capfd.readouterr().err

    # a palette image's transparency (tRNS, ancillary) is kept when other chunks are dropped
    palette = png_chunk(b"PLTE", bytes(range(48))) + png_chunk(b"tRNS", bytes([0, 128] + [255] * 14))
    indexes = zlib.compress(np.concatenate([np.zeros((64, 1), np.uint8), rows % 16], axis=1).tobytes())
    _gray_png(tmp_path / "palette.png", b"", colour=3, chunks=palette + png_chunk(b"IDAT", indexes))
    _gray_png(tmp_path / "palette_gamma.png", b"", colour=3, chunks=palette + png_chunk(b"IDAT", indexes) + gamma)
    expected = decode_raw(tmp_path / "palette.png")
    assert expected.shape == (64, 80, 4) and (expected[..., 3] == 128).any()
    np.testing.assert_array_equal(decode_raw(tmp_path / "palette_gamma.png"), expected)
    assert "libpng warning" not in capfd.readouterr().err


def _bad_crc(chunk: bytes) -> bytes:
    """``chunk`` (as :func:`png_chunk` makes it) with its CRC's bits flipped."""
    return chunk[:-4] + bytes(byte ^ 0xFF for byte in chunk[-4:])


def test_an_ancillary_chunk_with_a_bad_crc_is_dropped_as_libpng_does_and_a_critical_one_refused(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # libpng decodes such a file, dropping the chunk ("libpng warning: tEXt: CRC error"), but PIL's
    # header parser, the size check before the decode, refused it: "not a readable image (broken
    # PNG header: broken PNG file (bad header checksum in b'tEXt'))"
    rows = np.random.default_rng(2).integers(0, 256, (64, 80), dtype=np.uint8)
    stream = zlib.compress(np.concatenate([np.zeros((64, 1), np.uint8), rows], axis=1).tobytes())
    pixels = png_chunk(b"IDAT", stream)
    text, gamma = _bad_crc(png_chunk(b"tEXt", b"Comment\0line 3")), _bad_crc(png_chunk(b"gAMA", (45455).to_bytes(4, "big")))
    folder = tmp_path / "in"
    folder.mkdir()
    _gray_png(folder / "clean.png", stream)
    _gray_png(folder / "text_before.png", b"", chunks=text + pixels)
    _gray_png(folder / "gamma_and_text_before.png", b"", chunks=gamma + png_chunk(b"tEXt", b"a\0b") + text + pixels)
    _gray_png(folder / "text_after.png", b"", chunks=pixels + text)
    capfd.readouterr()
    clean = read_pixels(folder / "clean.png")
    for path in sorted(folder.iterdir()):
        assert image_size(path) == (64, 80), path.name
        np.testing.assert_array_equal(read_pixels(path), clean, err_msg=path.name)
    assert capfd.readouterr().err == ""
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(tmp_path / "out")], monkeypatch) == 0
    assert "libpng" not in capfd.readouterr().err
    # a palette image's transparency with a bad CRC goes as libpng drops it: no alpha
    palette = png_chunk(b"PLTE", bytes(range(48)))
    indexes = png_chunk(b"IDAT", zlib.compress(np.concatenate([np.zeros((64, 1), np.uint8), rows % 16], axis=1).tobytes()))
    _gray_png(tmp_path / "palette.png", b"", colour=3, chunks=palette + indexes)
    _gray_png(tmp_path / "palette_bad_alpha.png", b"", colour=3, chunks=palette + _bad_crc(png_chunk(b"tRNS", bytes([0, 128]))) + indexes)
    expected = decode_raw(tmp_path / "palette.png")
    assert expected.shape == (64, 80, 3)
    np.testing.assert_array_equal(decode_raw(tmp_path / "palette_bad_alpha.png"), expected)
    assert capfd.readouterr().err == ""

    # a critical chunk with a bad CRC stays refused, one line naming the file
    broken = tmp_path / "broken"
    broken.mkdir()
    _gray_png(broken / "a.png", stream)
    _gray_png(broken / "b_pixels.png", b"", chunks=_bad_crc(pixels))
    _gray_png(broken / "c_palette.png", b"", colour=3, chunks=_bad_crc(palette) + indexes)
    whole = (broken / "a.png").read_bytes()
    (broken / "d_header.png").write_bytes(whole[:8] + _bad_crc(whole[8:33]) + whole[33:])
    (broken / "e_end.png").write_bytes(whole[:-12] + _bad_crc(whole[-12:]))
    err, table = _predict_without_chatter(model_dir, broken, tmp_path / "out_broken", monkeypatch, capfd)
    assert table == {
        "a.png": "",
        "b_pixels.png": f"{broken / 'b_pixels.png'}: truncated or corrupt image (CRC mismatch in its IDAT chunk at byte 33)",
        "c_palette.png": f"{broken / 'c_palette.png'}: not a readable image (broken PNG header: broken PNG file (bad header checksum in b'PLTE'))",
        "d_header.png": f"{broken / 'd_header.png'}: not a readable image (broken PNG header: broken PNG file (bad header checksum in b'IHDR'))",
        "e_end.png": f"{broken / 'e_end.png'}: truncated or corrupt image (CRC mismatch in its IEND chunk at byte {len(whole) - 12})",
    }


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 9), (9, 1), (3, 5), (17, 33)])
def test_interlaced_and_low_bit_pngs_pass_the_pixel_data_check(height: int, width: int, tmp_path: Path) -> None:
    # the check counts each Adam7 pass's rows (empty passes have none) and packs sub-byte pixels:
    # a whole file of any size, depth and interlacing reads as its plain 8/16-bit twin does
    rng = np.random.default_rng(height * width)
    rgb16 = rng.integers(0, 65536, (height, width, 3), dtype=np.uint16)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 2, 0, 0, 1])
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    rows = [b"\0" + row.astype(">u2").tobytes() for x, y, dx, dy in passes for row in rgb16[y::dy, x::dx] if row.size]
    (tmp_path / "adam7.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"".join(rows))) + png_chunk(b"IEND", b"")
    )
    cv2.imwrite(str(tmp_path / "plain.png"), rgb16[..., ::-1])
    np.testing.assert_array_equal(read_image(tmp_path / "adam7.png"), read_image(tmp_path / "plain.png"))
    bits = rng.integers(0, 2, (height, width), dtype=np.uint8)
    packed = [b"\0" + np.packbits(row).tobytes() for row in bits]
    _gray_png(tmp_path / "one_bit.png", zlib.compress(b"".join(packed)), height, width, depth=1)
    np.testing.assert_array_equal(read_image(tmp_path / "one_bit.png")[..., 0], bits.astype(np.float32))


def test_dangling_links_in_a_folder_are_listed_and_refused_naming_them(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # they vanished from the listing: a folder of 2 "images" predicted 1 and exited 0
    folder = tmp_path / "in"
    _png8(folder / "a.png", 0)
    link = folder / "b.png"
    link.symlink_to(tmp_path / "gone.png")
    out = tmp_path / "out"
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out)], monkeypatch) == 3
    err = capsys.readouterr().err
    reason = f"{link}: broken symbolic link (its target {tmp_path / 'gone.png'} does not exist)"
    assert f"hrad: error: skipped: {reason}" in err and "Traceback" not in err
    with (out / "scores.csv").open() as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert rows["a.png"]["status"] == "ok" and rows["b.png"]["status"] == "failed" and rows["b.png"]["error"] == reason
    # given by name it is refused before the model loads, like a missing file
    assert run(["predict", "--model", str(model_dir), str(link), "--out", str(tmp_path / "o2")], monkeypatch) == 2
    assert one_line(capsys.readouterr().err) == f"hrad: error: {reason}"
    # in a training folder it stops fit like any unreadable image
    good = tmp_path / "good"
    for index in range(3):
        _png8(good / f"{index}.png", index)
    (good / "z.png").symlink_to(tmp_path / "gone.png")
    code = run(["fit", "--data", str(good), "--out", str(tmp_path / "m"), "--backbone", "tiny-cnn", "--detector", "test-gaussian",
                "--strategy", "downsample", "--image-size", "32"], monkeypatch)
    assert code == 2 and f"{good / 'z.png'}: broken symbolic link" in capsys.readouterr().err


def test_a_dangling_mask_link_is_refused_naming_link_and_target(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # it read "no mask at <link>", as if nothing were there
    root = tmp_path / "part"
    for index in range(3):
        _png8(root / "train" / "good" / f"{index}.png", index)
    _png8(root / "test" / "good" / "0.png", 5)
    image = root / "test" / "crack" / "0.png"
    _png8(image, 6)
    link = root / "ground_truth" / "crack" / "0_mask.png"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "gone_mask.png")
    reason = f"{image}: mask {link}: broken symbolic link (its target {tmp_path / 'gone_mask.png'} does not exist)"
    assert run(["evaluate", "--model", str(model_dir), "--data", str(root), "--out", str(tmp_path / "report")], monkeypatch) == 2
    assert one_line(capsys.readouterr().err) == f"hrad: error: {reason}"
    code = run(["fit", "--data", str(root), "--out", str(tmp_path / "m"), "--backbone", "tiny-cnn", "--detector", "test-gaussian",
                "--strategy", "downsample", "--image-size", "32"], monkeypatch)
    assert code == 2 and one_line(capsys.readouterr().err) == f"hrad: error: {reason}"
    # VisA's split CSV names its masks: the same line
    visa = tmp_path / "visa"
    _png8(visa / "Normal" / "0.png", 0)
    _png8(visa / "Anomaly" / "0.png", 1)
    (visa / "Masks").mkdir()
    (visa / "Masks" / "0.png").symlink_to(tmp_path / "gone_mask.png")
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\npart,train,normal,Normal/0.png,\npart,test,anomaly,Anomaly/0.png,Masks/0.png\n"
    )
    with pytest.raises(InputError) as raised:
        load_dataset(visa, category="part")
    assert str(raised.value) == (
        f"{visa / 'Anomaly' / '0.png'}: mask {visa / 'Masks' / '0.png'}: broken symbolic link (its target "
        f"{tmp_path / 'gone_mask.png'} does not exist)"
    )


#: what a tiled ensemble's fit, the model and an exported ensemble's predictor say of an image of another size
ENSEMBLE_HINT = "a tiled ensemble has one model per tile position (fit with image_size set to resize every input)"


def test_a_tiled_ensemble_names_the_file_of_another_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fit = ["fit", "--backbone", "tiny-cnn", "--detector", "test-gaussian", "--strategy", "tiled-ensemble", "--tile", "32"]
    mixed = tmp_path / "mixed"
    for index in range(4):
        _png8(mixed / f"{index}.png", index)
    _png8(mixed / "0b.png", 9, 64, 96)  # sorts second: a training image (index 1, not the first)
    assert run([*fit, "--data", str(mixed), "--out", str(tmp_path / "m0")], monkeypatch) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # after the progress lines
    assert errors == [  # the hint as the model and its export word it
        f"hrad: error: {mixed / '0b.png'}: image 96x64 differs from the fitted size 80x64 (set by {mixed / '0.png'}): {ENSEMBLE_HINT}"
    ]
    odd = (mixed / "0b.png").rename(tmp_path / "odd.png")
    config = load_config(None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "test-gaussian"}, "strategy": {"name": "tiled-ensemble", "tile": 32}})
    train = ImageList(sorted(mixed.iterdir()))
    with pytest.raises(InputError, match=re.escape(f"{odd}: image 96x64 differs from the fitted size 80x64")):  # a held-out image
        AnomalyModel(config).fit(train, validation=ImageList([mixed / "1.png", odd]))

    model = tmp_path / "model"
    assert run([*fit, "--data", str(mixed), "--out", str(model)], monkeypatch) == 0
    with pytest.raises(InputError, match=re.escape(f"{odd}: image 96x64 differs from the fitted size 80x64")):
        hrad.load(model).predict(odd)
    with pytest.raises(InputError, match=re.escape(f"{odd}: image 96x64 differs")):
        hrad.load(model).predict_batch([mixed / "0.png", odd])


def test_an_exported_tiled_ensemble_names_the_file_of_another_size_with_the_models_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hrad.export_runtime import open_predictor

    good = tmp_path / "good"
    for index in range(3):
        _png8(good / f"{index}.png", index)
    model = tmp_path / "model"
    assert run(["fit", "--data", str(good), "--out", str(model), "--backbone", "tiny-cnn", "--detector", "patchcore",
                "--strategy", "tiled-ensemble", "--tile", "32"], monkeypatch) == 0
    exported = tmp_path / "m.onnx"
    assert run(["export", "--model", str(model), "--out", str(exported)], monkeypatch) == 0
    images = tmp_path / "in"
    _png8(images / "a.png", 5)
    _png8(images / "b_odd.png", 9, 64, 96)
    odd = images / "b_odd.png"
    reason = f"{odd}: image 96x64 differs from the fitted size 80x64: {ENSEMBLE_HINT}"
    for predictor in (hrad.load(model), open_predictor(exported)):  # the same line, the same hint
        with pytest.raises(InputError) as raised:
            predictor.predict(odd)
        assert str(raised.value) == reason
    capsys.readouterr()
    # hrad predict: one line naming the file, a failed row, the others predicted, exit status 3
    assert run(["predict", "--model", str(exported), str(images), "--out", str(tmp_path / "out")], monkeypatch) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"hrad: error: skipped: {reason}"]
    with (tmp_path / "out" / "scores.csv").open() as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert rows["a.png"]["status"] == "ok" and rows["b_odd.png"]["error"] == reason
