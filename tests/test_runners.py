"""A process pool's workers: what their jobs log reaches this process's logging, marked with the
job, at this process's levels, and a failed or interrupted pool leaves no thread behind."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from hrad.progress import log_progress, progress_of
from hrad.runners import ProcessPoolRunner, worker_job

LOGGER = "hrad.detectors.test_runners"


def log_steps(name: str) -> str:
    """A job (module level: it travels to spawn workers): two logged steps, an INFO line, a warning."""
    logger = logging.getLogger(LOGGER)
    for done in (1, 2):
        log_progress(logger, done, 2, f"{name} epochs")
    logger.info("an ordinary line of %s", name)
    logger.warning("a warning of %s", name)
    return name.upper()


@dataclass(frozen=True)
class Named:
    """A job that names itself (a strategy's ``FitJob.label``); ``label`` None: it does not."""

    name: str
    label: str | None


def log_named(job: Named) -> str:
    return log_steps(job.name)


def log_then_fail(seconds: float) -> None:
    """A job that logs, then fails after ``seconds`` (or is still sleeping when the pool stops)."""
    log_progress(logging.getLogger(LOGGER), 1, 1, "doomed")
    time.sleep(seconds)
    raise ValueError("job failed")


class Records(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    """A handler on ``hrad.detectors`` in this process, which logs at INFO (restored afterwards)."""
    logger = logging.getLogger("hrad.detectors")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def forwarding_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "hrad-worker-logs"]


def test_workers_log_records_reach_this_process_marked_with_their_job(records: Records) -> None:
    assert ProcessPoolRunner(2, threads_per_worker=1).map(log_steps, ["a", "b"]) == ["A", "B"]
    jobs = {}
    for record in records.records:
        job = worker_job(record)
        assert job is not None and record.name == LOGGER
        jobs.setdefault(job.label, []).append((progress_of(record), record.levelno, record.getMessage()))
    assert jobs == {
        f"job {index}/2": [
            ((1, 2, f"{name} epochs"), logging.INFO, f"job {index}/2: {name} epochs: 1/2"),
            ((2, 2, f"{name} epochs"), logging.INFO, f"job {index}/2: {name} epochs: 2/2"),
            (None, logging.INFO, f"job {index}/2: an ordinary line of {name}"),
            (None, logging.WARNING, f"job {index}/2: a warning of {name}"),
        ]
        for index, name in [(1, "a"), (2, "b")]
    }
    assert forwarding_threads() == []


def test_a_jobs_last_record_is_handed_over_before_the_pool_counts_it(records: Records) -> None:
    """The pool's progress(k, n) came on the result while the job's last record (its last epoch)
    was still on the records queue: a job's records now all reach this process first."""
    events: list[str] = []
    records.emit = lambda record: events.append(record.getMessage())  # type: ignore[method-assign]
    names = [f"j{index}" for index in range(8)]
    ProcessPoolRunner(2, threads_per_worker=1).map(log_steps, names, lambda done, total: events.append(f"done {done}"))
    for done in range(1, len(names) + 1):
        before = events[: events.index(f"done {done}")]
        assert sum(line.endswith(f"a warning of {name}") for name in names for line in before) >= done, events


def test_workers_log_at_this_process_levels(records: Records) -> None:
    logging.getLogger("hrad.detectors").setLevel(logging.WARNING)  # the fixture restores it
    assert ProcessPoolRunner(2, threads_per_worker=1).map(log_steps, ["a", "b"]) == ["A", "B"]
    assert sorted(record.getMessage() for record in records.records) == [
        "job 1/2: a warning of a",
        "job 2/2: a warning of b",
    ]


def test_a_failed_pool_stops_forwarding_at_once(records: Records) -> None:
    """A job's error stops the pool and the forwarding thread without waiting for the running
    job (Ctrl-C takes the same path: test_distributed's interruption test)."""
    start = time.monotonic()
    with pytest.raises(ValueError, match="job failed"):
        ProcessPoolRunner(2, threads_per_worker=1).map(log_then_fail, [0.0, 120.0])
    assert forwarding_threads() == []
    assert time.monotonic() - start < 60  # the sleeping job was not waited for


def test_a_job_with_a_label_is_called_by_it_in_its_records(records: Records) -> None:
    """A strategy's job that says what it fits (``tile (0, 1)``) is called that instead of
    ``job i/n``; one without a label keeps ``job i/n``."""
    jobs = [Named("a", "tile (0, 1)"), Named("b", None)]
    assert ProcessPoolRunner(2, threads_per_worker=1).map(log_named, jobs) == ["A", "B"]
    labels = {}
    for record in records.records:
        job = worker_job(record)
        assert job is not None
        labels.setdefault(job.label, []).append(record.getMessage())
    assert labels == {
        "tile (0, 1)": ["tile (0, 1): a epochs: 1/2", "tile (0, 1): a epochs: 2/2",
                        "tile (0, 1): an ordinary line of a", "tile (0, 1): a warning of a"],
        "job 2/2": ["job 2/2: b epochs: 1/2", "job 2/2: b epochs: 2/2",
                    "job 2/2: an ordinary line of b", "job 2/2: a warning of b"],
    }  # fmt: skip
