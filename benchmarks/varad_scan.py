"""CPU time of VarAD's chunked selective scan vs the plain sequential loop, in the same run.

Sizes are VarAD's real ones: one ViT-S level (d_model 384 -> d_inner 768, d_state 16), a
36 x 36 grid (518 px) and a 73 x 73 grid (1022 px), four scan directions batched. Forward
only (inference), then forward + backward (training) on the smaller size. The ratio is
sequential time / chunked time measured back to back in this process; results go to
benchmarks/results/varad_scan.{json,md} with machine, date and command.

    python benchmarks/varad_scan.py                       # default sizes
    python benchmarks/varad_scan.py --lengths 1296 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hrad.detectors.mamba import MAX_CHUNK, selective_scan_chunked, selective_scan_sequential
from hrad.evaluation import environment

RESULTS = Path(__file__).resolve().parent / "results"


def scan_inputs(batch: int, channels: int, length: int, states: int, grad: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, length, generator=generator)
    dt = F.softplus(torch.randn(batch, channels, length, generator=generator) - 3)  # Mamba's init range
    A = -torch.arange(1, states + 1, dtype=torch.float32).repeat(channels, 1)
    B = torch.randn(batch, states, length, generator=generator)
    C = torch.randn(batch, states, length, generator=generator)
    D = torch.ones(channels)
    return [tensor.requires_grad_(grad) for tensor in (x, dt, A, B, C, D)]


def best_time(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(length: int, args: argparse.Namespace, backward: bool) -> dict[str, Any]:
    inputs = scan_inputs(args.batch, args.d_inner, length, args.d_state, grad=backward)

    def call(scan: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            if backward:
                scan(*inputs).sum().backward()
            else:
                with torch.no_grad():
                    scan(*inputs)

        return run

    chunked = best_time(call(partial(selective_scan_chunked, chunk=args.chunk)), args.repeats)
    recomputed = (
        best_time(call(partial(selective_scan_chunked, chunk=args.chunk, recompute=True)), args.repeats)
        if backward
        else None
    )
    sequential = best_time(call(selective_scan_sequential), args.repeats)
    with torch.no_grad():
        error = (
            (partial(selective_scan_chunked, chunk=args.chunk)(*inputs) - selective_scan_sequential(*inputs))
            .abs()
            .max()
        )
    side = round(length**0.5)
    return {
        "tokens": f"{side}x{side}" if side * side == length else str(length),
        "length": length,
        "pass": "forward+backward" if backward else "forward",
        "batch": args.batch,
        "d_inner": args.d_inner,
        "d_state": args.d_state,
        "chunk": args.chunk,
        "chunked_s": round(chunked, 3),
        "chunked_recompute_s": "-" if recomputed is None else round(recomputed, 3),
        "sequential_s": round(sequential, 3),
        "speedup": round(sequential / chunked, 2),
        "max_abs_difference": float(error),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[36 * 36, 73 * 73])
    parser.add_argument("--backward-lengths", type=int, nargs="*", default=[36 * 36])
    parser.add_argument(
        "--batch", type=int, default=4, help="sequences at once (4 = one image, 4 directions)"
    )
    parser.add_argument("--d-inner", type=int, default=768)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=MAX_CHUNK)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default="varad_scan")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(length, args, backward=False) for length in args.lengths]
    rows += [measure(length, args, backward=True) for length in args.backward_lengths]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/varad_scan.py", *sys.argv[1:]])
    env = {**environment(), "torch_threads": str(torch.get_num_threads())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"command": command, "environment": env, "rows": rows}, indent=2)
    )
    columns = [
        "tokens",
        "pass",
        "batch",
        "d_inner",
        "d_state",
        "chunk",
        "chunked_s",
        "chunked_recompute_s",
        "sequential_s",
        "speedup",
    ]
    lines = [
        "# VarAD selective scan on CPU: chunked vs sequential loop",
        "",
        "Best of repeated runs, same process, same inputs. speedup = sequential / chunked."
        " chunked_recompute_s: the chunked scan with recompute=True (only chunk inputs kept for"
        " the backward pass; the memory-saving training mode for long sequences).",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs ({env['torch_threads']} torch threads), torch {env['torch']}; "
        f"date {env['date']}. Shared machine: other jobs may have been running, so absolute times are noisy; the ratio is same-run.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    lines.append("")
    lines.append(
        "Largest |chunked - sequential| per row: "
        + ", ".join(f"{row['max_abs_difference']:.1e}" for row in rows)
    )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
