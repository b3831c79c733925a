"""``hrad info MODEL --page FILE``: the model's page with its held-out scores against the
threshold, training losses and region of interest."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run
from export_helpers import make_model, training_images

from hrad.artifact import MANIFEST

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    roi = np.zeros((64, 96), bool)
    roi[8:56, 12:84] = True
    model = make_model({"name": "downsample", "image_size": 32}, "test-gaussian")
    model.fit(training_images(1, 3, 64, 96), training_images(2, 5, 64, 96), roi=roi)
    folder = model.save(tmp_path_factory.mktemp("page") / "model")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["training_history"] = {"student": [0.9, 0.5, 0.4, 0.35], "segmentation": [0.7, 0.3]}  # as a trainable detector records it
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_the_page_shows_each_held_out_score_the_threshold_losses_and_region(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    page_path = tmp_path / "model.html"
    assert run(["info", str(model_dir), "--page", str(page_path)], monkeypatch) == 0
    assert "page written to" in capsys.readouterr().err
    page = page_path.read_text(encoding="utf-8")
    thresholds = json.loads((model_dir / MANIFEST).read_text())["thresholds"]
    held_out = thresholds["validation_image_scores"]
    assert len(held_out) == 5 and page.count("<circle") == 5  # one dot per held-out image
    assert f"image threshold {thresholds['image']:.4g}" in page and ">mean<" in page
    assert "over 5 held-out normal images" in page
    lines = re.findall(r'<polyline points="([^"]+)"', page)
    assert sorted(len(points.split()) for points in lines) == [2, 4]  # a point per epoch of each stage
    assert "student loss" in page and "segmentation loss" in page
    assert "Region of interest" in page and "data:image/png;base64," in page and f"{48 * 72 / (64 * 96):.1%} of each image" in page


def test_a_model_without_thresholds_says_so(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    manifest = json.loads((bare / MANIFEST).read_text())
    manifest["thresholds"], manifest["training_history"] = None, {}
    (bare / MANIFEST).write_text(json.dumps(manifest))
    assert run(["info", str(bare), "--page", str(tmp_path / "p.html")], monkeypatch) == 0
    page = (tmp_path / "p.html").read_text(encoding="utf-8")
    assert "no held-out normal images" in page and "<circle" not in page and "<polyline" not in page


@pytest.mark.parametrize("where", ["folder", "missing/p.html", "/proc/p.html"])
def test_a_page_that_cannot_be_written_there_is_one_line(
    where: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """/proc/p.html (a folder that exists and takes no file, as a read-only mount) was a traceback."""
    if where.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "folder").mkdir()
    assert run(["info", str(model_dir), "--page", str(tmp_path / where)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "cannot write the page there" in err and len(err.strip().splitlines()) == 1


def test_the_region_of_interest_is_decoded_once_for_the_lines_and_the_page(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hrad info --page decoded the mask (a PNG in the manifest, full image size) for the facts
    and again for the picture."""
    from hrad.postprocess.roi import RegionOfInterest

    decoded: list[str] = []
    original = RegionOfInterest.from_json.__func__  # type: ignore[attr-defined]

    def counted(cls: type[RegionOfInterest], content: object, where: str) -> RegionOfInterest | None:
        decoded.append(where)
        return original(cls, content, where)  # type: ignore[no-any-return]

    monkeypatch.setattr(RegionOfInterest, "from_json", classmethod(counted))
    assert run(["info", str(model_dir), "--page", str(tmp_path / "p.html")], monkeypatch) == 0
    assert decoded == [str(model_dir / MANIFEST)]
    assert "data:image/png;base64," in (tmp_path / "p.html").read_text(encoding="utf-8")
