"""Image files whose names are not UTF-8 (a Latin-1 name from an old Windows share): Linux holds
them as bytes, Python as lone surrogates, and every text file hrad writes once crashed on them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image
from export_helpers import make_model

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(sys.platform != "linux", reason="file names as arbitrary bytes are a Linux matter"),
]

#: b"b\xe9d.png": "bèd.png" in Latin-1, not UTF-8
LATIN1 = os.fsdecode(b"b\xe9d.png")


def _write(path: Path, image: np.ndarray) -> None:
    """:func:`cli_helpers.write` through a plain name: OpenCV's ``imwrite`` segfaults on a name that is not UTF-8."""
    plain = path.with_name("plain.png")
    write(plain, image)
    plain.rename(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(8)
    model = make_model({"name": "downsample", "image_size": 32}, "test-gaussian")
    return model.fit([textured_image(rng, 48, 64) for _ in range(5)]).save(tmp_path_factory.mktemp("names") / "model")


def test_predict_log_file_and_resume_take_a_name_that_is_not_utf8(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """predict stopped with a UnicodeEncodeError traceback writing the name into scores.csv (and
    the summary page, and a --log-file's header when the name was on the command line)."""
    folder, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "run.log"
    rng = np.random.default_rng(9)
    write(folder / "a.png", textured_image(rng, 48, 64))
    _write(folder / LATIN1, textured_image(rng, 48, 64))
    command = ["--log-file", str(log), "predict", "--model", str(model_dir), str(folder / "a.png"), str(folder / LATIN1), "--out", str(out)]
    assert run(command, monkeypatch) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "warning" not in err
    scores = (out / "scores.csv").read_bytes()
    assert os.fsencode(folder / LATIN1) + b"," in scores  # the name's own bytes: the file it names
    assert (out / os.fsdecode(b"b\xe9d_map.png")).is_file()
    assert b"b%E9d_overlay.png" in (out / "index.html").read_bytes()  # the link reaches the file
    assert b"=== exit status 0" in log.read_bytes()
    assert run([*command[2:], "--resume"], monkeypatch) == 0
    assert "resuming: 2 of 2 images already predicted" in capsys.readouterr().err


def test_evaluate_takes_a_test_image_whose_name_is_not_utf8(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """evaluate stopped with a traceback writing metrics.md, after every image was predicted."""
    root = tmp_path / "data" / "part"
    rng = np.random.default_rng(10)
    _write(root / "test" / "good" / LATIN1, textured_image(rng, 48, 64))
    write(root / "test" / "good" / "001.png", textured_image(rng, 48, 64))
    image = textured_image(rng, 48, 64)
    image[10:20, 10:20] = 1.0
    write(root / "test" / "spot" / "000.png", image)
    mask = np.zeros((48, 64, 3), np.float32)
    mask[10:20, 10:20] = 1.0
    write(root / "ground_truth" / "spot" / "000_mask.png", mask)
    out = tmp_path / "report"
    assert run(["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "data"), "--category", "part", "--out", str(out)], monkeypatch) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert b"b\xe9d.png" in (out / "scores.csv").read_bytes() and b"b\xe9d.png" in (out / "metrics.md").read_bytes()
