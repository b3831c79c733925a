"""A command that fails leaves no folder it made for its output (``--out``, ``info --page``): the
output folder is checked, and so made, before the work that can fail (a model not found, a bad
dataset, Ctrl-C), and was left behind empty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image
from test_packaging import WITHOUT_TORCH


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A labelled MVTec-style folder (``data``: train/good, test/good) and two folders that are
    no reports (``r1``, ``r2``); ``kept``, a folder that was there before the command."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        write(tmp_path / "data" / split / "good" / "000.png", textured_image(rng, 64, 96))
    for name in ("r1", "r2", "kept"):
        (tmp_path / name).mkdir()
    return tmp_path


#: each fails after its --out (OUT, under the folder ``kept``) was checked
FAILING = {
    "predict": ["predict", "--model", "missing", "data/test/good", "--out", "OUT"],
    "predict-distributed": ["predict-distributed", "--model", "missing", "data/test/good", "--out", "OUT"],
    "evaluate": ["evaluate", "--model", "missing", "--data", "data", "--out", "OUT"],
    "compare": ["compare", "r1", "r2", "--out", "OUT"],
    "ad2-evaluate": ["ad2-evaluate", "--model", "missing", "--data", "data", "--out", "OUT"],
}


def left_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize("command", FAILING, ids=str)
def test_a_failed_command_leaves_no_folder_it_made(
    command: str, inputs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out kept/a/b/out: a, b and out go again; kept, there before, stays."""
    monkeypatch.chdir(inputs)
    out = "kept/a/b/out"
    code = run([out if part == "OUT" else part for part in FAILING[command]], monkeypatch)
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert left_in(inputs / "kept") == []


def test_a_folder_that_holds_something_stays_and_so_do_those_above_it(
    inputs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Interrupted (Ctrl-C) while loading the model, after a file was written into a/ meanwhile:
    a/ and its file stay, the empty b/ and out/ below it go."""
    import hrad.cli.predict

    def interrupted(*args: object) -> None:
        (inputs / "kept" / "a" / "note.txt").write_text("written meanwhile\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(hrad.cli.predict, "load_predictor", interrupted)
    monkeypatch.chdir(inputs)
    assert run(["predict", "--model", "missing", "data/test/good", "--out", "kept/a/b/out"], monkeypatch) == 130
    assert left_in(inputs / "kept") == ["a", "a/note.txt"]


def test_a_failed_compare_on_a_runtime_install_leaves_no_out(inputs: Path) -> None:
    """On a torch-free install too (hrad compare runs there): it checks --out, and so makes it,
    before it reads the reports."""
    args = [part if part != "OUT" else "kept/out" for part in FAILING["compare"]]
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], cwd=inputs, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "hrad: error: r1/metrics.json: missing (is r1 a report folder of hrad evaluate?)\n")
    assert left_in(inputs / "kept") == []
