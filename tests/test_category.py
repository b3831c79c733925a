"""--category picks one category of a multi-category MVTec-layout root wherever a dataset is read."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image, with_spot

from hrad.data.datasets import training_images
from hrad.errors import InputError


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec AD root with two categories, ``part`` and ``other``."""
    root = tmp_path_factory.mktemp("mvtec_ad")
    rng = np.random.default_rng(0)
    for category in ("part", "other"):
        for index in range(5):
            write(root / category / "train" / "good" / f"{index:03d}.png", textured_image(rng, 64, 80))
        write(root / category / "test" / "good" / "000.png", textured_image(rng, 64, 80))
        image, mask = with_spot(textured_image(rng, 64, 80), 30, 40, 8)
        write(root / category / "test" / "spot" / "000.png", image)
        (root / category / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / category / "ground_truth" / "spot" / "000_mask.png"), mask.astype(np.uint8) * 255)
    return root


def test_training_images_of_each_layout(mvtec_root: Path, tmp_path: Path) -> None:
    train, validation = training_images(mvtec_root, category="part")
    assert [p.parent for p in train] == [mvtec_root / "part" / "train" / "good"] * 5 and validation == []
    assert training_images(mvtec_root / "part")[0] == train  # the category folder itself
    assert training_images(mvtec_root / "part", category="part")[0] == train
    folder = mvtec_root / "part" / "train" / "good"
    assert training_images(folder) == (train, [])  # a plain folder of good images
    with pytest.raises(InputError, match=r"no category 'bottle' \(categories here: other, part\)"):
        training_images(mvtec_root, category="bottle")
    with pytest.raises(InputError, match="pick one with --category"):
        training_images(mvtec_root)


def test_fit_and_evaluate_take_category(mvtec_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    fit = ["fit", "--data", str(mvtec_root), "--category", "part", "--out", str(model), "--backbone", "tiny-cnn",
           "--detector", "test-gaussian", "--strategy", "downsample", "--image-size", "64"]
    assert run(fit, monkeypatch) == 0
    assert "on 5 images" in capsys.readouterr().err
    report = tmp_path / "report"
    assert run(["evaluate", "--model", str(model), "--data", str(mvtec_root), "--category", "part", "--out", str(report)], monkeypatch) == 0
    assert (report / "metrics.json").is_file()
    assert run(["fit", "--data", str(mvtec_root), "--category", "nope", "--out", str(tmp_path / "m2")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "no category 'nope'" in err and "Traceback" not in err


def test_make_hd_takes_category(mvtec_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "hd"
    args = ["make-hd", "--source", str(mvtec_root), "--category", "other", "--out", str(out), "--size", "128"]
    assert run(args, monkeypatch) == 0
    assert len(list((out / "train" / "good").iterdir())) == 5
