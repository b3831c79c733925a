"""16-bit scaling to the full range (:func:`hrad.data.bit_depth.to_full_range`): the lookup table
applied by fancy indexing (``table[band]``, a temporary array per band, then a copy into the
result) against ``np.take(table, band, out=...)`` (written straight into the result), on an 8K
line-scan strip. Same table, same bands; both results are checked identical first. The two run
interleaved, one call each per round, so a machine shared with other work slows both alike.

    PYTHONPATH=. python benchmarks/full_range_speed.py [--rounds 21] [--height 1024 --width 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from hrad.data import bit_depth


def indexed(array: np.ndarray, bits: int) -> np.ndarray:
    """The rule before np.take: ``out[band] = table[array[band]]``."""
    table = bit_depth.full_range_table(bits)
    out = np.empty_like(array)
    rows = max(1, bit_depth._BAND_VALUES // max(1, array[0].size))
    for top in range(0, len(array), rows):
        out[top : top + rows] = table[array[top : top + rows]]
    return out


def taken(array: np.ndarray, bits: int) -> np.ndarray:
    """``np.take(table, array[band], out=out[band])``: no temporary per band."""
    table = bit_depth.full_range_table(bits)
    out = np.empty_like(array)
    rows = max(1, bit_depth._BAND_VALUES // max(1, array[0].size))
    for top in range(0, len(array), rows):
        np.take(table, array[top : top + rows], out=out[top : top + rows])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--bits", type=int, default=12)
    args = parser.parse_args()
    image = np.random.default_rng(0).integers(0, 2**args.bits, (args.height, args.width, 3), dtype=np.uint16)
    current = bit_depth.to_full_range(image, args.bits)
    assert np.array_equal(indexed(image, args.bits), current) and np.array_equal(taken(image, args.bits), current)
    ways: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
        "table[band]": indexed, "np.take(out=)": taken, "to_full_range (as in hrad now)": bit_depth.to_full_range,
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            way(image, args.bits)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["table[band]"])
    print(f"{args.height}x{args.width}x3 uint16, {args.bits} bits, {args.rounds} interleaved rounds")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32s} median {median * 1e3:7.1f} ms  best {min(values) * 1e3:7.1f} ms  ratio to table[band] {median / base:.2f}")


if __name__ == "__main__":
    main()
