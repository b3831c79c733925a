"""Overlap reading and writing with compute: a bounded three-stage pipeline of threads.

``hrad predict`` spends part of each image decoding the file and encoding the outputs (16-bit
map PNG, mask, overlay); both run in C code that releases the GIL (Pillow, OpenCV, tifffile,
zlib). :func:`overlapped` reads the next images in loader threads and writes finished ones in
writer threads while the calling thread computes (the model: torch, faiss, or the GPU stays on
one thread). :func:`overlapped_batches` hands the model several images at once
(``AnomalyModel.predict_batch``: their tiles share backbone batches) while the next batch is
decoded. Results come back in input order, each as a value or the exception its stage raised,
so one bad file never stops the others. Memory is bounded: at most ``prefetch`` images read
ahead and ``writers + batch`` images waiting to be written.
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

    def compute_one(batch: list[Item], loaded: list[Loaded]) -> list[Computed]:
        return [compute(batch[0], loaded[0])]

    return overlapped_batches(items, load, compute_one, finish, batch=1, prefetch=prefetch, loaders=loaders, writers=writers)


def overlapped_batches(
    items: Sequence[Item],
    load: Callable[[Item], Loaded],
    compute: Callable[[list[Item], list[Loaded]], Sequence[Computed]],
    finish: Callable[[Item, Loaded, Computed], Result],
    *,
    batch: int = 1,
    prefetch: int | None = None,
    loaders: int = 1,
    writers: int = 1,
) -> Iterator[tuple[Item, Result | Exception]]:
    """:func:`overlapped` with ``compute`` called on up to ``batch`` loaded items at once
    (``Strategy.predict_batch``), returning one result per item in order.

    Items whose ``load`` failed are left out of their batch. When a batch's ``compute`` raises an
    :class:`Exception`, each of its items is computed alone, so the error lands on the item that
    caused it and the others still succeed. At most ``prefetch`` items (default ``2 * batch``:
    the next batch is decoded while this one computes) are loaded and not yet computed, and at
    most ``writers + batch`` computed items wait to be written.
    """
    batch = max(1, batch)
    ahead = 2 * batch if prefetch is None else prefetch
    load_pool = ThreadPoolExecutor(max_workers=max(1, loaders), thread_name_prefix="hrad-load") if ahead > 0 else None
    write_pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="hrad-write") if writers > 0 else None
    loading: deque[Future[Loaded]] = deque()
    writing: deque[tuple[Item, Future[Result]]] = deque()
    next_load = 0

    def fill(held: int = 0) -> None:
        """Read ahead until ``prefetch`` items are loading or loaded and not computed (``held``
        of them already taken for the batch being gathered), and always the next one needed."""
        nonlocal next_load
        while load_pool is not None and next_load < len(items) and (len(loading) + held < ahead or not loading):
            # each task runs in a copy of the caller's context: context variables (hrad --max-pixels) hold
            loading.append(load_pool.submit(contextvars.copy_context().run, load, items[next_load]))
            next_load += 1

    def settled(item: Item, future: Future[Result]) -> tuple[Item, Result | Exception]:
        try:
            return item, future.result()
        except Exception as error:  # noqa: BLE001 - reported per item
            return item, error

    def computed_or_errors(group: list[Item], loaded: list[Loaded]) -> list[Computed | Exception]:
        try:
            values = list(compute(group, loaded))
            if len(values) != len(group):
                raise RuntimeError(f"batched compute returned {len(values)} results for {len(group)} items")
            return list(values)
        except Exception as error:  # noqa: BLE001 - reported per item
            if len(group) == 1:
                return [error]
        outcomes: list[Computed | Exception] = []
        for item, value in zip(group, loaded, strict=True):  # find the item that failed
            outcomes.extend(computed_or_errors([item], [value]))
        return outcomes

    def write(item: Item, loaded: Loaded, value: Computed) -> None:
        if write_pool is not None:
            writing.append((item, write_pool.submit(contextvars.copy_context().run, finish, item, loaded, value)))
            return
        try:
            result: Result | Exception = finish(item, loaded, value)
        except Exception as error:  # noqa: BLE001 - reported per item
            result = error
        writing.append((item, _done_future(result)))

    try:
        for start in range(0, len(items), batch):
            group = list(items[start : start + batch])
            outcomes: list[tuple[Loaded, Computed] | Exception] = []
            try:
                fill()
                loads: list[Loaded | Exception] = []
                for item in group:
                    try:
                        loads.append(loading.popleft().result() if load_pool is not None else load(item))
                    except Exception as error:  # noqa: BLE001 - reported per item
                        loads.append(error)
                    fill(len(loads))  # keep reading ahead while this batch's images arrive
                ready = [(item, value) for item, value in zip(group, loads, strict=True) if not isinstance(value, Exception)]
                results = iter(computed_or_errors([item for item, _ in ready], [value for _, value in ready]) if ready else [])
                for value in loads:
                    if isinstance(value, Exception):
                        outcomes.append(value)
                    else:
                        result = next(results)
                        outcomes.append(result if isinstance(result, Exception) else (value, result))
            except BaseException:  # interrupted: hand back the images already computed, then stop
                while writing:
                    yield settled(*writing.popleft())
                raise
            for item, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    writing.append((item, _done_future(outcome)))
                else:
                    write(item, *outcome)
            fill()
            # hand back what is finished, in order; block only when too many images wait
            while writing and (writing[0][1].done() or len(writing) > writers + batch):
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
