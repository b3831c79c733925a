"""``hrad demo``, shrunk to seconds: its result table is the command's output, on stdout (it went
to stderr with the progress), and its results.json is strict JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run

from hrad.data import make_demo_dataset


def _refuse(constant: str) -> Any:
    raise ValueError(f"not JSON: {constant}")


def test_demo_prints_its_results_to_stdout_and_progress_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(  # a few small images instead of 2048x2048 ones
        "hrad.cli.demo.make_demo_dataset",
        lambda folder, image_size: make_demo_dataset(folder, image_size=image_size, n_train=3, n_test_good=2, n_test_bad=2),
    )
    monkeypatch.setattr(
        "hrad.cli.demo.SETUPS", {"downsample-32": {"name": "downsample", "image_size": 32}, "tiled-64": {"name": "tiled", "tile": 64, "stride": 64}}
    )
    for pictures in ("write_html_report", "case_grid"):  # matplotlib's figures: 90% of the time, and not what is tested here
        monkeypatch.setattr(f"hrad.evaluation.{pictures}", lambda *_, **__: None)
    assert run(["demo", "--out", str(tmp_path / "demo"), "--size", "128", "--backbone", "tiny-cnn"], monkeypatch) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("| setup | image_auroc |") and "| downsample-32 |" in captured.out and "| tiled-64 |" in captured.out
    assert "Paired bootstrap" in captured.out or "all of one class" in captured.out  # the verdict on the difference
    assert "| setup |" not in captured.err and f"report: {tmp_path / 'demo' / 'README.md'}" in captured.err
    assert "fitting PatchCore" in captured.err  # messages stay on stderr
    results = json.loads((tmp_path / "demo" / "results.json").read_text(), parse_constant=_refuse)
    assert set(results["results"]) == {"downsample-32", "tiled-64"}


def test_a_demo_stopped_while_writing_its_dataset_leaves_none_and_a_bad_out_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while the demo wrote its 2048x2048 images left out/data/train with some of them,
    which the next run took for the whole dataset; --out /sys/demo was a PermissionError traceback."""

    def stopped(folder: Path, image_size: int) -> None:
        make_demo_dataset(folder, image_size=64, n_train=1, n_test_good=0, n_test_bad=0)
        raise KeyboardInterrupt

    monkeypatch.setattr("hrad.cli.demo.make_demo_dataset", stopped)
    out = tmp_path / "demo"
    assert run(["demo", "--out", str(out), "--size", "64"], monkeypatch) == 130
    assert not out.exists()  # no half-built data/, nor the staging beside it, nor the --out it made
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    assert run(["demo", "--out", str(tmp_path / "file" / "demo"), "--size", "64"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hrad: error: {tmp_path / 'file' / 'demo'}: output folder is not writable (") and len(err.splitlines()) == 1
