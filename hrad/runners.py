"""Job runners: map picklable jobs to results in process, in local processes or on Ray.

Fitting pool-type strategies (one detector per tile location in ``tiled-ensemble``, the
detector pool of ``hiad``) is "map jobs -> results". A :class:`JobRunner` does exactly that:
:class:`SerialRunner` in process, :class:`ProcessPoolRunner` in local ``spawn`` processes and
:class:`RayExecutor` as Ray tasks on local GPUs or a cluster (Ray is optional). Jobs carry file
paths, configs and detector classes, never live models, and results come back in job order, so
every runner gives the serial result. Strategies ask :func:`job_runner`; :func:`use_runner`
makes a runner (e.g. Ray) active for a block of code: where work runs is not part of the
model's config or artifact.

What jobs log reaches this process's logging as if they ran here: a :class:`ProcessPoolRunner`
worker or a :class:`RayExecutor` task logs at this process's levels, and its records (a
detector's epochs and coreset steps, warnings) travel through a queue to this process's
loggers, marked with the job they came from (:func:`worker_job`; the message starts with the
job's label, ``job i/n: `` or the job's own ``label``), so the command line shows concurrent
jobs' progress apart.

Every path a job names (spill folders) must be readable from every worker: on a multi-machine
cluster put them on shared storage (point ``TMPDIR`` or HiAD's ``work_dir`` at it). Workers need
``hrad`` installed (or ship it with ``runtime_env``).

This module imports nothing of hrad above :mod:`hrad.errors`, so strategies can use it without
an import cycle; batch prediction over a fitted model lives in :mod:`hrad.distributed`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import multiprocessing
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from logging.handlers import QueueHandler
from types import ModuleType
from typing import Any, Protocol, TypeVar

from hrad.errors import ConfigError

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")

#: ``progress(done, total)`` after each finished job (in completion order)
JobProgress = Callable[[int, int], None]

#: A picklable callable each worker process runs once before its first job or model load,
#: e.g. to register plugin detectors; or ``"package.module:function"`` to import and call.
Setup = Callable[[], None] | str


# ------------------------------------------------------------------------------------ runners
class JobRunner(Protocol):
    """Runs ``fn`` on every job and returns the results in job order.

    ``fn`` must be picklable (a module-level function) and so must the jobs; both travel to
    other processes or machines. A job's exception is re-raised by :meth:`map`. A job with a
    ``label`` attribute (a short string, e.g. ``tile (1, 2)``) is called that in its forwarded
    log records instead of ``job i/n`` (:func:`job_label`): the strategy knows what a job is
    about, the runner only its place in the list.
    """

    #: the device every job must use because the runner pins jobs to devices itself (a Ray
    #: task sees its own GPU as ``"cuda"``), or None when the caller chooses (local GPUs)
    device: str | None

    def map(
        self, fn: Callable[[JobT], ResultT], jobs: Sequence[JobT], progress: JobProgress | None = None
    ) -> list[ResultT]: ...


class SerialRunner:
    """Runs jobs one after another in this process."""

    device: str | None = None

    def map(
        self, fn: Callable[[JobT], ResultT], jobs: Sequence[JobT], progress: JobProgress | None = None
    ) -> list[ResultT]:
        results = []
        for done, job in enumerate(jobs, start=1):
            results.append(fn(job))
            if progress is not None:
                progress(done, len(jobs))
        return results


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ worker log records
#: the attribute of a log record forwarded from a :class:`ProcessPoolRunner` worker or a
#: :class:`RayExecutor` task that names the job running there (a :class:`WorkerJob`)
WORKER_JOB = "hrad_job"


@dataclass(frozen=True)
class WorkerJob:
    """The job a forwarded log record comes from: job ``index`` (from 1) of ``total`` in one
    ``map`` of a runner, started at ``started`` (``time.time()`` in the worker), called ``name``
    when the job gave itself a label (:func:`job_label`)."""

    index: int
    total: int
    started: float
    name: str | None = None

    @property
    def label(self) -> str:
        """The job's name, else ``job i/n``: what tells concurrent jobs' lines and bars apart."""
        return self.name or f"job {self.index}/{self.total}"


def job_label(job: object) -> str | None:
    """A job's own label (its ``label`` attribute, when a non-empty string), else None."""
    label = getattr(job, "label", None)
    return label if isinstance(label, str) and label else None


def worker_job(record: logging.LogRecord) -> WorkerJob | None:
    """The job a record forwarded from a worker process was logged in; None for any other."""
    value = getattr(record, WORKER_JOB, None)
    return value if isinstance(value, WorkerJob) else None


#: the job this worker process is running (set around each job by :func:`_run_labelled`)
_RUNNING: WorkerJob | None = None
#: a process pool worker's queue of log records to the parent (set by :func:`_init_worker`)
_RECORDS: Any = None
#: first item of the marker a pool worker queues after a job's last record: ``(_JOB_END, index)``
_JOB_END = "hrad-job-end"


class _ForwardingHandler(QueueHandler):
    """A worker's only handler: every record, message merged (picklable), onto the parent's
    queue, marked with the running job and its message prefixed with the job's label."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = super().prepare(record)
        job = _RUNNING
        if job is not None:
            setattr(prepared, WORKER_JOB, job)
            prepared.msg = prepared.message = f"{job.label}: {prepared.message}"
        return prepared


def _logging_levels() -> dict[str, int]:
    """This process's explicitly set logger levels (``""``: the root's), which a worker copies so
    its detectors make exactly the records this process's logging would take."""
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _apply_levels(levels: Mapping[str, int]) -> None:
    """Set the logger levels :func:`_logging_levels` read in the parent, in a worker."""
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


def _init_worker(threads: int, records: Any, levels: Mapping[str, int], disabled: int) -> None:
    """Pool initializer: torch's threads, and this worker's log records sent to the parent."""
    global _RECORDS
    _RECORDS = records
    _set_threads(threads)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ForwardingHandler(records))
    _apply_levels(levels)
    logging.disable(disabled)


def _run_labelled(fn: Callable[[Any], Any], job: Any, index: int, total: int) -> Any:
    """Run ``fn(job)`` with its log records marked as job ``index`` of ``total`` (and its label)."""
    global _RUNNING
    _RUNNING = WorkerJob(index, total, time.time(), job_label(job))
    try:
        return fn(job)
    finally:
        _RUNNING = None


def _run_pooled(fn: Callable[[Any], Any], job: Any, index: int, total: int) -> Any:
    """:func:`_run_labelled` in a pool worker, then the job's end marker on the records queue,
    behind its last record (one worker's puts keep their order), so the parent can show that
    record (a last epoch) before it counts the job done."""
    try:
        return _run_labelled(fn, job, index, total)
    finally:
        _RECORDS.put((_JOB_END, index))


def _handle(record: logging.LogRecord) -> None:
    """A worker's record to this process's logger of its name, as if it had been logged here."""
    try:
        logging.getLogger(record.name).handle(record)
    except Exception:  # a broken handler must not stop the other records
        logging.getLogger(__name__).debug("handling a worker's log record failed", exc_info=True)


class _RecordForwarder:
    """A thread handing the records workers put on ``records`` to this process's loggers, as a
    record logged here would be handled (``logging.getLogger(record.name).handle``)."""

    def __init__(self, records: Any) -> None:
        self.records = records
        self.finish = threading.Event()
        self.ended: set[int] = set()  # jobs whose every record was handed over
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._forward, name="hrad-worker-logs", daemon=True)
        self.thread.start()

    def wait_for(self, index: int, timeout: float = 10.0) -> None:
        """Until job ``index``'s records were all handed over (its end marker arrived), at most
        ``timeout`` seconds: what it logged last shows before the pool counts it done."""
        with self.changed:
            self.changed.wait_for(lambda: index in self.ended or not self.thread.is_alive(), timeout)

    def _forward(self) -> None:
        while True:
            try:
                record = self.records.get(timeout=0.05)
            except queue.Empty:
                if self.finish.is_set():
                    return
                continue
            except (EOFError, OSError):  # the queue was closed under us
                return
            except Exception:  # a record that does not unpickle here is dropped, the rest go on
                logging.getLogger(__name__).debug("a worker's log record did not arrive", exc_info=True)
                continue
            if isinstance(record, tuple):  # (_JOB_END, index)
                with self.changed:
                    self.ended.add(record[1])
                    self.changed.notify_all()
                continue
            _handle(record)

    def close(self, drain: bool) -> None:
        """Stop: after the queued records (``drain``: the workers have exited, so all of theirs
        are queued) or at once (terminated workers may have left a record half-written, which
        the thread may never finish reading; it is a daemon, so nothing waits for it)."""
        self.finish.set()
        self.thread.join(10.0 if drain else 1.0)
        if not self.thread.is_alive():
            self.records.close()
            self.records.join_thread()


class ProcessPoolRunner:
    """Runs jobs in local ``spawn`` worker processes (safe with CUDA and threads).

    ``threads_per_worker`` defaults to the CPU count divided among the workers, so the pool
    never oversubscribes the machine. The workers log at this process's logger levels and their
    records reach this process's loggers, marked with their job (:func:`worker_job`), each job's
    all before ``progress`` counts it done.
    """

    device: str | None = None

    def __init__(self, workers: int, threads_per_worker: int | None = None) -> None:
        if workers < 1:
            raise ConfigError(f"process pool needs at least 1 worker, got {workers}")
        self.workers = workers
        self.threads_per_worker = threads_per_worker

    def map(
        self, fn: Callable[[JobT], ResultT], jobs: Sequence[JobT], progress: JobProgress | None = None
    ) -> list[ResultT]:
        processes = min(self.workers, len(jobs))
        if processes <= 1:
            return SerialRunner().map(fn, jobs, progress)
        threads = self.threads_per_worker or max(1, (os.cpu_count() or 1) // processes)
        context = multiprocessing.get_context("spawn")
        results: list[Any] = [None] * len(jobs)
        records = context.Queue()
        setup = (threads, records, _logging_levels(), logging.root.manager.disable)
        pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker, initargs=setup)
        forwarder = _RecordForwarder(records)
        try:
            count = len(jobs)
            futures = {
                pool.submit(_run_pooled, fn, job, index + 1, count): index for index, job in enumerate(jobs)
            }
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                forwarder.wait_for(futures[future] + 1)  # the job's last lines before the pool's count
                if progress is not None:
                    progress(done, len(jobs))
        except BaseException:
            # a job failed, or Ctrl-C / SIGTERM reached this process alone (``kill PID``, a
            # scheduler): stop the other jobs now. Leaving the executor's block would wait for
            # every running job to finish, minutes of training for a HiAD pool.
            _terminate_workers(pool)
            forwarder.close(drain=False)
            raise
        pool.shutdown()
        forwarder.close(drain=True)
        return results


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel ``pool``'s queued jobs and terminate its running workers, without waiting."""
    pool.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


_ACTIVE_RUNNER: contextvars.ContextVar[JobRunner | None] = contextvars.ContextVar(
    "hrad_job_runner", default=None
)


def active_runner() -> JobRunner | None:
    """The runner made active by :func:`use_runner`, if any."""
    return _ACTIVE_RUNNER.get()


@contextlib.contextmanager
def use_runner(runner: JobRunner) -> Iterator[JobRunner]:
    """Make ``runner`` run the jobs of every fit inside the block (overrides ``workers``)."""
    token = _ACTIVE_RUNNER.set(runner)
    try:
        yield runner
    finally:
        _ACTIVE_RUNNER.reset(token)


def job_runner(workers: int, threads_per_worker: int | None = None) -> JobRunner:
    """The active runner if there is one, else serial (``workers`` <= 1) or a local process pool."""
    runner = active_runner()
    if runner is not None:
        return runner
    if workers <= 1:
        return SerialRunner()
    return ProcessPoolRunner(workers, threads_per_worker)


# ------------------------------------------------------------------------------------ Ray plumbing
def require_ray() -> ModuleType:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("distributed work needs Ray: pip install 'hrad[distributed]'") from None
    return ray


@contextlib.contextmanager
def ray_session(
    address: str | None = None, runtime_env: dict[str, Any] | None = None
) -> Iterator[ModuleType]:
    """Ray connected for the block: an already initialised Ray is reused and left running;
    otherwise ``address=None`` starts a local Ray (shut down afterwards) and ``"auto"`` or
    ``"ray://host:port"`` joins a cluster."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        options["include_dashboard"] = False
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or os.environ.get("RAY_ADDRESS") or "local"
        raise ConfigError(f"ray cluster {where}: cannot start or connect ({_one_line(error)})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def _check_gpus(ray: ModuleType, gpus_per_worker: float) -> None:
    if gpus_per_worker > 0 and ray.cluster_resources().get("GPU", 0) < gpus_per_worker:
        raise ConfigError(
            f"{gpus_per_worker} GPU(s) per worker requested but the Ray cluster has "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs (use 0 for CPU workers)"
        )


_SETUP_DONE: set[str] = set()


def _run_setup(token: str, setup: Setup | None) -> None:
    """Run ``setup`` once per process (workers are reused across jobs)."""
    if setup is None or token in _SETUP_DONE:
        return
    if isinstance(setup, str):
        module_name, _, function_name = setup.partition(":")
        function = getattr(importlib.import_module(module_name), function_name or "setup")
        function()
    else:
        setup()
    _SETUP_DONE.add(token)


def _task_error(ray: ModuleType, error: BaseException) -> BaseException:
    """The job's own exception out of Ray's wrapper, so HradErrors keep their one line."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return cause
    return error


class _RayForwardingHandler(_ForwardingHandler):
    """A Ray task's records onto the driver's queue actor; one put after the driver stopped
    listening (a task left running after another failed) is dropped without a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _run_job(
    fn: Callable[[Any], Any],
    job: Any,
    threads: int,
    token: str,
    setup: Setup | None,
    label: tuple[int, int] | None = None,
    records: Any = None,
    levels: Mapping[str, int] | None = None,
) -> Any:
    """A Ray task: ``fn(job)``, its log records (at the driver's ``levels``) onto ``records``,
    marked as job ``label`` = (index, total)."""
    _run_setup(token, setup)
    _set_threads(threads)
    if label is None or records is None:
        return fn(job)
    _apply_levels(levels or {})
    root, handler = logging.getLogger(), _RayForwardingHandler(records)
    root.addHandler(handler)
    try:
        return _run_labelled(fn, job, *label)
    finally:
        root.removeHandler(handler)


def _hand_over(records: Any) -> None:
    """The records Ray tasks have put on the queue actor ``records``, to this process's loggers
    (progress shown is not worth failing a fit over: a queue that fails is skipped)."""
    try:
        count = records.qsize()
        arrived = records.get_nowait_batch(count) if count else []
    except Exception:
        logging.getLogger(__name__).debug("the Ray tasks' log records did not arrive", exc_info=True)
        return
    for record in arrived:
        _handle(record)


class RayExecutor:
    """A :class:`JobRunner` over Ray tasks: local CPUs/GPUs or a cluster (``address``).

    Every job is one task with ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs; Ray schedules
    them as resources free up. With GPUs each task sees its own GPU as ``"cuda"``, so
    :attr:`device` tells the strategy to build jobs for ``"cuda"`` rather than round-robin
    ``cuda:i``. Use it as a context manager to keep Ray up across several fits::

        with RayExecutor(gpus_per_job=1) as runner, use_runner(runner):
            model.fit(images)
    """

    def __init__(
        self,
        address: str | None = None,
        cpus_per_job: float = 1.0,
        gpus_per_job: float = 0.0,
        setup: Setup | None = None,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        if cpus_per_job <= 0 or gpus_per_job < 0:
            raise ConfigError(f"ray jobs need cpus > 0 and gpus >= 0, got {cpus_per_job} and {gpus_per_job}")
        self.address, self.runtime_env, self.setup = address, runtime_env, setup
        self.cpus_per_job, self.gpus_per_job = cpus_per_job, gpus_per_job
        self.device: str | None = "cuda" if gpus_per_job > 0 else "cpu"
        self._token = uuid.uuid4().hex
        self._session: contextlib.ExitStack | None = None

    def __enter__(self) -> RayExecutor:
        self._connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> ModuleType:
        if self._session is None:
            stack = contextlib.ExitStack()
            ray = stack.enter_context(ray_session(self.address, self.runtime_env))
            self._session = stack
            _check_gpus(ray, self.gpus_per_job)
            return ray
        return require_ray()

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def map(
        self, fn: Callable[[JobT], ResultT], jobs: Sequence[JobT], progress: JobProgress | None = None
    ) -> list[ResultT]:
        if not jobs:
            return []
        ray = self._connect()
        from ray.util.queue import Queue

        task = ray.remote(_run_job).options(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job)
        shared = (max(1, int(self.cpus_per_job)), self._token, self.setup)
        fn_ref = ray.put(fn)
        # the tasks' log records: a task puts each one before it returns, so they are all here
        # once its result is (handed over before the job counts as done)
        records = Queue(actor_options={"num_cpus": 0})
        logged = (records, _logging_levels())
        count = len(jobs)
        pending = {
            task.remote(fn_ref, job, *shared, (index + 1, count), *logged): index
            for index, job in enumerate(jobs)
        }
        results: list[Any] = [None] * len(jobs)
        done = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                _hand_over(records)
                for ref in ready:
                    index = pending.pop(ref)
                    try:
                        results[index] = ray.get(ref)
                    except Exception as error:
                        # the other tasks are left to finish unseen, not cancelled: in Ray 2.60 a
                        # cancel that races a task's completion aborts the driver process (a
                        # RAY_CHECK, "Tried to complete task that was not pending"; it killed a
                        # test run here; ray-project/ray#54846), and a crash must not replace the
                        # job's own error. A session this executor started ends with it.
                        raise _task_error(ray, error) from None
                    done += 1
                    if progress is not None:
                        progress(done, len(jobs))
        finally:
            ray.kill(records.actor)
        return results
