"""hrad fit on a user's own folder of good images: settings and files a first day gets wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image

#: a seconds-long fit: tiny backbone, the Gaussian test detector
TINY = ["--backbone", "tiny-cnn", "--detector", "test-gaussian"]


def good_folder(folder: Path, count: int = 5, height: int = 64, width: int = 96) -> Path:
    rng = np.random.default_rng(3)
    for index in range(count):
        write(folder / f"{index:03d}.png", textured_image(rng, height, width))
    return folder


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("hrad: error:")]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["--strategy", "tiled", "--tile", "1024"], "the 96x64 image padded to a 1024x1024 tile is 1024x1024 = 1048576 pixels"),
        (["--strategy", "downsample", "--image-size", "1024"], "the 96x64 image resized to image_size is 1024x1024 = 1048576 pixels"),
        (["--strategy", "tiled", "--image-size", "2048", "--tile", "64"], "the 96x64 image resized to image_size is 2048x1365"),
    ],
)
def test_a_tile_or_image_size_far_over_the_images_is_refused_in_one_line(
    setting: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tile 100000 (or --image-size 100000) over 1500x1000 capsules asked for 120 GB and died in
    a traceback; the working image is held to the pixel budget (here lowered to keep it cheap)."""
    folder = good_folder(tmp_path / "good")
    model = tmp_path / "m"
    code = run(["--max-pixels", "200000", "fit", "--data", str(folder), "--out", str(model), *TINY, *setting], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert errors(err) == [f"hrad: error: {message}" + errors(err)[0].split(message, 1)[1]]
    assert "over the pixel budget of 200000" in err and not model.exists()


def test_a_training_image_far_smaller_than_the_others_is_refused_as_predict_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A thumbnail among the good images (60x40 among 1500x1000 capsules) was learned without a
    word when the split put it in training, and refused only when it was held out."""
    folder = good_folder(tmp_path / "good")
    write(folder / "001_thumb.png", textured_image(np.random.default_rng(4), 6, 9))
    model = tmp_path / "m"
    assert run(["fit", "--data", str(folder), "--out", str(model), *TINY], monkeypatch) == 2
    err = capsys.readouterr().err
    assert errors(err) == [
        f"hrad: error: {folder / '001_thumb.png'}: image is 9x6, its short side is under 1/8 of the 96x64 images the model "
        f"was fitted on (set by {folder / '000.png'}, the first training image); resize it to that scale"
    ]
    assert "Traceback" not in err and not model.exists()
