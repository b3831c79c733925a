"""Progress of work without a callback in its interface: detectors' logged steps reach the CLI."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run, write
from conftest import textured_image

from hrad.detectors.coreset import greedy_coreset
from hrad.progress import log_progress, progress_of


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progress") / "part"
    rng = np.random.default_rng(0)
    for index in range(5):
        write(root / "train" / "good" / f"{index:03d}.png", textured_image(rng, 64, 96))
    write(root / "test" / "good" / "000.png", textured_image(rng, 64, 96))
    return root


def test_a_logged_step_carries_done_total_and_description(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("hrad.test_progress")
    with caplog.at_level(logging.INFO, logger="hrad"):
        log_progress(logger, 3, 7, "stage")
        log_progress(logger, 4, 7, "stage", "custom %s", "text")
        logger.info("plain")
    steps = [progress_of(record) for record in caplog.records]
    assert steps == [(3, 7, "stage"), (4, 7, "stage"), None]
    assert [record.getMessage() for record in caplog.records] == ["stage: 3/7", "custom text", "plain"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hrad"):
        log_progress(logger, 1, 2, "quiet")  # below the level: no record is made
    assert caplog.records == []


def test_coreset_selection_reports_its_steps_up_to_the_last(caplog: pytest.LogCaptureFixture) -> None:
    features = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="hrad.detectors.coreset"):
        selected = greedy_coreset(features, 250, projection_dim=None)
    steps = [progress_of(record) for record in caplog.records]
    assert len(selected) == 250 and steps[-1] == (250, 250, "coreset selection")
    done = [step[0] for step in steps if step is not None]
    assert done == sorted(done) and 2 < len(done) <= 101  # about one record per 1% of the selections


def test_fit_shows_detector_epochs_and_coreset_steps(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # stderr is not a terminal here: the plain lines a log file gets (hrad fit ... 2> fit.log)
    base = ["fit", "--data", str(dataset), "--backbone", "tiny-cnn", "--strategy", "downsample", "--image-size", "64"]
    assert run([*base, "--out", str(tmp_path / "flow"), "--detector", "fastflow", "--set", "detector.epochs=2"], monkeypatch) == 0
    assert "fastflow: train epochs: 2/2" in capsys.readouterr().err
    assert run([*base, "--out", str(tmp_path / "core"), "--detector", "patchcore", "--set", "detector.coreset_ratio=0.5"], monkeypatch) == 0
    err = capsys.readouterr().err
    assert "coreset selection: " in err and "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("coreset selection: ")][-1]
    done, total = last.split(": ")[1].split(",")[0].split("/")
    assert done == total


def test_inside_the_cli_progress_detector_warnings_still_print_and_other_records_stay_quiet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hrad.cli.progress import progress_bars

    logger = logging.getLogger("hrad.detectors.test_progress")
    with progress_bars():
        log_progress(logger, 1, 2, "stage")
        logger.info("an ordinary info line")
        logger.warning("a detector's warning")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["stage: 1/2, 0 s", "hrad: warning: a detector's warning"]
    assert logging.getLogger("hrad.detectors").level == logging.NOTSET  # restored


def test_a_pool_fit_in_worker_processes_shows_each_jobs_epochs(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiled ensemble's tile models train in two worker processes: their epochs reach the
    log file's lines, each job's apart and called by its tile's position (first and last epoch;
    the 30 s lines in between)."""
    args = ["fit", "--data", str(dataset), "--out", str(tmp_path / "pool"), "--backbone", "tiny-cnn",
            "--strategy", "tiled-ensemble", "--set", "strategy.tile=48", "--set", "strategy.workers=2",
            "--detector", "fastflow", "--set", "detector.epochs=3"]  # fmt: skip
    assert run(args, monkeypatch) == 0
    lines = capsys.readouterr().err.splitlines()
    epochs = sorted(line.rsplit(",", 1)[0] for line in lines if line.startswith("tile ("))
    # 64 x 96 images, 48 px tiles: 2 rows of 2
    tiles = [f"tile ({row}, {col})" for row in range(2) for col in range(2)]
    assert epochs == sorted(f"{tile}: fastflow: train epochs: {done}/3" for tile in tiles for done in (1, 3))
    assert not [line for line in lines if line.startswith("job ")]


def test_a_pool_job_s_last_step_shows_before_the_pool_counts_it(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """'fitting tile models: 1/6' came before the finished job's 'tile (0, 0): coreset selection:
    39/39' (the result overtook the job's last log record): the first count follows one job's
    last step, the last count every job's."""
    args = ["fit", "--data", str(dataset), "--out", str(tmp_path / "pool"), "--backbone", "tiny-cnn",
            "--strategy", "tiled-ensemble", "--set", "strategy.tile=16", "--set", "strategy.workers=2",
            "--detector", "patchcore"]  # fmt: skip
    assert run(args, monkeypatch) == 0
    lines = capsys.readouterr().err.splitlines()
    pool = [index for index, line in enumerate(lines) if line.startswith("fitting tile models: ")]
    last = sorted(index for index, line in enumerate(lines) if re.match(r"tile \(\d+, \d+\): coreset selection: (\d+)/\1,", line))
    assert [lines[index].split(",")[0] for index in pool] == ["fitting tile models: 1/24", "fitting tile models: 24/24"]
    assert len(last) == 24 and last[0] < pool[0] and last[-1] < pool[-1], lines


def test_a_hiad_pool_in_worker_processes_names_each_detector(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HiAD's pool detectors and low branch training in two worker processes: each one's lines
    say which it is."""
    args = ["fit", "--data", str(dataset), "--out", str(tmp_path / "hiad"), "--backbone", "tiny-cnn",
            "--strategy", "hiad", "--set", "strategy.patch_size=32", "--set", "strategy.low_res_size=32",
            "--set", "strategy.assignment=na", "--set", "strategy.num_detectors=2", "--set", "strategy.workers=2",
            "--detector", "fastflow", "--set", "detector.epochs=2"]  # fmt: skip
    assert run(args, monkeypatch) == 0
    lines = capsys.readouterr().err.splitlines()
    jobs = ["detector 1/2 (na, 32 px patches)", "detector 2/2 (na, 32 px patches)", "low branch (32 px)"]
    epochs = sorted(line.rsplit(",", 1)[0] for line in lines if line.startswith(("detector ", "low branch ")))
    assert epochs == sorted(f"{job}: fastflow: train epochs: {done}/2" for job in jobs for done in (1, 2))


def test_each_worker_job_is_a_stage_of_its_own_timed_from_the_jobs_start(capsys: pytest.CaptureFixture[str]) -> None:
    """Records a pool's workers logged (hrad.runners marks them with their job) get lines of their
    own, rate-limited per job, their seconds from the job's start on the worker's clock."""
    from hrad.cli.progress import progress_bars
    from hrad.progress import PROGRESS
    from hrad.runners import WORKER_JOB, WorkerJob

    logger = logging.getLogger("hrad.detectors.test_progress")

    def forwarded(job: WorkerJob, done: int, created: float) -> None:
        extra = {PROGRESS: (done, 3, "stage"), WORKER_JOB: job}
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "step", (), None, extra=extra)
        record.created = created
        logger.handle(record)

    one, two = WorkerJob(1, 2, 1000.0), WorkerJob(2, 2, 1005.0)
    with progress_bars(interval=30):
        forwarded(one, 1, 1010.0)  # a job's first step: from the job's start
        forwarded(two, 1, 1012.0)
        forwarded(one, 2, 1020.0)  # 10 s after job 1's last line: quiet
        forwarded(two, 2, 1050.0)  # 38 s after job 2's: a line
        forwarded(one, 3, 1060.0)  # the last step
    assert capsys.readouterr().err.splitlines() == [
        "job 1/2: stage: 1/3, 10 s",
        "job 2/2: stage: 1/3, 7 s",
        "job 2/2: stage: 2/3, 45 s (about 22 s left)",  # a line between a stage's first and last: its time left at its pace
        "job 1/2: stage: 3/3, 60 s",
    ]
    with progress_bars(interval=30) as update:  # a serial pool: the same stage again, job after job
        for done in (1, 2, 3, 1, 2):
            update(done, 3, "stage")
    assert capsys.readouterr().err.splitlines() == ["stage: 1/3, 0 s", "stage: 3/3, 0 s", "stage: 1/3, 0 s"]


def test_a_long_stage_s_lines_say_how_long_is_left(capsys: pytest.CaptureFixture[str]) -> None:
    """A two-hour fit under nohup: the 30 s lines between a stage's first and last step say the
    time left at the stage's pace so far (a bar's ETA), in hours and minutes once it is long."""
    from hrad.cli.progress import duration_words, progress_bars
    from hrad.progress import PROGRESS
    from hrad.runners import WORKER_JOB, WorkerJob

    assert [duration_words(s) for s in (0, 45.4, 99, 100, 3540, 5900, 6000, 7530)] == [
        "0 s", "45 s", "99 s", "2 min", "59 min", "98 min", "1 h 40 min", "2 h 06 min"
    ]  # fmt: skip
    logger = logging.getLogger("hrad.detectors.test_progress")
    job = WorkerJob(1, 1, 0.0, "tile (0, 0)")
    with progress_bars(interval=30):
        for done, created in ((1, 8.0), (100, 1800.0), (300, 5400.0), (900, 16200.0)):
            record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "step", (), None,
                                       extra={PROGRESS: (done, 900, "embedding"), WORKER_JOB: job})  # fmt: skip
            record.created = created
            logger.handle(record)
    assert capsys.readouterr().err.splitlines() == [
        "tile (0, 0): embedding: 1/900, 8 s",  # one step is no pace: the first carries the start-up
        "tile (0, 0): embedding: 100/900, 1800 s (about 4 h 00 min left)",
        "tile (0, 0): embedding: 300/900, 5400 s (about 3 h 00 min left)",
        "tile (0, 0): embedding: 900/900, 16200 s",
    ]


def test_in_a_terminal_a_worker_jobs_bar_leaves_when_its_stage_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool of many jobs does not leave a finished bar per job and stage: a worker job's bar
    goes at its last step; this process's own stages keep theirs."""
    import io

    from rich.console import Console

    from hrad.cli import progress as cli_progress
    from hrad.progress import PROGRESS
    from hrad.runners import WORKER_JOB, WorkerJob

    monkeypatch.setattr(cli_progress, "console", Console(file=io.StringIO(), force_terminal=True, width=100))
    logger = logging.getLogger("hrad.detectors.test_progress")

    def forwarded(job: WorkerJob, done: int) -> None:
        extra = {PROGRESS: (done, 2, "train epochs"), WORKER_JOB: job}
        logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, "step", (), None, extra=extra))

    one, two = WorkerJob(1, 2, 0.0, "tile (0, 0)"), WorkerJob(2, 2, 0.0, "tile (0, 1)")
    with cli_progress.progress_bars() as update:
        bars = update.bars  # type: ignore[attr-defined]
        update(0, 2, "fitting tile models")
        forwarded(one, 1)
        forwarded(two, 1)
        assert [task.description for task in bars.tasks] == [
            "fitting tile models", "tile (0, 0): train epochs", "tile (0, 1): train epochs"
        ]
        forwarded(one, 2)
        update(1, 2, "fitting tile models")
        assert [task.description for task in bars.tasks] == ["fitting tile models", "tile (0, 1): train epochs"]
        forwarded(two, 2)
        update(2, 2, "fitting tile models")
        assert [(task.description, task.completed) for task in bars.tasks] == [("fitting tile models", 2)]
