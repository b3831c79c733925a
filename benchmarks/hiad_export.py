"""HiAD as an export: the default HiAD (EfficientNet-Lite0, PatchCore) on VisA capsules, fitted,
exported to ONNX and OpenVINO, and evaluated three ways on the same test images.

At 1500x1000 the default low branch (long side 512) is 512x344, whose stride-8 side is odd: the
window graph's SAME padding traced (or folded, b12e2b4) as constants did not run there, so the
export carried a second backbone graph traced at the low size (``graphs.low_embedder``; before
287c873 such a model could not be exported at all); since 2914184 those pads are the convolutions'
``auto_pad=SAME_UPPER`` and the window graph runs the low branch itself (the notes say which). Rows: the torch model, onnxruntime and OpenVINO (FP32), each evaluated with
``hrad.evaluation.evaluate`` (the code of ``hrad evaluate``), one after another in one process;
max_map_difference compares each export's maps with the torch model's on the first test images,
relative to the map's range.

``--strategy`` runs the same three-way comparison on the other exports whose backbone graphs
carry EfficientNet-Lite's SAME padding: ``tiled-ensemble`` (tile 256 at 512, PatchCore, one graph
with the position as input) and ``mrf`` (exact 1-NN banks, three scales, dynamic sizes); the
results name then defaults to ``<strategy>_export``.

    PYTHONPATH=. python benchmarks/hiad_export.py --n-train 10 --n-test 12
    PYTHONPATH=. python benchmarks/hiad_export.py --n-train 10 --n-test 12 --strategy tiled-ensemble
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import capsules, subset, write_results
from hrad.config import load_config
from hrad.data.images import ImageList, read_image
from hrad.evaluation import evaluate
from hrad.export import export_onnx, export_openvino
from hrad.export_runtime import open_predictor
from hrad.features.openvino import openvino_available
from hrad.model import AnomalyModel
from hrad.profiling import PeakMemory

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "seconds_per_image")
#: the ``--strategy`` choices: strategy and detector sections of each benchmarked model
SETUPS: dict[str, dict[str, Any]] = {
    "hiad": {"strategy": {"name": "hiad"}, "detector": {"name": "patchcore"}},
    "tiled-ensemble": {"strategy": {"name": "tiled-ensemble", "tile": 256, "image_size": 512}, "detector": {"name": "patchcore", "index": "exact"}},
    "mrf": {"strategy": {"name": "mrf", "pixel_budget": 600_000, "scales": [0.5, 0.75, 1.0], "index": "exact"}, "detector": {"name": "patchcore"}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=12)
    parser.add_argument("--compare-images", type=int, default=3, help="test images whose maps are compared with torch's")
    parser.add_argument("--strategy", choices=list(SETUPS), default="hiad")
    parser.add_argument("--out", default=None, help="results name (default: <strategy>_export)")
    args = parser.parse_args()
    train, test = subset(capsules(), args.n_train, args.n_test)
    config = load_config(None, {"backbone": {"name": "efficientnet-lite0"}, **SETUPS[args.strategy], "device": "cpu"})
    with PeakMemory() as fit:
        model = AnomalyModel(config).fit(ImageList(list(train)))
    compared = [read_image(sample.path) for sample in test[: args.compare_images]]
    reference = [model.predict(image).anomaly_map for image in compared]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hrad_hiad_export_") as work:
        exports: dict[str, Any] = {"torch": model}
        with PeakMemory() as onnx_export:
            sidecar = json.loads(export_onnx(model, Path(work) / "m.onnx").read_text())
        exports["onnxruntime"] = open_predictor(Path(work) / "m.onnx")
        if openvino_available():
            export_openvino(model, Path(work) / "v.xml", "fp32")
            exports["openvino-fp32"] = open_predictor(Path(work) / "v.xml")
        for name, predictor in exports.items():
            metrics = evaluate(predictor, list(test))
            difference = 0.0
            if name != "torch":
                for image, expected in zip(compared, reference, strict=True):
                    got = predictor.predict(image).anomaly_map
                    difference = max(difference, float(np.abs(got - expected).max() / (expected.max() - expected.min())))
            row = {"backend": name, **{key: metrics[key] for key in METRICS}, "max_map_difference": f"{difference:.1e}"}
            row["speedup_vs_torch"] = round(rows[0]["seconds_per_image"] / row["seconds_per_image"], 2) if rows else 1.0
            rows.append(row)
            print(row, flush=True)
    if args.strategy != "hiad":
        notes = (
            f"{args.strategy} ({json.dumps(SETUPS[args.strategy]['strategy'])}, PatchCore scoring) on efficientnet-lite0, fitted on "
            f"{len(train)} capsules training images in {fit.seconds:.0f} s, exported in {onnx_export.seconds:.0f} s; {len(test)} test "
            f"images (seeded, label-stratified), metrics exact at full resolution; max_map_difference on the first {len(compared)} "
            "test images relative to the torch map's range. One run, rows one after another in one process (a shared machine: "
            "read the speedups as rough)."
        )
        write_results(args.out or f"{args.strategy.replace('-', '_')}_export", rows, notes, columns=["backend", *METRICS, "speedup_vs_torch", "max_map_difference"])
        return
    graphs = sidecar["graphs"]
    notes = (
        f"HiAD with hrad's defaults (SCA pool of {len(graphs['high'])} PatchCore detectors, {sidecar['geometry']['patch']}-pixel "
        f"patches, low branch at {sidecar['geometry']['low_size'][1]}x{sidecar['geometry']['low_size'][0]}) on "
        f"efficientnet-lite0, fitted on {len(train)} capsules training images in {fit.seconds:.0f} s (20% held out for "
        f"calibration and thresholds), exported in {onnx_export.seconds:.0f} s: {1 + len(graphs['high']) + 1 + (graphs['low_embedder'] is not None)} "
        f"graphs (low-size backbone graph: {'yes' if graphs['low_embedder'] else 'no'}); {len(test)} test images (seeded, "
        f"label-stratified), metrics exact at full resolution; max_map_difference on the first {len(compared)} test "
        "images relative to the torch map's range. One run, rows one after another in one process (a shared machine: "
        "read the speedups as rough)."
    )
    write_results(args.out or "hiad_export", rows, notes, columns=["backend", *METRICS, "speedup_vs_torch", "max_map_difference"])


if __name__ == "__main__":
    main()
