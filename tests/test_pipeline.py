"""hrad.pipeline.overlapped: order, per-item errors, bounded read-ahead, real overlap."""

from __future__ import annotations

import threading

import pytest

from hrad.pipeline import overlapped


def test_results_in_input_order_with_per_item_errors() -> None:
    def load(item: int) -> int:
        if item == 2:
            raise OSError("cannot read 2")
        return item * 10

    def compute(item: int, loaded: int) -> int:
        if item == 4:
            raise ValueError("bad 4")
        return loaded + 1

    def finish(item: int, loaded: int, computed: int) -> str:
        if item == 5:
            raise RuntimeError("disk full")
        return f"{item}:{computed}"

    for prefetch, writers in ((0, 0), (2, 1), (3, 2)):
        out = list(overlapped(list(range(7)), load, compute, finish, prefetch=prefetch, writers=writers))
        assert [item for item, _ in out] == list(range(7))
        values = [value for _, value in out]
        assert values[0] == "0:1" and values[1] == "1:11" and values[3] == "3:31" and values[6] == "6:61"
        assert isinstance(values[2], OSError) and isinstance(values[4], ValueError) and isinstance(values[5], RuntimeError)


def test_reading_ahead_is_bounded_and_overlaps_compute() -> None:
    lock = threading.Lock()
    loaded_not_computed = 0
    peak = 0
    next_loaded = [threading.Event() for _ in range(6)]

    def load(item: int) -> int:
        nonlocal loaded_not_computed, peak
        with lock:
            loaded_not_computed += 1
            peak = max(peak, loaded_not_computed)
        next_loaded[item].set()
        return item

    def compute(item: int, loaded: int) -> int:
        nonlocal loaded_not_computed
        if item + 1 < 6:  # the next image is read while this one is computed
            assert next_loaded[item + 1].wait(timeout=10)
        with lock:
            loaded_not_computed -= 1
        return loaded

    results = list(overlapped(list(range(6)), load, compute, lambda i, loaded, c: c, prefetch=2))
    assert [value for _, value in results] == list(range(6))
    assert peak <= 2


def test_keyboard_interrupt_is_not_swallowed() -> None:
    def compute(item: int, loaded: int) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(overlapped([1, 2], lambda i: i, compute, lambda i, loaded, c: c))


def test_interrupt_hands_back_finished_items_first_and_context_reaches_threads() -> None:
    import contextvars

    variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable", default="unset")
    variable.set("caller")
    seen: list[str] = []

    def load(item: int) -> int:
        seen.append(variable.get())
        return item

    def compute(item: int, loaded: int) -> int:
        if item == 1:
            raise KeyboardInterrupt
        return loaded

    handed_back = []
    with pytest.raises(KeyboardInterrupt):
        for item, value in overlapped([0, 1, 2], load, compute, lambda i, loaded, c: (variable.get(), c)):
            handed_back.append((item, value))
    assert handed_back == [(0, ("caller", 0))]
    assert seen and set(seen) == {"caller"}


def test_batches_keep_order_and_isolate_the_failing_item() -> None:
    """Computed in batches; a load error leaves its batch, a compute error is pinned on its item
    (the batch is recomputed item by item), every other item still gets its result."""
    from hrad.pipeline import overlapped_batches

    calls: list[list[int]] = []

    def load(item: int) -> int:
        if item == 3:
            raise OSError("cannot read 3")
        return item * 10

    def compute(items: list[int], loaded: list[int]) -> list[int]:
        calls.append(list(items))
        if 6 in items:
            raise ValueError("bad 6")
        return [value + 1 for value in loaded]

    for prefetch, writers in ((0, 0), (None, 1), (1, 2)):
        calls.clear()
        out = list(overlapped_batches(list(range(10)), load, compute, lambda i, loaded, c: c, batch=4, prefetch=prefetch, writers=writers))
        assert [item for item, _ in out] == list(range(10))
        values = [value for _, value in out]
        assert isinstance(values[3], OSError) and isinstance(values[6], ValueError)
        assert [v for i, v in enumerate(values) if i not in (3, 6)] == [i * 10 + 1 for i in range(10) if i not in (3, 6)]
        # batch one without the unreadable 3; batch two failed on 6 and was redone item by item
        assert calls == [[0, 1, 2], [4, 5, 6, 7], [4], [5], [6], [7], [8, 9]]


def test_batches_read_the_next_batch_while_computing() -> None:
    from hrad.pipeline import overlapped_batches

    loaded = [threading.Event() for _ in range(8)]

    def load(item: int) -> int:
        loaded[item].set()
        return item

    def compute(items: list[int], values: list[int]) -> list[int]:
        following = range(items[-1] + 1, min(8, items[-1] + 4))
        for item in following:  # the next batch is decoded while this one computes
            assert loaded[item].wait(timeout=10)
        return values

    out = list(overlapped_batches(list(range(8)), load, compute, lambda i, value, c: c, batch=3))
    assert [value for _, value in out] == list(range(8))
