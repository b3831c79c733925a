"""VarAD fit time per image-epoch by scan backend, with where the time goes, in the same run.

Issue 17 asks for VarAD's fit at least 10x cheaper per image-epoch than in
``varad_capsules_1022.md`` (1022 px, four directions: 6852 s for 5 images x 3 epochs). This
fits the same configuration (``benchmarks/varad.py``'s overrides: DINOv2 ViT-S/14, whole image
padded to a square and resized to ``--size``, reference prediction steps, batches of
``--batch-size`` images, AdamW) once per scan backend on the first training images of the
dataset, and splits the fit's wall time into:

* ``backbone_s``: the ViT embedding the training images (``Embedder.forward``; once per image,
  the embeddings are cached for the later epochs);
* ``forward_s``: VarAD's training forward passes (``training_step``), of which ``scan_forward_s``
  is the selective scan;
* ``backward_s``: ``loss.backward()``, of which ``scan_backward_s`` is the scan's backward
  (measurable for the compiled kernel only: the torch scans' backward is spread over autograd
  nodes);
* ``optimizer_s``: ``AdamW.step``; ``rest_s``: everything else (image loading, resizing,
  bookkeeping).

``per_image_epoch_s`` = fit seconds / (images x epochs); the kernels are compiled (or loaded
from numba's on-disk cache) before the timings. Backends: ``kernel`` (the compiled scan, the
CPU default since issue 17), ``chunked`` (with ``recompute_scan=True``: VarAD's CPU training
default before it, the setting of ``varad_capsules_1022.md``) and ``chunked+conv1d``: that,
with the Mamba block's causal depthwise convolution computed by ``nn.Conv1d`` as before issue
17 (now 4 shifted multiply-adds, whose backward is far cheaper on CPU): the code path of
``varad_capsules_1022.md``.

    python benchmarks/varad_fit_speed.py --n-train 3 --previous-n-train 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import CAPSULES, subset
from benchmarks.varad import varad_overrides
from hrad.config import load_config
from hrad.data.datasets import load_dataset
from hrad.data.images import ImageList
from hrad.detectors import mamba
from hrad.detectors.varad import VarAD
from hrad.evaluation import environment
from hrad.features.base import Embedder
from hrad.model import AnomalyModel
from hrad.profiling import PeakMemory

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def timed_methods(targets: dict[str, tuple[Any, str]]) -> Iterator[dict[str, float]]:
    """Accumulate the wall time of each ``(owner, attribute)`` callable while the block runs."""
    totals: dict[str, float] = defaultdict(float)
    originals = {name: getattr(owner, attribute) for name, (owner, attribute) in targets.items()}

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return timed

    for name, (owner, attribute) in targets.items():
        original = owner.__dict__.get(attribute, originals[name])
        wrapped = wrap(name, originals[name])
        setattr(owner, attribute, staticmethod(wrapped) if isinstance(original, staticmethod) else wrapped)
    try:
        yield totals
    finally:
        for name, (owner, attribute) in targets.items():
            original = owner.__dict__.get(attribute)
            if isinstance(original, staticmethod):
                setattr(owner, attribute, staticmethod(originals[name]))
            else:
                setattr(owner, attribute, originals[name])


def conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, channels_last: bool = False
) -> torch.Tensor:
    """The Mamba block's causal depthwise conv as it was before issue 17: ``nn.Conv1d``'s kernel."""
    assert not channels_last, "the conv1d reference runs with the torch scans only"
    taps = weight.shape[-1]
    return F.conv1d(x, weight, bias, padding=taps - 1, groups=weight.shape[0])[..., : x.shape[-1]]


def fit_row(backend: str, train: Sequence[Path], args: argparse.Namespace) -> dict[str, Any]:
    scan, _, conv = backend.partition("+")
    overrides = varad_overrides(
        args.vit, args.size, args.directions, "ref", args.epochs, args.batch_size, recompute=True
    )
    overrides["detector"]["scan"] = scan
    config = load_config(None, overrides)
    targets = {
        "backbone_s": (Embedder, "forward"),
        "forward_s": (VarAD, "training_step"),
        "scan_forward_s": (mamba, "selective_scan"),
        "kernel_forward_s": (mamba._KernelScan, "forward"),
        "backward_s": (torch.Tensor, "backward"),
        "scan_backward_s": (mamba._KernelScan, "backward"),
        "optimizer_s": (torch.optim.AdamW, "step"),
    }
    print(f"[{backend}] fitting on {len(train)} images ...", file=sys.stderr, flush=True)
    original_conv = mamba.causal_depthwise_conv
    if conv == "conv1d":
        mamba.causal_depthwise_conv = conv1d_reference
    try:
        with timed_methods(targets) as totals, PeakMemory() as memory:
            model = AnomalyModel(config).fit(ImageList(list(train)))
    finally:
        mamba.causal_depthwise_conv = original_conv
    detector = getattr(model.strategy, "detector", None)
    assert isinstance(detector, VarAD)
    accounted = sum(totals[name] for name in ("backbone_s", "forward_s", "backward_s", "optimizer_s"))
    row: dict[str, Any] = {
        "backend": backend,
        "images": len(train),
        "epochs": args.epochs,
        "fit_s": round(memory.seconds, 1),
        "per_image_epoch_s": round(memory.seconds / (len(train) * args.epochs), 1),
        **{name: round(totals[name], 1) for name in targets},
        "scan_forward_s": round(totals["scan_forward_s"] + totals["kernel_forward_s"], 1),
        "rest_s": round(memory.seconds - accounted, 1),
        "fit_peak_rss_mb": round(memory.peak_rss_mb),
        "final_loss": round(detector.loss_history[-1], 4),
    }
    if scan != "kernel":
        row["scan_backward_s"] = "-"
    print(f"[{backend}] {row}", file=sys.stderr, flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=CAPSULES, help="dataset category folder")
    parser.add_argument("--category", default=None)
    parser.add_argument("--n-train", type=int, default=3, help="training images for the kernel backend")
    parser.add_argument(
        "--previous-n-train", type=int, default=1, help="training images for the older backends (slow)"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["kernel", "chunked", "chunked+conv1d"],
        help="scan backends; '+conv1d': with the block's convolution as nn.Conv1d (before issue 17)",
    )
    parser.add_argument("--size", type=int, default=1022)
    parser.add_argument("--directions", type=int, choices=[1, 4], default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--vit", default="dinov2-vits14")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="varad_fit_speed")
    args = parser.parse_args(argv)

    # one-time costs outside the timings: compiling (or loading from numba's cache) the kernels
    warm = [torch.rand(1, 2, 3, requires_grad=True) for _ in range(2)]
    scan_inputs = (
        warm[0],
        warm[1],
        -torch.ones(2, 4),
        torch.rand(1, 4, 3),
        torch.rand(1, 4, 3),
        torch.ones(2),
    )
    mamba.selective_scan_kernel(*scan_inputs).sum().backward()
    torch.optim.AdamW([warm[0]])  # its first construction imports torch._dynamo (seconds)
    dataset = load_dataset(args.data, category=args.category)
    train, _ = subset(dataset, max(args.n_train, args.previous_n_train), 0, seed=args.seed)
    images = ImageList(list(train))
    for index in range(len(images)):  # decode once: disk cache and image libraries warm for every row
        images[index]
    load = os.getloadavg()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/varad_fit_speed.py", *sys.argv[1:]])
    env = {
        **environment(),
        "torch_threads": str(torch.get_num_threads()),
        "load_average_at_start": " ".join(f"{value:.1f}" for value in load),
    }
    rows: list[dict[str, Any]] = []
    for backend in args.backends:  # results rewritten after every row: the slow rows may time out
        rows.append(
            fit_row(backend, train[: args.n_train if backend == "kernel" else args.previous_n_train], args)
        )
        write(rows, args, dataset.category, command, env)


def write(
    rows: list[dict[str, Any]], args: argparse.Namespace, category: str, command: str, env: dict[str, str]
) -> None:
    kernel = next((row for row in rows if row["backend"] == "kernel"), None)
    for row in rows:
        row["kernel_speedup"] = (
            round(row["per_image_epoch_s"] / kernel["per_image_epoch_s"], 1) if kernel else "-"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"command": command, "environment": env, "rows": rows}, indent=2)
    )
    columns = [
        "backend",
        "images",
        "epochs",
        "fit_s",
        "per_image_epoch_s",
        "kernel_speedup",
        "backbone_s",
        "forward_s",
        "scan_forward_s",
        "backward_s",
        "scan_backward_s",
        "optimizer_s",
        "rest_s",
        "fit_peak_rss_mb",
    ]
    lines = [
        f"# VarAD fit speed by scan backend ({args.size} px, {args.directions} directions)",
        "",
        f"Data: {category} (`{args.data}`), the first training images of the seeded subset;"
        f" {args.vit}, whole image padded to a square and resized to {args.size} px, reference"
        f" prediction steps, batches of {args.batch_size}, {args.epochs} epoch(s), AdamW."
        " per_image_epoch_s = fit_s / (images x epochs); kernel_speedup = the row's per_image_epoch_s"
        " / the kernel row's. Time split (seconds, see the script's docstring): backbone, VarAD's"
        " training forward (scan forward inside it), loss.backward (the kernel's scan backward inside"
        " it), AdamW steps, rest. For reference, `varad_capsules_1022.md` (chunked scan with"
        " recompute, 5 images x 3 epochs, four directions) took 6852 s = 457 s per image-epoch.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs ({env['torch_threads']} torch threads), torch {env['torch']};"
        f" no GPU; date {env['date']}; load average at start {env['load_average_at_start']}. Shared"
        " machine: other jobs may have been running; the backends ran back to back in this process.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
