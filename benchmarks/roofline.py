"""Backbone roofline: FLOPs per image, time per image and the machine's matmul rate, in one run.

For each backbone the FLOPs of one 1500x1000 image's tiles (six tiles of 512, 518 for the ViT:
the tiled strategy's cover of a VisA capsules image) are counted with
``torch.utils.flop_counter.FlopCounterMode`` over the layers PatchCore embeds; each variant's
forward time is the best of ``--repeats``; the matmul rate (``--matmul`` square fp32 matmul,
best of 5) is measured right before every variant, so each row's fraction compares it with the
machine as it was at that moment (the machine is shared and its load moves). Variants are steps
that ``hrad/features`` takes (or offers) to close the gap; ``max_abs_diff`` is against the first
row's features, ``diff_scale`` the largest feature magnitude.

    PYTHONPATH=. python benchmarks/roofline.py [--backbones efficientnet-lite0 ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import write_results
from hrad.detectors.patchcore import PatchCore
from hrad.features import BackboneConfig, FeatureExtractor, build_backbone
from hrad.features.efficientnet import EfficientNetLite
from hrad.features.openvino import OpenVINOExtractor, openvino_available

TILES_PER_IMAGE = 6  # a 1500x1000 image covered by 512 tiles: 3 x 2


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(run: Callable[[], Any], repeats: int, device: str) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls after one warm-up, and the last call's result."""
    result = run()  # warm-up: allocations, oneDNN primitive creation, cuDNN autotuning
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def matmul_rate(size: int, device: str, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """GFLOP/s of one ``size x size`` matmul, best of ``repeats``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds, _ = best_time(lambda: a @ b, repeats, device)
    return 2 * size**3 / seconds / 1e9


@dataclass
class Variant:
    step: str
    extractor: FeatureExtractor
    grad_mode: str = "inference_mode"  # or "no_grad"
    tiles_per_call: int = TILES_PER_IMAGE
    threads: int | None = None
    autocast: torch.dtype | None = None


@contextlib.contextmanager
def settings(variant: Variant, device: str) -> Iterator[None]:
    threads = torch.get_num_threads()
    if variant.threads is not None:
        torch.set_num_threads(variant.threads)
    mode = torch.inference_mode() if variant.grad_mode == "inference_mode" else torch.no_grad()
    cast = torch.autocast(device, dtype=variant.autocast) if variant.autocast is not None else contextlib.nullcontext()
    try:
        with mode, cast:
            yield
    finally:
        torch.set_num_threads(threads)


def forward(variant: Variant, tiles: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    parts: list[dict[str, torch.Tensor]] = []
    step = variant.tiles_per_call
    for start in range(0, len(tiles), step):
        parts.append(variant.extractor.extract(tiles[start : start + step], layers))
    return {name: torch.cat([p[name].float() for p in parts]) for name in layers}


def variants(name: str, device: str, include_openvino: bool, cpu_bf16: bool) -> Iterator[Variant]:
    """The steps for one backbone, each built fresh (cumulative where the name says '+')."""
    flags_bf16 = native_bf16(device)
    if device == "cuda":
        extractor = build_backbone(BackboneConfig(name=name)).to(device)
        yield Variant("fp32 (hrad default)", extractor)
        yield Variant("bf16 autocast", extractor, autocast=torch.bfloat16)
        yield Variant("fp16 autocast", extractor, autocast=torch.float16)
        return
    extractor = build_backbone(BackboneConfig(name=name))
    if isinstance(extractor, EfficientNetLite):
        extractor.use_channels_last(False)
        yield Variant("before: NCHW, no_grad", extractor, grad_mode="no_grad")
        yield Variant("+ inference_mode", extractor)
        extractor = build_backbone(BackboneConfig(name=name))  # channels-last: hrad's default now
        yield Variant("+ channels_last (hrad default)", extractor)
    else:
        yield Variant("before: no_grad", extractor, grad_mode="no_grad")
        yield Variant("+ inference_mode (hrad default)", extractor)
    yield Variant("  1 tile per call", extractor, tiles_per_call=1)
    yield Variant("  2 tiles per call", extractor, tiles_per_call=2)
    yield Variant("  1 thread", extractor, threads=1)
    if flags_bf16 or cpu_bf16:  # emulated bf16 (no avx512_bf16/amx_bf16) is far slower than fp32
        bf16_note = "native" if flags_bf16 else "emulated: no avx512_bf16/amx_bf16"
        yield Variant(f"  bf16 autocast ({bf16_note})", extractor, autocast=torch.bfloat16, tiles_per_call=2)
    if include_openvino:
        yield Variant("+ OpenVINO CPU (backbone.runtime=openvino)", OpenVINOExtractor(extractor))
        if flags_bf16 or cpu_bf16:  # OpenVINO's bf16 kernels: backbone.precision=bfloat16
            lower = build_backbone(BackboneConfig(name=name, precision="bfloat16"))
            yield Variant(f"  OpenVINO bf16 (backbone.precision=bfloat16, {bf16_note})", OpenVINOExtractor(lower))


def measure_backbone(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    device = args.device
    probe = build_backbone(BackboneConfig(name=name))
    side = 518 if probe.is_vit else 512
    layers = PatchCore.default_embedding(probe).layers
    del probe
    tiles = torch.rand(TILES_PER_IMAGE, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    rows: list[dict[str, Any]] = []
    reference: dict[str, torch.Tensor] | None = None
    flops: int | None = None
    include_openvino = device == "cpu" and openvino_available() and not args.no_openvino
    for variant in variants(name, device, include_openvino, args.cpu_bf16):
        if flops is None:
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                variant.extractor.extract(tiles[:1], layers)
            flops = counter.get_total_flops() * TILES_PER_IMAGE
        rate_dtype = variant.autocast if device == "cuda" and variant.autocast is not None else torch.float32
        rate = matmul_rate(args.matmul, device, rate_dtype)
        with settings(variant, device):
            if isinstance(variant.extractor, OpenVINOExtractor):
                start = time.perf_counter()
                forward(variant, tiles, layers)  # conversion + compilation, once per input size
                print(f"[{name}] OpenVINO conversion {time.perf_counter() - start:.1f}s", flush=True)
            repeats = 1 if variant.autocast is not None and device == "cpu" else args.repeats
            def run(v: Variant = variant) -> dict[str, torch.Tensor]:
                return forward(v, tiles, layers)

            seconds, features = best_time(run, repeats, device)
        if reference is None:
            reference = {key: value.float().cpu() for key, value in features.items()}
        diff = max(float((features[key].float().cpu() - reference[key]).abs().max()) for key in layers)
        scale = max(float(reference[key].abs().max()) for key in layers)
        achieved = flops / seconds / 1e9
        row = {
            "backbone": name,
            "step": variant.step,
            "device": device,
            "layers": "+".join(layers),
            "tile": side,
            "gflop_per_image": round(flops / 1e9, 2),
            "seconds_per_image": round(seconds, 3),
            "achieved_gflops": round(achieved, 1),
            "matmul_gflops": round(rate, 1),
            "matmul_dtype": str(rate_dtype).removeprefix("torch."),
            "fraction_of_matmul": round(achieved / rate, 3),
            "max_abs_diff": f"{diff:.2g}",
            "diff_scale": round(scale, 1),
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet-lite0", "efficientnet-lite2", "dinov2-vits14"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul", type=int, default=2048, help="side of the square matmul that sets the machine's rate")
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument("--cpu-bf16", action="store_true", help="also time bf16 autocast on a CPU without native bf16")
    parser.add_argument("--out", default=None, help="results name (default roofline or roofline_cuda)")
    args = parser.parse_args()
    rows = [row for name in args.backbones for row in measure_backbone(name, args)]
    for dtype in {row["matmul_dtype"] for row in rows}:  # the machine's rate: the best seen in this run
        peak = max(row["matmul_gflops"] for row in rows if row["matmul_dtype"] == dtype)
        for row in rows:
            if row["matmul_dtype"] == dtype:
                row["best_matmul_gflops"] = peak
                row["fraction_of_best_matmul"] = round(row["achieved_gflops"] / peak, 3)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    notes = (
        f"Device: {device_name}; CPU flags that matter: {', '.join(flags) or 'unknown'}; {torch.get_num_threads()} torch "
        f"thread(s). One image = {TILES_PER_IMAGE} tiles (a 1500x1000 VisA capsules image tiled at 512; 518 for the "
        "ViT), random pixels (FLOPs and time do not depend on content); layers are PatchCore's defaults. FLOPs from "
        "torch's FlopCounterMode (convolutions, matmuls and attention; 2 FLOPs per multiply-add). fraction_of_matmul = "
        f"achieved GFLOP/s / a {args.matmul}x{args.matmul} matmul's GFLOP/s measured just before that row (best of 10); "
        "fraction_of_best_matmul divides by the best matmul rate of the whole run instead (the machine's rate when "
        "least loaded; the honest denominator when other processes come and go). Rows "
        "starting with '+' are cumulative steps; indented rows vary one setting of the row above them. The ReLU6 of "
        "EfficientNet-Lite runs in place in every row (hrad's code). bf16 on the CPU is timed only where the CPU has "
        "native bf16 (avx512_bf16 / amx_bf16) or with --cpu-bf16."
    )
    columns = [
        "backbone", "step", "gflop_per_image", "seconds_per_image", "achieved_gflops", "matmul_gflops",
        "fraction_of_matmul", "best_matmul_gflops", "fraction_of_best_matmul", "max_abs_diff", "diff_scale",
    ]
    write_results(args.out or ("roofline" if args.device == "cpu" else "roofline_cuda"), rows, notes, columns=columns)


if __name__ == "__main__":
    main()
