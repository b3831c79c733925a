"""How ``hrad serve`` stops when it cannot wait: a second Ctrl-C while it shuts down (uvicorn's
"force quit"), or a graceful shutdown that outlasts ``--graceful-timeout``.

uvicorn's own force quit cancelled the requests in flight, printed asyncio's tracebacks of them on
the terminal and in the log file, then still waited for the prediction's thread (nothing can
interrupt it: asyncio's shutdown and Python's exit both join it) and exited 0. Here the process
says in one line how many requests it leaves unanswered and ends at once (``os._exit``) with 128
+ the stop signal's number: 130 Ctrl-C, 143 SIGTERM, leaving none of their upload folders behind.
With ``--workers N`` each worker ends so silently, adding its count to a number the parent shares
with it, and the parent says the line.
Imported only by ``hrad serve`` (uvicorn is an optional dependency).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import multiprocessing
import os
import signal
import sys
import threading
from socket import AF_INET6, AI_PASSIVE, SO_REUSEADDR, SOCK_STREAM, SOL_SOCKET, getaddrinfo, socket
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from hrad.cli.progress import console
from hrad.errors import ConfigError


def check_address(host: str, port: int) -> None:
    """Refuse a ``--host`` this machine cannot listen on, or a ``--port`` there it cannot have,
    before the model loads: uvicorn found the host's only at startup and said "[Errno -2] Name or
    service not known", not which value, exit 3; a port in use only after the model loaded and the
    app started, as "hrad: error: [Errno 98] error while attempting to bind on address ...",
    exit 3 (1 with ``--workers``). The host is resolved and a socket bound to it on a free port,
    then on ``port`` (0: any free one, nothing to check) as uvicorn binds it (``SO_REUSEADDR``,
    so a port left in TIME_WAIT by a server just stopped is not taken for one in use)."""
    try:
        family, kind, proto, _, address = getaddrinfo(host or None, 0, type=SOCK_STREAM, flags=AI_PASSIVE)[0]
        with socket(family, kind, proto) as probe:
            probe.bind(address)
    except (OSError, UnicodeError) as error:
        raise ConfigError(f"--host {host}: cannot listen there ({_reason(error)})") from None
    if port == 0:
        return
    where = f"[{address[0]}]:{port}" if family == AF_INET6 else f"{address[0]}:{port}"
    try:
        with socket(family, kind, proto) as probe:
            probe.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
            probe.bind((address[0], port, *address[2:]))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port}: {where} is in use (another server listens there); stop it or choose another --port") from None
        raise ConfigError(f"--port {port}: cannot listen on {where} ({_reason(error)})") from None


def _reason(error: OSError | UnicodeError) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def stopped_unfinished(stop: signal.Signals, unfinished: int, how: str = "{}", within: str = "") -> None:
    """Say that the server stopped on ``stop`` without its ``unfinished`` requests in flight (one
    line, console and log file; ``how``: the stop as said, ``{}`` its signal's name; ``within``:
    said after the count), end the log with the exit status and exit 128 + ``stop`` at once."""
    from hrad.cli import log_file

    status = 128 + stop.value
    requests = f"{unfinished} in-flight request{'' if unfinished == 1 else 's'}"
    console.print(f"hrad serve stopped on {how.format(stop.name)} without finishing {requests}{within}")
    log = log_file.current()
    if log is not None:
        log.close(status)
    _exit_now(status)


def _exit_now(status: int) -> None:
    """``os._exit(status)`` with stdout and stderr flushed, after removing the upload folders of
    the requests it abandons (os._exit skips their own removal: a service restarted often would
    fill its temp directory with ``hrad-upload-*`` folders). hrad.service is not imported here:
    a worker unpickles this module before it answers uvicorn's health check, and a process that
    has not imported the service holds no uploads."""
    service = sys.modules.get("hrad.service")
    if service is not None:
        service.remove_live_upload_folders()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def graceful_timeout_said(seconds: float) -> str:
    """What follows the count when ``--graceful-timeout`` ended the shutdown."""
    return f" within the {seconds:g} s graceful timeout"


class StoppingServer(uvicorn.Server):
    """uvicorn's server, but a second SIGINT while it shuts down, or a shutdown still going
    ``graceful_timeout`` seconds after the first stop signal, ends the process at once: saying so
    in one line (:func:`stopped_unfinished`), or, in a worker (``unfinished`` given: the counts
    its parent reads, one per worker slot), silently after adding its requests in flight to
    ``unfinished[slot]``."""

    def __init__(self, config: uvicorn.Config, graceful_timeout: float | None, unfinished: Any = None, slot: int = 0) -> None:
        super().__init__(config)
        self.graceful_timeout, self.unfinished, self.slot = graceful_timeout, unfinished, slot
        self.timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.stop_now(signal.SIGINT, "a second {}")
        if not self.should_exit and self.graceful_timeout is not None and self.timer is None:
            self.timer = threading.Timer(self.graceful_timeout, self.stop_now, [signal.Signals(sig), "{}", True])
            self.timer.daemon = True
            self.timer.start()
        super().handle_exit(sig, frame)

    def stop_now(self, stop: signal.Signals, how: str, timed_out: bool = False) -> None:
        """End the process now, its requests in flight unanswered."""
        count = len(self.server_state.tasks)
        if self.unfinished is None:
            within = graceful_timeout_said(self.graceful_timeout) if timed_out and self.graceful_timeout is not None else ""
            stopped_unfinished(stop, count, how, within)
        self.unfinished[self.slot] += count  # this worker's own slot: no lock to share
        _exit_now(128 + stop.value)


class WorkerProcess(Process):
    """uvicorn's worker process, serving with :class:`StoppingServer`; ``unfinished[slot]``
    (shared with the parent) counts the requests the worker in that slot stopped without."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket], graceful_timeout: float | None, unfinished: Any, slot: int) -> None:
        self.graceful_timeout, self.unfinished, self.slot = graceful_timeout, unfinished, slot
        self.parent_pid = os.getpid()  # the supervisor, recorded before the spawn
        super().__init__(config, sockets)

    def target(self, sockets: list[socket] | None = None) -> None:
        """uvicorn's, in the worker, after asking Linux for a SIGTERM when the supervisor dies: a
        supervisor SIGKILLed (the OOM killer, ``kill -9``, a service manager's final kill) left its
        workers serving on the port, an orphaned server that stopping the service did not stop.
        The SIGTERM stops the worker like any (graceful, then ``--graceful-timeout``'s forced
        stop); a supervisor that died before the request ends the worker before it serves."""
        if sys.platform.startswith("linux"):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM.value, 0, 0, 0)
            if os.getppid() != self.parent_pid:
                return
        super().target(sockets)

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = StoppingServer(self.config, self.graceful_timeout, self.unfinished, self.slot)
        return self._server


class Supervisor(Multiprocess):
    """uvicorn's worker supervisor (``uvicorn.run(workers=N)``'s) with :class:`WorkerProcess`
    workers, that remembers the SIGTERM or SIGINT that stopped it (``stopped_by``) in place of
    logging uvicorn's own line for it, and after its workers ended, ends as a stop that could not
    wait (:meth:`stop_unfinished`)."""

    stopped_by: str | None = None

    def __init__(self, config: uvicorn.Config, sockets: list[socket], graceful_timeout: float | None) -> None:
        super().__init__(config, sockets)
        self.graceful_timeout = graceful_timeout
        # one count per worker slot, lock-free: a Value's lock is a named semaphore that the
        # parent's os._exit leaves for the resource tracker to warn about ("leaked semaphore")
        self.unfinished = multiprocessing.get_context("spawn").RawArray("i", self.processes_num)
        self.interrupts = 0

    def new_process(self, slot: int) -> WorkerProcess:
        return WorkerProcess(self.config, self.sockets, self.graceful_timeout, self.unfinished, slot)

    def init_processes(self) -> None:
        for slot in range(self.processes_num):
            process = self.new_process(slot)
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self) -> None:
        """uvicorn's, with :meth:`new_process` for a worker that died (a hung one is killed), but
        none restarted while a stop signal waits in the queue: a worker that ended on a second
        Ctrl-C before this process handled it was taken for dead and replaced, its status lost."""
        if self.should_exit.is_set():
            return
        from uvicorn.config import STARTUP_FAILURE
        from uvicorn.supervisors.multiprocess import logger

        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            if any(sig in (signal.SIGINT, signal.SIGTERM) for sig in self.signal_queue):
                return  # a stop came meanwhile (a worker may have ended on it): stop, not restart
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                logger.error(f"Child process [{process.pid}] failed to start, stopping the parent process.")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info(f"Child process [{process.pid}] died")
            self.processes[index] = self.new_process(index)
            self.processes[index].start()

    def handle_ttin(self) -> None:
        """SIGTTIN: uvicorn's one more worker, but a :class:`WorkerProcess` (uvicorn's own plain
        worker would have no forced stop and outlive a killed server). Its count shares a slot
        with an earlier worker's, modulo the slots made at start: two adding at once could lose
        one from the stop line's count, nothing else."""
        from uvicorn.supervisors.multiprocess import logger

        logger.info("Received SIGTTIN, increasing the number of processes.")
        self.processes_num += 1
        process = self.new_process(len(self.processes) % len(self.unfinished))
        process.start()
        self.processes.append(process)

    def restart_all(self) -> None:
        """SIGHUP: uvicorn's replacement of each worker by a ready new one, with :meth:`new_process`."""
        from uvicorn.supervisors.multiprocess import logger

        for index, old_process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new_process = self.new_process(index)
            new_process.start()
            if not new_process.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new_process.kill()
                new_process.join()
                if not self.should_exit.is_set():
                    logger.error(f"New child process [{new_process.pid}] was not ready in time; keeping worker [{old_process.pid}] and aborting the restart.")
                return
            old_process.terminate()
            old_process.join()
            self.processes[index] = new_process

    def handle_term(self) -> None:
        self.stopped_by = self.stopped_by or "SIGTERM"
        self.should_exit.set()

    def handle_int(self) -> None:
        self.stopped_by = self.stopped_by or "SIGINT"
        self.interrupts += 1
        self.should_exit.set()

    def stop_unfinished(self) -> None:
        """When a worker ended as a stop that could not wait (128 + a signal's number): say so in
        one line for them all and exit likewise; else return."""
        forced = {process.exitcode for process in self.processes} & {128 + signal.SIGINT, 128 + signal.SIGTERM}
        if not forced or self.stopped_by is None:
            return
        interrupts = self.interrupts + self.signal_queue.count(signal.SIGINT)  # those after the first are left queued
        if interrupts > 1:
            stopped_unfinished(signal.SIGINT, sum(self.unfinished), "a second {}")
        assert self.graceful_timeout is not None
        stopped_unfinished(signal.Signals[self.stopped_by], sum(self.unfinished), within=graceful_timeout_said(self.graceful_timeout))
