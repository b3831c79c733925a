"""Issue 2: PatchCore memory-bank size versus quality and fit time, full-resolution tiles.

The training tiles are embedded once; PatchCore is then fitted with each bank size (greedy
k-center coreset from the same 200k sampled patches) and evaluated at full resolution on the
same test images. The library default (``max_bank_size``) is chosen from this table.

    python benchmarks/patchcore_bank.py --n-train 100 --n-test 60 --banks 2500 5000 10000 20000 40000
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import capsules, subset, tiled_strategy, write_results
from hrad.config import load_config
from hrad.data.images import read_image
from hrad.detectors.patchcore import PatchCore, PatchCoreConfig
from hrad.evaluation import evaluate
from hrad.model import AnomalyModel

COLUMNS = ["setup", "bank_size", "coreset_seconds", "image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05", "aupro_30_q1", "seconds_per_image"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--banks", type=int, nargs="+", default=[2500, 5000, 10000, 20000, 40000])
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    train, test = subset(capsules(), args.n_train, args.n_test)
    overrides = {"backbone": {"name": "efficientnet-lite0"}, "detector": {"name": "patchcore"}, "strategy": {"name": "tiled", "tile": args.tile}}
    model = AnomalyModel(load_config(None, overrides))
    strategy = tiled_strategy(model)
    start = time.perf_counter()
    embeddings: list[torch.Tensor] = []
    with torch.inference_mode():
        for path in train:
            embeddings.extend(batch.to(torch.float16) for batch in strategy.embed_image(read_image(path)))
    embed_seconds = time.perf_counter() - start
    rows = []
    for bank in args.banks:
        detector = PatchCore(PatchCoreConfig(name="patchcore", coreset_ratio=1.0, max_bank_size=bank))
        start = time.perf_counter()
        detector.fit([batch.float() for batch in embeddings])
        coreset_seconds = time.perf_counter() - start
        strategy.detector = detector  # type: ignore[attr-defined]
        metrics = evaluate(model, test)
        rows.append({"setup": f"patchcore/lite0/tiled{args.tile}", "bank_size": bank, "coreset_seconds": coreset_seconds, **metrics})
        print(f"bank {bank}: coreset {coreset_seconds:.1f}s aupro_30 {metrics['aupro_30']:.3f} image_auroc {metrics['image_auroc']:.3f}", flush=True)
    notes = (
        f"{len(train)} training images embedded once ({embed_seconds:.0f} s for all tiles), {len(test)} test images; "
        "every bank size is a greedy k-center coreset of the same 200k randomly sampled training patches "
        "(no threshold hold-out here: evaluation needs no threshold)."
    )
    write_results("patchcore_bank_size", rows, notes, COLUMNS)


if __name__ == "__main__":
    main()
