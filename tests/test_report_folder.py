"""A report folder holds one run: ``hrad evaluate --out`` and ``hrad compare --out`` replace an
earlier report of theirs whole, refuse a folder holding anything else in one line (exit 2,
nothing deleted), and a failed run leaves the earlier report as it was."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image, with_spot
from export_helpers import make_model

from hrad.errors import InputError
from hrad.evaluation import EVALUATION_REPORT
from hrad.reports.folder import STAGING_PREFIX, ReportFolder, first_line_is

REPORT_FILES = {"metrics.json", "metrics.md", "scores.csv", "cases.png", "report.html"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved tiny model and a labelled test set of 3 good and 3 defective images."""
    root = tmp_path_factory.mktemp("report_folder")
    rng = np.random.default_rng(0)
    model = make_model({"name": "downsample", "image_size": 64}, "test-gaussian").fit([textured_image(rng, 96, 128) for _ in range(6)])
    data = root / "data"
    for index in range(3):
        write(data / "test" / "good" / f"{index:03d}.png", textured_image(rng, 96, 128))
        image, mask = with_spot(textured_image(rng, 96, 128), 20 + 10 * index, 40 + 15 * index, 10)
        write(data / "test" / "spot" / f"{index:03d}.png", image)
        (data / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(data / "ground_truth" / "spot" / f"{index:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return model.save(root / "model"), data


def _rows(report: Path) -> list[dict[str, str]]:
    with (report / "scores.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _evaluate(setup: tuple[Path, Path], out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    model, data = setup
    return run(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), *extra], monkeypatch)


def test_an_earlier_evaluate_report_is_replaced_whole(setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "report"
    assert _evaluate(setup, report, monkeypatch) == 0
    assert {entry.name for entry in report.iterdir()} == REPORT_FILES and len(_rows(report)) == 6
    # a killed run's staging folder (a process of this host that no longer lives) goes with the next run
    stale = report / f"{STAGING_PREFIX}{socket.gethostname()}-999999999-0badc0de"
    stale.mkdir()
    (stale / "metrics.json").write_text("{}")
    (report / ".DS_Store").write_bytes(b"Finder was here")  # a file browser's: no reason to refuse, kept
    assert _evaluate(setup, report, monkeypatch, "--limit", "2") == 0
    assert {entry.name for entry in report.iterdir()} == REPORT_FILES | {".DS_Store"}  # no staging left, nothing of the first run beside
    assert len(_rows(report)) == 2 and json.loads((report / "metrics.json").read_text())["images"] == 2
    assert "| images | 2 |" in (report / "metrics.md").read_text()


@pytest.mark.parametrize(
    ("setup_folder", "held"),
    [
        (lambda folder: (folder / "notes.txt").write_text("mine"), "it holds notes.txt"),
        (lambda folder: (folder / "scores.csv").write_text("path,score,is_anomalous\n"), "its scores.csv is not hrad evaluate's"),  # hrad predict's
        (lambda folder: (folder / "sub").mkdir(), "it holds sub"),
        (lambda folder: (folder / "metrics.json").write_text("{}"), "it has no scores.csv"),
    ],
)
def test_a_folder_holding_anything_else_is_refused_before_the_model_loads(
    setup_folder: object, held: str, setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    setup_folder(folder)  # type: ignore[operator]
    before = sorted((path.name, path.is_file() and path.read_bytes()) for path in folder.iterdir())
    missing = tmp_path / "no_model"  # the folder is refused first: the model is never read
    assert run(["evaluate", "--model", str(missing), "--data", str(setup[1]), "--out", str(folder)], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hrad: error: {folder}: not empty and not a report of hrad evaluate ({held}); give a new or empty --out")
    assert len(err.splitlines()) == 1
    assert sorted((path.name, path.is_file() and path.read_bytes()) for path in folder.iterdir()) == before


def test_a_failed_run_leaves_the_earlier_report_as_it_was(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report"
    assert _evaluate(setup, report, monkeypatch) == 0
    before = {entry.name: entry.read_bytes() for entry in report.iterdir()}
    broken = tmp_path / "broken"
    for index in range(2):
        (broken / "test" / "good").mkdir(parents=True, exist_ok=True)
        (broken / "test" / "good" / f"{index:03d}.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert run(["evaluate", "--model", str(setup[0]), "--data", str(broken), "--out", str(report)], monkeypatch) == 2
    assert "no test image could be evaluated" in capsys.readouterr().err
    assert {entry.name: entry.read_bytes() for entry in report.iterdir()} == before

    def full_disk(*_: object, **__: object) -> None:  # the report half-written (metrics.json, metrics.md, ... done)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hrad.evaluation.write_html_report", full_disk)
    with pytest.raises(OSError, match="No space left"):  # in this process an unexpected error propagates
        _evaluate(setup, report, monkeypatch, "--limit", "2")
    assert {entry.name: entry.read_bytes() for entry in report.iterdir()} == before  # no staging left either


def test_staged_replaces_the_earlier_files_and_keeps_them_on_an_error(tmp_path: Path) -> None:
    folder = ReportFolder("hrad test", frozenset({"a.txt", "b.txt", "key.csv"}), "key.csv", lambda f: first_line_is(f / "key.csv", "k"))
    out = tmp_path / "out"
    with folder.staged(out) as staging:
        for name in ("a.txt", "b.txt", "key.csv"):
            (staging / name).write_text("k\n" if name == "key.csv" else "one")
    with pytest.raises(RuntimeError), folder.staged(out) as staging:
        (staging / "a.txt").write_text("two")
        raise RuntimeError("stopped half-way")
    assert {path.name: path.read_text() for path in out.iterdir()} == {"a.txt": "one", "b.txt": "one", "key.csv": "k\n"}
    with folder.staged(out) as staging:  # b.txt not written this time: the earlier one goes
        (staging / "a.txt").write_text("two")
        (staging / "key.csv").write_text("k\n")
    assert {path.name: path.read_text() for path in out.iterdir()} == {"a.txt": "two", "key.csv": "k\n"}
    os.symlink(out / "a.txt", out / "b.txt")  # a link, even with one of the report's names, is not the report's
    with pytest.raises(InputError, match=r"it holds b\.txt"):
        folder.check(out)
    assert EVALUATION_REPORT.check(tmp_path / "new" / "report").is_dir()  # a new folder is created


def test_compare_out_replaces_an_earlier_comparison_and_refuses_a_report_folder(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two, comparison = tmp_path / "one", tmp_path / "two", tmp_path / "cmp"
    assert _evaluate(setup, one, monkeypatch) == 0 and _evaluate(setup, two, monkeypatch, "--limit", "4") == 0
    for names in ("a,b", "c,d"):
        assert run(["compare", str(one), str(two), "--out", str(comparison), "--names", names], monkeypatch) == 0
    assert {entry.name for entry in comparison.iterdir()} == {"comparison.md", "comparison.json"}
    assert [model["name"] for model in json.loads((comparison / "comparison.json").read_text())["models"]] == ["c", "d"]
    capsys.readouterr()
    assert run(["compare", str(one), str(two), "--out", str(two)], monkeypatch) == 2  # an evaluate report is not a comparison
    err = capsys.readouterr().err
    assert f"{two}: not empty and not a report of hrad compare (it holds cases.png)" in err and len(err.strip().splitlines()) == 1
    assert len(_rows(two)) == 4
