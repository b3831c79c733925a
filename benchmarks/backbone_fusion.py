"""EfficientNet-Lite forward time with BatchNorm folded into the convolutions vs the plain module.

Same weights, same six random 512 x 512 tiles (the tiling of one 1500x1000 image), interleaved
runs, best of ``--repeats``, one process; the ratio is what counts on a shared machine.

    python benchmarks/backbone_fusion.py
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_results
from hrad.features import BackboneConfig, build_backbone
from hrad.features.efficientnet import EfficientNetLite, _pypi_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="efficientnet-lite0", choices=["efficientnet-lite0", "efficientnet-lite2"])
    parser.add_argument("--tiles", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fused = build_backbone(BackboneConfig(name=args.variant))
    plain = EfficientNetLite(args.variant).eval()
    plain.load_state_dict(_pypi_source(args.variant).load())
    tiles = torch.rand(args.tiles, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"plain": [], "folded": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, model in (("plain", plain), ("folded", fused)):
                start = time.perf_counter()
                model.extract(tiles, ["layer2", "layer3"])
                times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    rows = [
        {"module": name, "seconds_for_tiles": round(best[name], 3), "relative_to_plain": round(best[name] / best["plain"], 3)}
        for name in ("plain", "folded")
    ]
    notes = (
        f"{args.variant}, {args.tiles} random tiles of 512 x 512 (layers 2 and 3, PatchCore's), {torch.get_num_threads()} "
        "torch thread(s), best of interleaved repeats. `folded`: BatchNorm folded into each convolution and symmetric "
        "SAME padding done by the convolution itself (what `build_backbone` returns)."
    )
    write_results(f"backbone_fusion_{args.variant}", rows, notes, columns=["module", "seconds_for_tiles", "relative_to_plain"])


if __name__ == "__main__":
    main()
