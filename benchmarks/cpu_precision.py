"""bf16 on a CPU with native bf16: what ``backbone.precision: bfloat16`` costs in quality and buys in time.

Tiled PatchCore on EfficientNet-Lite0 (512 tiles, PatchCore's defaults) fitted and evaluated on
the same VisA capsules images four times: the backbone in torch float32 (hrad's default), torch
under bfloat16 autocast, OpenVINO's CPU kernels in f32 (``backbone.runtime: openvino``) and in
bf16 (both settings). The memory bank, kNN and post-processing stay float32 in every row; only the
backbone's arithmetic changes, so the metric deltas are what its bf16 features cost.
``benchmarks/roofline.py`` measures the backbone alone; this is the whole pipeline, metrics
exact at 1500x1000. Timings are the evaluation's seconds per image (one process, rows run one
after another: a shared machine's load moves between them; the roofline's interleaved matmul
rate is the steadier speed figure).

    PYTHONPATH=. python benchmarks/cpu_precision.py --n-train 30 --n-test 30

Without native bf16 (no ``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo) the bf16 rows are
emulated and far slower; they run only with ``--emulated``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks.common import capsules, run_setup, subset, write_results
from benchmarks.roofline import cpu_flags
from hrad.data.images import read_image
from hrad.features.openvino import openvino_available

VARIANTS: dict[str, dict[str, Any]] = {
    "torch float32 (default)": {},
    "torch bfloat16 autocast": {"precision": "bfloat16"},
    "openvino f32": {"runtime": "openvino"},
    "openvino bf16": {"runtime": "openvino", "precision": "bfloat16"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--emulated", action="store_true", help="run the bf16 rows on a CPU without native bf16")
    parser.add_argument("--out", default="cpu_precision")
    args = parser.parse_args()
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if not native and not args.emulated:
        sys.exit("this CPU has no native bf16 (avx512_bf16 / amx_bf16): the bf16 rows would be emulated; --emulated runs them anyway")
    train, test = subset(capsules(), args.n_train, args.n_test)
    train_images = [read_image(path) for path in train]
    rows: list[dict[str, Any]] = []
    for name, backbone in VARIANTS.items():
        if backbone.get("runtime") == "openvino" and not openvino_available():
            print(f"[{name}] skipped: openvino is not installed", file=sys.stderr)
            continue
        overrides = {
            "backbone": {"name": "efficientnet-lite0", **backbone},
            "detector": {"name": "patchcore"},
            "strategy": {"name": "tiled", "tile": 512},
            "device": "cpu",
        }
        rows.append(run_setup(name, overrides, train, test, train_images=train_images))
        reference = rows[0]
        for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05"):
            rows[-1][f"{key}_delta"] = round(rows[-1][key] - reference[key], 4)
        rows[-1]["speedup_vs_default"] = round(reference["seconds_per_image"] / rows[-1]["seconds_per_image"], 2)
        notes = (
            f"Tiled PatchCore (512 tiles, PatchCore's defaults) on efficientnet-lite0, {len(train)} training images (20% held "
            f"out for thresholds), {len(test)} test images (seeded, label-stratified), metrics exact at full resolution; one "
            f"run per row, rows one after another in one process. CPU flags: {', '.join(sorted(cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'}))}"
            f" ({'native' if native else 'emulated'} bf16). Deltas and speedup against the first row (torch float32, hrad's default)."
        )
        columns = [
            "setup", "image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05", "image_auroc_delta", "pixel_ap_delta",
            "aupro_30_delta", "aupro_05_delta", "fit_seconds", "seconds_per_image", "speedup_vs_default",
        ]  # fmt: skip
        write_results(args.out, rows, notes, columns=columns)


if __name__ == "__main__":
    main()
