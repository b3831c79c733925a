"""``hrad predict --watch``: folders watched for new images (``hrad.data.watch``)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image
from export_helpers import make_model

from hrad.data import watch as watch_module
from hrad.data.watch import FolderWatch, watched_images
from hrad.errors import InputError
from hrad.model import AnomalyModel
from hrad.outputs import OutputStems

pytestmark = pytest.mark.usefixtures("one_thread")


def _touch(path: Path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_file_is_handed_out_once_it_holds_still_and_again_when_it_changes(tmp_path: Path) -> None:
    _touch(tmp_path / "old.png", b"1", 10**18)
    watch = FolderWatch([tmp_path], seen=[tmp_path / "old.png"])
    assert watch.poll() == []
    _touch(tmp_path / "b.png", b"12", 10**18)
    _touch(tmp_path / "a.png", b"1", 10**18)
    (tmp_path / "notes.txt").write_text("not an image")
    assert watch.poll() == []  # seen once: maybe still being written
    assert watch.poll() == [tmp_path / "a.png", tmp_path / "b.png"]  # held still: by name
    assert watch.poll() == []
    _touch(tmp_path / "c.png", b"1", 10**18)
    assert watch.poll() == []
    _touch(tmp_path / "c.png", b"12", 10**18)  # it grew: still being written
    assert watch.poll() == []
    _touch(tmp_path / "a.png", b"1", 2 * 10**18)  # rewritten after it was handed out
    assert watch.poll() == [tmp_path / "c.png"]
    assert watch.poll() == [tmp_path / "a.png"]
    _touch(tmp_path / "old.png", b"1", 10**18)  # as it was seen: not again
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")  # never complete
    assert watch.poll() == [] and watch.poll() == []
    (tmp_path / "sub").mkdir()
    assert FolderWatch([tmp_path / "sub"]).poll() == []
    (tmp_path / "sub").rmdir()
    with pytest.raises(InputError, match="sub: folder not found"):
        FolderWatch([tmp_path / "sub"])


def test_watched_folder_vanishing_and_file_only_arguments_are_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    watch = FolderWatch([folder])
    folder.rmdir()
    with pytest.raises(InputError, match=r"in: watched folder vanished$"):
        watch.poll()
    write(tmp_path / "a.png", textured_image(np.random.default_rng(0), 8, 8))
    with pytest.raises(InputError, match="--watch: give at least one folder to watch"):
        watched_images([tmp_path / "a.png"])
    folder.mkdir()
    assert watched_images([folder, tmp_path / "a.png"]) == ([tmp_path / "a.png"], [folder])  # an empty folder is fine


def test_output_stems_of_later_files_stay_unique_and_stable(tmp_path: Path) -> None:
    stems = OutputStems([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "y.png"])
    assert [stems(tmp_path / "a" / "x.png"), stems(tmp_path / "b" / "x.png")] == ["00000_x", "00001_x"]
    assert stems(tmp_path / "a" / "y.png") == "00002_y"  # numbered with the others, as output_stems does
    assert stems(tmp_path / "c" / "y.png") == "y"
    assert stems(tmp_path / "d" / "y.png") == "00004_y"  # taken now: numbered by its arrival
    assert stems(tmp_path / "c" / "y.png") == "y"  # seen again: the same stem, outputs replaced


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    model = make_model({"name": "downsample", "image_size": 32}, "test-gaussian")
    return model.fit([textured_image(rng, 48, 64) for _ in range(5)]).save(tmp_path_factory.mktemp("watch") / "model")


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "scores.csv").open() as handle:
        return {Path(row["path"]).name + "@" + Path(row["path"]).parent.name: row for row in csv.DictReader(handle)}


def sigterm_to_main_thread() -> None:
    """A SIGTERM as docker stop sends one, handled where Python handles it (the main thread): sent
    to the process, the kernel may hand it to any thread of pytest's, a library's worker among them."""
    main = threading.main_thread().ident
    assert main is not None
    signal.pthread_kill(main, signal.SIGTERM)


def _camera(folders: list[Path], out: Path, terminate: Callable[[], None] | None) -> threading.Thread:
    """A camera: once the first image's row is written, two new images (one named like an
    earlier one, in the other folder) and a broken one; then, with ``terminate``, a SIGTERM once
    their rows are written (as docker stop or a service manager ends a watch)."""
    stop = terminate is not None

    def work() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_rows(out) if (out / "scores.csv").exists() else {}) < 1:
            time.sleep(0.02)
        rng = np.random.default_rng(5)
        write(folders[0] / "b.png", textured_image(rng, 48, 64))
        write(folders[1] / "a.png", textured_image(rng, 48, 64))
        (folders[1] / "c.png").write_bytes(b"not a png")
        while stop and time.monotonic() < deadline and len(_rows(out)) < 4:
            time.sleep(0.02)
        if terminate is not None:
            terminate()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("stop", ["idle", "sigterm"])
def test_hrad_predict_watch_predicts_images_as_they_come(
    stop: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(watch_module, "POLL_SECONDS", 0.05)
    folders = [tmp_path / "line1", tmp_path / "line2"]
    write(folders[0] / "a.png", textured_image(np.random.default_rng(4), 48, 64))
    folders[1].mkdir()
    out = tmp_path / "out"
    camera = _camera(folders, out, sigterm_to_main_thread if stop == "sigterm" else None)
    idle = ["--watch-idle", "1"] if stop == "idle" else []
    code = run(["predict", "--model", str(model_dir), *map(str, folders), "--out", str(out), "--watch", *idle], monkeypatch)
    camera.join(5)
    err = capsys.readouterr().err
    assert code == 3  # c.png failed
    rows = _rows(out)
    assert sorted(rows) == ["a.png@line1", "a.png@line2", "b.png@line1", "c.png@line2"]
    assert [rows[key]["status"] for key in sorted(rows)] == ["ok", "ok", "ok", "failed"]
    assert f"watching {folders[0]}, {folders[1]} for new images" in err
    assert ("watch ended: no new image for 1 s" if stop == "idle" else "watch ended\n") in err
    assert "3 predictions written" in err and "1 of 4 images failed" in err and "Traceback" not in err
    # line2's a.png has a stem of its own: line1's a.png keeps its outputs
    assert (out / "a_map.png").exists() and (out / "b_map.png").exists()
    assert len(list(out.glob("0000?_a_map.png"))) == 1  # numbered by its arrival


def test_watch_idle_needs_watch(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "in" / "a.png", textured_image(np.random.default_rng(0), 48, 64))
    assert run(["predict", "--model", str(model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--watch-idle", "3"], monkeypatch) == 2
    assert "--watch-idle 3: only with --watch" in capsys.readouterr().err
    assert run(["predict", "--model", str(model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--watch", "--watch-idle", "-1"], monkeypatch) == 2
    assert "--watch-idle -1: must be 0 or more seconds" in capsys.readouterr().err


def test_a_watch_ended_by_a_vanished_folder_sums_up_and_a_file_that_came_whole_did_not_fail(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file caught half-written fails, then is predicted when it comes whole: it did not fail
    (status 0 for it). A watched folder that vanishes (a share unmounted) ends the watch with the
    summary of what it did, then the one-line error, status 2."""
    monkeypatch.setattr(watch_module, "POLL_SECONDS", 0.05)
    folders = [tmp_path / "line1", tmp_path / "line2"]
    write(folders[0] / "a.png", textured_image(np.random.default_rng(4), 48, 64))
    folders[1].mkdir()
    out = tmp_path / "out"

    def camera() -> None:
        deadline = time.monotonic() + 60

        def rows() -> list[str]:
            return [row["status"] for row in _rows(out).values()] if (out / "scores.csv").exists() else []

        def wait_for(statuses: list[str]) -> None:
            while time.monotonic() < deadline and sorted(rows()) != statuses:
                time.sleep(0.02)

        wait_for(["ok"])
        (folders[1] / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n half")  # caught half-written
        wait_for(["failed", "ok"])
        write(folders[1] / "c.png", textured_image(np.random.default_rng(6), 48, 64))  # the rest came
        wait_for(["ok", "ok"])
        shutil.rmtree(folders[1])

    thread = threading.Thread(target=camera, daemon=True)
    thread.start()
    code = run(["predict", "--model", str(model_dir), *map(str, folders), "--out", str(out), "--watch"], monkeypatch)
    thread.join(5)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.rstrip().endswith(f"hrad: error: {folders[1]}: watched folder vanished")
    # two images: c.png's failed row and its good one are one image (the summary said 3)
    assert "2 predictions written" in err and "failed" not in err.split("predictions written")[1]


def test_a_file_or_folder_named_twice_is_one(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder and a file in it, or one folder spelled twice, name each image once: one row and
    its own stem (it was predicted twice into numbered stems); a watch sees the given file as
    already predicted however the folder is spelled."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(12)
    write(tmp_path / "line" / "a.png", textured_image(rng, 48, 64))
    write(tmp_path / "line" / "b.png", textured_image(rng, 48, 64))
    out = tmp_path / "out"
    assert run(["predict", "--model", str(model_dir), "line", str(tmp_path / "line" / "a.png"), "./line/", "--out", str(out)], monkeypatch) == 0
    assert sorted(_rows(out)) == ["a.png@line", "b.png@line"] and (out / "a_map.png").exists() and (out / "b_map.png").exists()
    assert "2 predictions written" in capsys.readouterr().err

    images, folders = watched_images([str(tmp_path / "line" / "a.png"), "line", "line/", str(tmp_path / "line")])
    assert images == [tmp_path / "line" / "a.png", Path("line/b.png")] and folders == [Path("line")]
    watch = FolderWatch(folders, seen=images)
    assert watch.poll() == [] and watch.poll() == []  # neither is new


def test_a_watch_stopped_while_predicting_says_what_is_left(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGTERM while a watched image computes ends the watch (status 0, its usual end) and
    says how many of the images found were not predicted and how to go on."""
    monkeypatch.setattr(watch_module, "POLL_SECONDS", 0.05)
    folder, out = tmp_path / "line", tmp_path / "out"
    folder.mkdir()
    original = AnomalyModel.predict

    def stopped(self: AnomalyModel, *args: Any, **kwargs: Any) -> Any:
        sigterm_to_main_thread()  # docker stop while the image computes
        time.sleep(0.5)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AnomalyModel, "predict", stopped)

    def camera() -> None:
        deadline = time.monotonic() + 30  # maps.json: the folder was listed, these files are new ones
        while time.monotonic() < deadline and not (out / "maps.json").exists():
            time.sleep(0.02)
        rng = np.random.default_rng(13)
        for name in ("a", "b", "c"):
            write(tmp_path / f"{name}.png", textured_image(rng, 48, 64))
            os.replace(tmp_path / f"{name}.png", folder / f"{name}.png")  # whole at once

    thread = threading.Thread(target=camera, daemon=True)
    thread.start()
    code = run(["predict", "--model", str(model_dir), str(folder), "--out", str(out), "--watch", "--batch-images", "1"], monkeypatch)
    thread.join(5)
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    told = re.search(r"watch ended\n(\d) of the (\d) images found were not predicted: the same command with --resume predicts them\n", err)
    assert told is not None and 1 <= int(told[1]) <= int(told[2])


def test_a_watch_pages_what_it_found_and_each_new_image_while_it_waits(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """index.html is written once the images found at the start are predicted, and an image that
    came since is on it within the interval though no other image follows (the page was written
    only when a later image came 30 s after the last page, so a watch showed no page at all)."""
    from hrad.cli.predict import SummaryPage

    monkeypatch.setattr(watch_module, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(SummaryPage, "WATCH_INTERVAL", 0.3)
    folder, out = tmp_path / "line", tmp_path / "out"
    write(folder / "a.png", textured_image(np.random.default_rng(4), 48, 64))
    page = out / "index.html"
    seen: list[str] = []

    def camera() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not page.exists():
            time.sleep(0.02)
        seen.append(page.read_text(encoding="utf-8") if page.exists() else "")
        write(folder / "b.png", textured_image(np.random.default_rng(5), 48, 64))  # within the interval of that page
        while time.monotonic() < deadline and "b.png" not in page.read_text(encoding="utf-8"):
            time.sleep(0.02)
        seen.append(page.read_text(encoding="utf-8"))
        sigterm_to_main_thread()

    thread = threading.Thread(target=camera, daemon=True)
    thread.start()
    code = run(["predict", "--model", str(model_dir), str(folder), "--out", str(out), "--watch"], monkeypatch)
    thread.join(5)
    assert code == 0 and "Traceback" not in capsys.readouterr().err
    assert "1 image:" in seen[0] and "a.png" in seen[0]
    assert "2 images:" in seen[1] and "b.png" in seen[1]
