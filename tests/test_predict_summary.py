"""``hrad predict``'s summary page (index.html): the batch at a glance, from scores.csv."""

from __future__ import annotations

import csv
import html
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image, with_spot
from export_helpers import make_model

from hrad.outputs import SUMMARY_PAGE, THUMBNAIL_FOLDER
from hrad.reports.batch import PASSED_SHOWN, BatchItem, render_batch_page, score_histogram

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    images = [textured_image(rng, 48, 64) for _ in range(6)]
    return make_model({"name": "downsample", "image_size": 32}, "test-gaussian").fit(images[:4], images[4:]).save(tmp_path_factory.mktemp("summary") / "model")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    images = tmp_path / "in"
    for index in range(3):
        write(images / f"good {index}.png", textured_image(rng, 48, 64))
    write(images / "spot#<1>.png", with_spot(textured_image(rng, 48, 64), 10, 20, 14)[0])
    (images / "broken.png").write_bytes(b"not an image")
    return images


def _section(page: str, heading: str) -> str:
    """The page between the ``<h2>`` starting with ``heading`` and the next ``<h2>``."""
    start = page.index(f"<h2>{heading}")
    end = page.index("<h2>", start + 4)
    return page[start:end]


def test_the_page_shows_flagged_images_first_failed_ones_and_links_that_resolve(
    model_dir: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out)], monkeypatch) == 3  # one failed
    page = (out / SUMMARY_PAGE).read_text(encoding="utf-8")
    rows = list(csv.DictReader((out / "scores.csv").open(encoding="utf-8")))
    ok = [row for row in rows if row["status"] == "ok"]
    flagged = sorted((row for row in ok if row["is_anomalous"] == "true"), key=lambda row: -float(row["score"]))
    assert flagged and len(flagged) < len(ok)  # the spot is flagged, not every image
    assert f"5 images: <b>{len(flagged)} flagged</b>" in page
    assert f"4 predictions written to {out}: {len(flagged)} flagged anomalous, {len(ok) - len(flagged)} passed\n" in capsys.readouterr().err
    assert f"{len(ok) - len(flagged)} passed, 1 failed." in page
    # flagged images in score order, each named (escaped) with its score
    section = _section(page, "Flagged")
    positions = [section.index(html.escape(row["path"])) for row in flagged]
    assert positions == sorted(positions)
    assert all(f"score {float(row['score']):.4g}" in section for row in flagged)
    assert "broken.png: not a readable image" in _section(page, "Failed")
    # every thumbnail and link points at a file of --out, names with spaces, '#', '<' included
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len([link for link in links if link.startswith(THUMBNAIL_FOLDER)]) == len(ok)
    for link in links:
        assert (out / unquote(html.unescape(link))).is_file(), link
    assert "threshold" in page and "<svg" in page  # the histogram marks the threshold


def test_no_summary_writes_neither_page_nor_thumbnails(model_dir: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    run(["predict", "--model", str(model_dir), str(folder), "--out", str(out), "--no-summary"], monkeypatch)
    assert not (out / SUMMARY_PAGE).exists() and not (out / THUMBNAIL_FOLDER).exists()
    assert (out / "scores.csv").is_file()


def test_a_page_that_cannot_be_written_is_a_warning_not_a_failure(
    model_dir: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "broken.png").unlink()
    out = tmp_path / "out"
    (out / SUMMARY_PAGE).mkdir(parents=True)  # a folder where the page would go
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out)], monkeypatch) == 0
    assert re.search(r"hrad: warning: .*index\.html: summary page not written", capsys.readouterr().err)


def test_a_resumed_run_pages_and_counts_the_kept_images_too(
    model_dir: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "broken.png").unlink()
    out = tmp_path / "out"
    first = folder / "first"
    write(first / "early.png", textured_image(np.random.default_rng(5), 48, 64))
    assert run(["predict", "--model", str(model_dir), str(first), "--out", str(out)], monkeypatch) == 0
    command = ["predict", "--model", str(model_dir), str(first), *sorted(map(str, folder.glob("*.png"))), "--out", str(out), "--resume"]
    assert run(command, monkeypatch) == 0
    page = (out / SUMMARY_PAGE).read_text(encoding="utf-8")
    assert "5 images:" in page and "early.png" in page
    rows = list(csv.DictReader((out / "scores.csv").open(encoding="utf-8")))
    flagged = sum(row["is_anomalous"] == "true" for row in rows)  # the kept image counts too
    assert f"5 predictions written to {out}: {flagged} flagged anomalous, {5 - flagged} passed" in capsys.readouterr().err


def test_render_lists_every_image_and_bounds_the_passed_thumbnails() -> None:
    passed = [BatchItem(f"p{index}.png", score=float(index), flagged=False, threshold=500.0, thumbnail=f"thumbs/p{index}.jpg") for index in range(200)]
    items = [*passed, BatchItem("f.png", score=900.0, flagged=True, threshold=500.0, regions=2), BatchItem("x.png", error="x.png: truncated")]
    page = render_batch_page(items, "t", {"model": "<m>"})
    assert "&lt;m&gt;" in page and "<m>" not in page
    shown = _section(page, "Passed")
    assert shown.count("<img") == PASSED_SHOWN and "p199.png" in shown and "p0.png" not in shown  # closest to the threshold first
    assert all(f"<td>p{index}.png</td>" in page for index in range(200))  # the table has all of them
    assert "score 900, 2 regions" in _section(page, "Flagged")
    assert "x.png: truncated" in _section(page, "Failed")


def test_histogram_bars_count_the_scores_and_the_threshold_line_sits_at_its_value() -> None:
    svg = score_histogram([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0], threshold=5.0, width=640)
    heights = [float(value) for value in re.findall(r'<rect [^>]*height="([0-9.]+)"', svg)]
    assert len(heights) == 5 and max(heights) == heights[0]  # 12 scores // 3 -> 5 bins, the first holds four
    assert heights[0] / heights[1] == pytest.approx(4 / 2)
    line = re.search(r'<line x1="([0-9.]+)"[^>]*stroke="#c33"', svg)
    assert line is not None and float(line.group(1)) == pytest.approx(52 + 0.5 * (640 - 52 - 30), abs=0.1)  # the plot spans x 52..610
    assert "<svg" in score_histogram([3.0], None)  # one image, no threshold: still a picture


def test_a_file_named_like_the_thumbnail_folder_is_one_line(
    model_dir: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file ``thumbs`` in --out was a FileExistsError traceback, status 1."""
    out = tmp_path / "out"
    out.mkdir()
    (out / THUMBNAIL_FOLDER).write_text("notes")
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"hrad: error: {out / THUMBNAIL_FOLDER}: a file where the summary page's thumbnails go" in err and "Traceback" not in err
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out), "--no-summary"], monkeypatch) == 3  # broken.png


def test_a_strip_s_card_spans_the_page_and_other_cards_keep_their_box(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line-scan strip's thumbnail in the 240 x 180 box of every card was a sliver a few pixels
    high (a 4800 x 400 strip: 240 x 20); its card now spans the page, the picture at its width."""
    rng = np.random.default_rng(5)
    images, out = tmp_path / "in", tmp_path / "out"
    write(images / "part.png", textured_image(rng, 48, 64))
    write(images / "strip.png", np.concatenate([textured_image(rng, 48, 64) for _ in range(8)], axis=1))  # 48 x 512
    assert run(["predict", "--model", str(model_dir), str(images), "--out", str(out), "--threshold", "-1"], monkeypatch) == 0  # both flagged: cards
    page = (out / SUMMARY_PAGE).read_text(encoding="utf-8")
    cards = dict(re.findall(r"<div class='([^']*)'><a [^>]*><img [^>]*alt=\"[^\"]*?(\w+)\.png\"", page))
    assert {name: kind for kind, name in cards.items()} == {"part": "card flagged", "strip": "card flagged wide"}
    assert ".card.wide img { width: 100%; height: auto; }" in page
