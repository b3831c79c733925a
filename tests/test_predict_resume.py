"""``hrad predict --resume``: an interrupted run into --out keeps what it finished."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image
from export_helpers import make_model

from hrad.data.images import default_file_mode
from hrad.model import AnomalyModel
from hrad.outputs import SCORES_COLUMNS, ScoresWriter, failed_row

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(8)
    model = make_model({"name": "downsample", "image_size": 32}, "test-gaussian")
    return model.fit([textured_image(rng, 48, 64) for _ in range(5)]).save(tmp_path_factory.mktemp("resume") / "model")


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "scores.csv").open() as handle:
        return {Path(row["path"]).name: row for row in csv.DictReader(handle)}


def test_resume_keeps_finished_images_and_predicts_the_rest(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(9)
    for index in range(5):
        write(folder / f"{index}.png", textured_image(rng, 48, 64))
    (folder / "5.png").write_bytes(b"broken")
    predicted: list[str] = []
    interrupt = ["3.png"]
    original = AnomalyModel.predict

    def counting(self: AnomalyModel, image: Any, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
        predicted.append(Path(str(name)).name)
        if Path(str(name)).name in interrupt:
            interrupt.clear()
            raise KeyboardInterrupt  # Ctrl-C while the fourth image computes, once
        return original(self, image, *args, name=name, **kwargs)

    monkeypatch.setattr(AnomalyModel, "predict", counting)
    command = ["predict", "--model", str(model_dir), str(folder), "--out", str(out)]
    assert run(command, monkeypatch) == 130
    assert sorted(_rows(out)) == ["0.png", "1.png", "2.png"]
    assert "3 of the 6 images found were not predicted: the same command with --resume predicts them\ninterrupted" in capsys.readouterr().err
    first_map = (out / "1_map.png").read_bytes()
    capsys.readouterr()

    os.utime(folder / "2.png")  # rewritten after its map: predicted again
    predicted.clear()
    assert run([*command, "--resume"], monkeypatch) == 3  # 5.png fails
    err = capsys.readouterr().err
    assert "resuming: 2 of 6 images already predicted into" in err
    assert sorted(predicted) == ["2.png", "3.png", "4.png"]  # 5.png fails when read, before the model
    rows = _rows(out)
    assert sorted(rows) == [f"{index}.png" for index in range(6)]
    assert [rows[f"{index}.png"]["status"] for index in range(6)] == ["ok"] * 5 + ["failed"]
    assert (out / "1_map.png").read_bytes() == first_map and "5 predictions written" in err

    # the failed image is tried again; nothing else is
    write(folder / "5.png", textured_image(rng, 48, 64))
    predicted.clear()
    assert run([*command, "--resume"], monkeypatch) == 0
    assert predicted == ["5.png"] and all(row["status"] == "ok" for row in _rows(out).values())

    # other thresholds: their files would mix with these
    capsys.readouterr()
    assert run([*command, "--resume", "--sigmas", "5"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"--resume: {out} holds predictions of other thresholds (its maps.json differs); choose another --out" in err
    assert run([*command, "--resume", "--no-overlays"], monkeypatch) == 2
    assert f"--resume: {out} holds predictions of other output settings (its maps.json differs)" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert run(["predict", "--model", str(copy), *command[3:], "--resume"], monkeypatch) == 2
    assert f"--resume: {out} holds predictions of another model ({model_dir.resolve()}) (its maps.json differs)" in capsys.readouterr().err
    # without --resume everything is predicted again
    predicted.clear()
    assert run(command, monkeypatch) == 0 and len(predicted) == 6
    # a scores.csv without its maps.json: nothing says what wrote the files
    (out / "maps.json").unlink()
    assert run([*command, "--resume"], monkeypatch) == 2
    assert f"--resume: {out} holds a scores.csv without maps.json, so what wrote its files is unknown; choose" in capsys.readouterr().err
    # --resume into an empty folder predicts everything
    predicted.clear()
    assert run([*command[:-1], str(tmp_path / "fresh"), "--resume"], monkeypatch) == 0 and len(predicted) == 6


def test_resume_from_another_folder_or_spelling_keeps_the_finished_images(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same images named from another working folder, or by absolute paths, are the same
    images: kept, not predicted again (the earlier run's relative paths start where it ran)."""
    folder, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(10)
    for index in range(3):
        write(folder / f"{index}.png", textured_image(rng, 48, 64))
    monkeypatch.chdir(tmp_path)
    assert run(["predict", "--model", str(model_dir), "in", "--out", "out"], monkeypatch) == 0
    predicted: list[str] = []
    original = AnomalyModel.predict

    def counting(self: AnomalyModel, image: Any, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
        predicted.append(Path(str(name)).name)
        return original(self, image, *args, name=name, **kwargs)

    monkeypatch.setattr(AnomalyModel, "predict", counting)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert run(["predict", "--model", str(model_dir), "../in", "--out", "../out", "--resume"], monkeypatch) == 0
    assert predicted == [] and "resuming: 3 of 3 images already predicted" in capsys.readouterr().err
    assert run(["predict", "--model", str(model_dir), str(folder), "--out", str(out), "--resume"], monkeypatch) == 0
    assert predicted == [] and sorted(_rows(out)) == ["0.png", "1.png", "2.png"]
    assert {row["path"] for row in _all_rows(out)} == {str(folder / f"{index}.png") for index in range(3)}  # as this run names them


def test_resume_over_more_images_overwrites_no_kept_file(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Images added on resume whose names repeat a kept image's take no kept image's stem: the
    kept rows still name their own maps, unchanged."""
    rng = np.random.default_rng(11)
    for name in ("a", "b", "c"):
        write(tmp_path / name / "x.png", textured_image(rng, 48, 64))
    out = tmp_path / "out"
    command = ["predict", "--model", str(model_dir), "--out", str(out)]
    assert run([*command, str(tmp_path / "a"), str(tmp_path / "b")], monkeypatch) == 0
    before = {row["path"]: (row["map"], Path(row["map"]).read_bytes()) for row in _all_rows(out)}
    # c listed first now: by position alone it would be named 00000_x, a's stem
    assert run([*command, str(tmp_path / "c"), str(tmp_path / "a"), str(tmp_path / "b"), "--resume"], monkeypatch) == 0
    after = {row["path"]: row["map"] for row in _all_rows(out)}
    assert len(set(after.values())) == 3
    for path, (map_name, content) in before.items():
        assert after[path] == map_name and Path(map_name).read_bytes() == content


def _all_rows(out: Path) -> list[dict[str, str]]:
    with (out / "scores.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_rewriting_scores_csv_with_the_kept_rows_leaves_the_earlier_file_whole_until_it_is_done(tmp_path: Path) -> None:
    """--resume writes scores.csv again, the kept rows first: the file was opened for writing
    (emptied) before them, so a kill or a full disk part-way lost the rows, and the next --resume
    predicted every image again. Now a temporary file beside it replaces it once written."""
    scores = tmp_path / "scores.csv"
    rows = [[f"{index}.png", "0.5", "False", "1", "ok", "", f"{index}_map.png", "0"] for index in range(3)]
    with ScoresWriter(scores, kept=rows[:2]) as writer:
        writer.write(failed_row("x.png", "unreadable"))
    with scores.open(newline="", encoding="utf-8") as handle:
        written = list(csv.reader(handle))
    assert written[0] == list(SCORES_COLUMNS) and written[1:3] == rows[:2] and written[3][0] == "x.png" and len(written) == 4
    assert scores.stat().st_mode & 0o777 == default_file_mode()  # as open() makes it
    before = scores.read_bytes()

    class Killed(Exception):
        pass

    class DyingRow(list[str]):
        """A row whose writing stops part-way (the process killed, the disk full)."""

        def __iter__(self) -> Iterator[str]:
            yield from self[:3]
            raise Killed

    with pytest.raises(Killed):
        ScoresWriter(scores, kept=[rows[2], DyingRow(rows[0])])
    assert scores.read_bytes() == before  # the earlier rows are all there
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.csv"]  # no temporary file left


def test_a_run_into_an_earlier_run_s_folder_without_resume_says_it_replaces_its_scores(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second hrad predict into the same --out dropped the first run's rows without a word (and
    left the first run's maps beside the new ones, in no table); --resume, which keeps them, is
    quiet about it, and so is a first run."""
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    rng = np.random.default_rng(10)
    for index in range(2):
        write(first / f"a{index}.png", textured_image(rng, 48, 64))
    write(second / "b.png", textured_image(rng, 48, 64))
    assert run(["predict", "--model", str(model_dir), str(first), "--out", str(out)], monkeypatch) == 0
    assert "earlier run" not in capsys.readouterr().err
    assert run(["predict", "--model", str(model_dir), str(second), "--out", str(out)], monkeypatch) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    assert warned == [
        f"hrad: warning: {out} holds an earlier run's scores.csv (2 rows): this run replaces it and index.html (the files of "
        "images it does not predict again stay); --resume keeps its predictions and predicts only the rest"
    ]
    assert sorted(_rows(out)) == ["b.png"]
    assert run(["predict", "--model", str(model_dir), str(second), "--out", str(out), "--resume"], monkeypatch) == 0
    assert "hrad: warning:" not in capsys.readouterr().err
