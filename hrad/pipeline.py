"""Overlap reading and writing with compute: a bounded three-stage pipeline of threads.

``hrad predict`` spends part of each image decoding the file and encoding the outputs (16-bit
map PNG, mask, overlay); both run in C code that releases the GIL (Pillow, OpenCV, tifffile,
zlib). :func:`overlapped` reads the next images in loader threads and writes finished ones in
writer threads while the calling thread computes (the model: torch, faiss, or the GPU stays on
one thread). Results come back in input order, each as a value or the exception its stage
raised, so one bad file never stops the others. Memory is bounded: at most ``prefetch`` images
read ahead and ``writers + 1`` images waiting to be written.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")
Computed = TypeVar("Computed")
Result = TypeVar("Result")


def overlapped(
    items: Sequence[Item],
    load: Callable[[Item], Loaded],
    compute: Callable[[Item, Loaded], Computed],
    finish: Callable[[Item, Loaded, Computed], Result],
    *,
    prefetch: int = 2,
    loaders: int = 1,
    writers: int = 1,
) -> Iterator[tuple[Item, Result | Exception]]:
    """``finish(item, loaded, compute(item, loaded))`` for each item, in order, stages overlapped.

    ``load`` runs in ``loaders`` threads, ``finish`` in ``writers`` threads, ``compute`` on the
    calling thread. Yields ``(item, result)``, or ``(item, exception)`` when any stage of that
    item raised an :class:`Exception` (later stages are skipped for it). ``prefetch=0`` and
    ``writers=0`` run that stage on the calling thread (the serial order of old).
    """
    load_pool = ThreadPoolExecutor(max_workers=max(1, loaders), thread_name_prefix="hrad-load") if prefetch > 0 else None
    write_pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="hrad-write") if writers > 0 else None
    loading: deque[Future[Loaded]] = deque()
    writing: deque[tuple[Item, Future[Result]]] = deque()
    next_load = 0

    def fill() -> None:
        nonlocal next_load
        while load_pool is not None and next_load < len(items) and len(loading) < prefetch:
            # each task runs in a copy of the caller's context: context variables (hrad --max-pixels) hold
            loading.append(load_pool.submit(contextvars.copy_context().run, load, items[next_load]))
            next_load += 1

    def settled(item: Item, future: Future[Result]) -> tuple[Item, Result | Exception]:
        try:
            return item, future.result()
        except Exception as error:  # noqa: BLE001 - reported per item
            return item, error

    try:
        for item in items:
            fill()
            try:
                loaded = loading.popleft().result() if load_pool is not None else load(item)
                computed = compute(item, loaded)
            except Exception as error:  # noqa: BLE001 - reported per item
                writing.append((item, _done_future(error)))
            except BaseException:  # interrupted: hand back the images already computed, then stop
                while writing:
                    yield settled(*writing.popleft())
                raise
            else:
                if write_pool is not None:
                    task = write_pool.submit(contextvars.copy_context().run, finish, item, loaded, computed)
                    writing.append((item, task))
                else:
                    try:
                        result: Result | Exception = finish(item, loaded, computed)
                    except Exception as error:  # noqa: BLE001 - reported per item
                        result = error
                    writing.append((item, _done_future(result)))
            fill()
            # hand back what is finished, in order; block only when too many images wait
            while writing and (writing[0][1].done() or len(writing) > writers + 1):
                yield settled(*writing.popleft())
        while writing:
            yield settled(*writing.popleft())
    finally:
        for future in loading:
            future.cancel()
        if load_pool is not None:
            load_pool.shutdown(wait=True, cancel_futures=True)
        if write_pool is not None:
            write_pool.shutdown(wait=True)


def _done_future(value: Any) -> Future[Any]:
    """A future already holding ``value`` (or raising it, for an exception)."""
    future: Future[Any] = Future()
    if isinstance(value, Exception):
        future.set_exception(value)
    else:
        future.set_result(value)
    return future
