"""CPU time of VarAD's selective scans, in the same run: the numba-compiled scan (``kernel``,
the CPU default), the chunked torch scan (with and without recompute) and the plain
sequential loop.

Sizes are VarAD's real ones: one ViT-S level (d_model 384 -> d_inner 768, d_state 16), a
36 x 36 grid (518 px) and a 73 x 73 grid (1022 px), four scan directions batched. Forward
only (inference), then forward + backward (training). The ratios are times measured back to
back in this process; results go to benchmarks/results/varad_scan.{json,md} with machine,
date, load average and command.

    python benchmarks/varad_scan.py                       # default sizes
    python benchmarks/varad_scan.py --lengths 1296 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hrad.detectors.mamba import (
    MAX_CHUNK,
    selective_scan_chunked,
    selective_scan_kernel,
    selective_scan_sequential,
)
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

    call(selective_scan_kernel)()  # compile / load the kernels outside the timing
    kernel = best_time(call(selective_scan_kernel), args.repeats)
    chunked = best_time(call(partial(selective_scan_chunked, chunk=args.chunk)), args.repeats)
    recomputed = (
        best_time(call(partial(selective_scan_chunked, chunk=args.chunk, recompute=True)), args.repeats)
        if backward
        else None
    )
    sequential = best_time(call(selective_scan_sequential), args.repeats)
    with torch.no_grad():
        reference = selective_scan_sequential(*inputs)
        chunked_error = (partial(selective_scan_chunked, chunk=args.chunk)(*inputs) - reference).abs().max()
        kernel_error = (selective_scan_kernel(*inputs) - reference).abs().max()
    # today's default before the compiled scan: chunked + recompute for training (VarAD's
    # recompute_scan=True), the sequential loop for inference
    previous = recomputed if recomputed is not None else sequential
    side = round(length**0.5)
    return {
        "tokens": f"{side}x{side}" if side * side == length else str(length),
        "length": length,
        "pass": "forward+backward" if backward else "forward",
        "batch": args.batch,
        "d_inner": args.d_inner,
        "d_state": args.d_state,
        "chunk": args.chunk,
        "kernel_s": round(kernel, 3),
        "chunked_s": round(chunked, 3),
        "chunked_recompute_s": "-" if recomputed is None else round(recomputed, 3),
        "sequential_s": round(sequential, 3),
        "kernel_vs_sequential": round(sequential / kernel, 1),
        "kernel_vs_chunked": round(chunked / kernel, 1),
        "kernel_vs_previous_default": round(previous / kernel, 1),
        "chunked_vs_sequential": round(sequential / chunked, 2),
        "max_abs_difference_chunked": float(chunked_error),
        "max_abs_difference_kernel": float(kernel_error),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[36 * 36, 73 * 73])
    parser.add_argument("--backward-lengths", type=int, nargs="*", default=[36 * 36, 73 * 73])
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
    load = os.getloadavg()
    rows = [measure(length, args, backward=False) for length in args.lengths]
    rows += [measure(length, args, backward=True) for length in args.backward_lengths]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/varad_scan.py", *sys.argv[1:]])
    env = {
        **environment(),
        "torch_threads": str(torch.get_num_threads()),
        "load_average_at_start": " ".join(f"{value:.1f}" for value in load),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"command": command, "environment": env, "rows": rows}, indent=2)
    )
    columns = [
        "tokens",
        "length",
        "pass",
        "batch",
        "d_inner",
        "d_state",
        "kernel_s",
        "chunked_s",
        "chunked_recompute_s",
        "sequential_s",
        "kernel_vs_sequential",
        "kernel_vs_chunked",
        "kernel_vs_previous_default",
        "chunked_vs_sequential",
    ]
    lines = [
        "# VarAD selective scan on CPU: compiled kernel vs chunked vs sequential loop",
        "",
        "Best of repeated runs, same process, same inputs (seconds). kernel: the numba-compiled scan"
        " (hrad.detectors.mamba.selective_scan_kernel, the CPU default since issue 17); chunked: the"
        f" torch chunked scan (chunk {args.chunk}); chunked_recompute_s: the chunked scan with"
        " recompute=True (VarAD's training setting before the kernel); sequential: the token loop."
        " kernel_vs_X = X time / kernel time. kernel_vs_previous_default: against what VarAD ran"
        " before the kernel (chunked + recompute for training, the loop for inference).",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs ({env['torch_threads']} torch threads), torch {env['torch']}; "
        f"date {env['date']}; load average at start {env['load_average_at_start']}. Shared machine: other"
        " jobs may have been running, so absolute times are noisy; the ratios are same-run.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    lines.append("")
    lines.append(
        "Largest |scan - sequential| per row, chunked: "
        + ", ".join(f"{row['max_abs_difference_chunked']:.1e}" for row in rows)
        + "; kernel: "
        + ", ".join(f"{row['max_abs_difference_kernel']:.1e}" for row in rows)
    )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
