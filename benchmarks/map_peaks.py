"""Where a detector's map maximum sits on good vs defective images (downsampling strategy).

A diagnosis of the image score ``max of the map``: fit one downsampling model, then for every
test image take the detector's token map (before upsampling and blur, through
:meth:`~hrad.strategies.tiled.TiledStrategy.embed_image` and the detector's ``predict``) and
record its maximum and how far (in tokens) the maximum lies from the map's border. Reports per
setup: image AUROC of the maximum, of the maximum without a ``--border``-token frame, how many
good / defective images peak in the outer ``--border`` tokens (default 4: at most 3 tokens from the edge) and how many defective
images peak inside their ground truth.

    python benchmarks/map_peaks.py --data /work/shared/data/visa/capsules --n-test 40 \\
        --detector-option epochs=10 --detector-option synthesis=image --name realnet_synthesis_v2/map_peaks
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.common import subset_test, tiled_strategy, write_results
from benchmarks.hiad import PathImages, option
from hrad.config import ModelConfig
from hrad.data.datasets import load_dataset
from hrad.data.images import read_image
from hrad.detectors.base import detector_config
from hrad.features.base import BackboneConfig
from hrad.imaging import resize
from hrad.model import AnomalyModel
from hrad.strategies.base import strategy_config

COLUMNS = [
    "setup", "good", "bad", "image_auroc", "interior_max_auroc", "good_border_peaks", "bad_border_peaks",
    "bad_peaks_in_defect", "fit_s",
]


def peaks(args: argparse.Namespace) -> dict[str, Any]:
    dataset = load_dataset(args.data)
    train = PathImages(sorted(dataset.train)[: args.n_train])
    test = subset_test(dataset.test, args.n_test)
    detector = {"name": args.detector, "seed": args.seed, **dict(args.detector_option)}
    config = ModelConfig(
        backbone=BackboneConfig(name=args.backbone),
        detector=detector_config(detector),
        strategy=strategy_config({"name": "downsample", "image_size": args.image_size}),
        device="cpu",
        seed=args.seed,
    )
    model = AnomalyModel(config)
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    strategy = tiled_strategy(model)
    labels, scores, interior, border_hits, in_defect = [], [], [], [], 0
    k = args.border
    for sample in test:
        image = read_image(sample.path)
        with torch.inference_mode():
            embeddings = torch.cat(list(strategy.embed_image(image)))
            token_map = strategy.detector.predict(embeddings).maps[0].float()
        height, width = token_map.shape
        row, col = divmod(int(token_map.argmax()), width)
        labels.append(sample.label)
        scores.append(float(token_map.max()))
        interior.append(float(token_map[k:-k, k:-k].max()))
        border_hits.append(min(row, col, height - 1 - row, width - 1 - col) < k)
        if sample.label == 1:
            truth = torch.from_numpy(sample.load_mask(image.shape[:2])).float()[None, None]
            in_defect += bool(resize(truth, (height, width))[0, 0, row, col] > 0)
    label_array, hits = np.array(labels), np.array(border_hits)
    return {
        "setup": args.label,
        "good": int((label_array == 0).sum()),
        "bad": int((label_array == 1).sum()),
        "image_auroc": float(roc_auc_score(label_array, scores)),
        "interior_max_auroc": float(roc_auc_score(label_array, interior)),
        "good_border_peaks": int(hits[label_array == 0].sum()),
        "bad_border_peaks": int(hits[label_array == 1].sum()),
        "bad_peaks_in_defect": in_defect,
        "fit_s": fit_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n-train", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--detector", default="realnet")
    parser.add_argument("--detector-option", type=option, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--border", type=int, default=4, help="frame width in tokens counted as the border")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="downsampling (512)")
    parser.add_argument("--name", required=True, help="results name under benchmarks/results/")
    args = parser.parse_args()
    row = peaks(args)
    print(row, flush=True)
    notes = (
        f"Map maxima of {args.detector} {dict(args.detector_option)} on {args.backbone}, downsampling to "
        f"{args.image_size}; {args.n_train} training images (20% held out for calibration), {args.n_test} test "
        f"images (good and bad interleaved); border = the outer {args.border} tokens of the token map."
    )
    print(write_results(args.name, [row], notes, COLUMNS))


if __name__ == "__main__":
    main()
