"""``hrad predict``'s pipeline (reading and writing in threads, hrad/pipeline.py) vs the serial loop.

One fitted tiled-PatchCore model (EfficientNet-Lite0, 512 tiles) predicts the same folder of
capsules test images with the same writer (16-bit map, mask and overlay PNGs, as ``hrad predict``
writes by default), once serially (read, predict, write, next image: ``prefetch=0, writers=0``)
and once overlapped (``prefetch=2, writers=1``: ``hrad predict``'s setting); runs interleaved,
``--rounds`` times, best wall time of each. Scores must be identical.

    PYTHONPATH=. python benchmarks/predict_pipeline.py --n-train 4 --n-images 12
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import capsules, subset, write_results
from hrad.config import load_config
from hrad.data.images import read_image
from hrad.model import AnomalyModel
from hrad.outputs import OutputRow, PredictionWriter
from hrad.pipeline import overlapped


def run(model: AnomalyModel, paths: list[Path], out: Path, prefetch: int, writers: int) -> tuple[float, list[float | None]]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    writer = PredictionWriter.for_model(out, model)

    def compute(path: Path, image: Any) -> Any:
        return model.predict(image)

    def finish(path: Path, image: Any, prediction: Any) -> OutputRow:
        return writer.write(path, path.stem, image, prediction)

    start = time.perf_counter()
    rows = list(overlapped(paths, read_image, compute, finish, prefetch=prefetch, writers=writers))
    seconds = time.perf_counter() - start
    scores: list[float | None] = []
    for _, row in rows:
        if isinstance(row, Exception):
            raise row
        scores.append(row.score)
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=4)
    parser.add_argument("--n-images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="predict_pipeline")
    args = parser.parse_args()
    dataset = capsules()
    train, _ = subset(dataset, args.n_train, None)
    paths = sorted(s.path for s in dataset.test)[: args.n_images]
    overrides = {"strategy": {"name": "tiled", "tile": 512}, "threshold": {"validation_fraction": 0.25}}
    model = AnomalyModel(load_config(None, overrides)).fit([read_image(p) for p in train])
    work = Path(tempfile.mkdtemp(prefix="hrad_pipeline_"))
    modes = {"serial (read, predict, write in turn)": (0, 0), "pipeline (hrad predict: prefetch 2, 1 writer)": (2, 1)}
    times: dict[str, list[float]] = {name: [] for name in modes}
    scores: dict[str, list[float | None]] = {}
    try:
        run(model, paths[:1], work / "warm", 0, 0)
        for _ in range(args.rounds):
            for name, (prefetch, writers) in modes.items():
                seconds, found = run(model, paths, work / "out", prefetch, writers)
                times[name].append(seconds)
                scores[name] = found
                print(f"{name}: {seconds:.1f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    serial_name = next(iter(modes))
    identical = all(found == scores[serial_name] for found in scores.values())
    rows = [
        {
            "mode": name,
            "images": len(paths),
            "best_seconds": round(min(values), 2),
            "images_per_second": round(len(paths) / min(values), 3),
            "speedup_vs_serial": round(min(times[serial_name]) / min(values), 3),
            "all_runs_seconds": " / ".join(f"{v:.1f}" for v in values),
            "scores_identical": identical,
        }
        for name, values in times.items()
    ]
    notes = (
        f"Tiled PatchCore (EfficientNet-Lite0, 512 tiles) fitted on {len(train)} capsules training images; "
        f"{len(paths)} capsules test images (1500x1000 PNG) predicted with the default outputs (16-bit map, mask, overlay "
        f"PNGs); {args.rounds} interleaved rounds, best of each mode. The machine is a shared 2-core CPU: decoding and "
        "PNG encoding compete with torch for the same two cores, so the overlap can hide them only partly."
    )
    write_results(args.out, rows, notes, columns=list(rows[0]))


if __name__ == "__main__":
    main()
