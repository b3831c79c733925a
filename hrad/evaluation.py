"""``hrad evaluate``: run a fitted model over a labelled test set and measure it honestly.

Maps are scored one image at a time at full ground-truth resolution; the pixel metrics
accumulate in bounded memory (see :mod:`hrad.metrics`). Nothing here chooses anything from
the test data: thresholds come from the model's held-out normal images.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hrad.data.datasets import Sample
from hrad.data.images import read_image
from hrad.metrics import PixelMetrics, image_metrics
from hrad.model import AnomalyModel
from hrad.profiling import PeakMemory
from hrad.reports.figures import Case, case_grid, select_cases, thumbnail
from hrad.reports.markdown import metrics_report, table
from hrad.strategies.base import ProgressCallback, no_progress

Protocol = Literal["full", "hiad512"]


def evaluate(
    model: AnomalyModel,
    samples: Sequence[Sample],
    out_dir: Path | None = None,
    protocol: Protocol = "full",
    progress: ProgressCallback = no_progress,
    cases_per_group: int = 3,
) -> dict[str, Any]:
    """Metrics of ``model`` on labelled ``samples``; writes metrics.json, metrics.md, cases.png, scores.csv."""
    pixel = PixelMetrics(protocol=protocol)
    scores: list[float] = []
    labels: list[int] = []
    cases: list[Case] = []
    rows: list[dict[str, Any]] = []
    seconds = 0.0
    with PeakMemory() as memory:
        for index, sample in enumerate(samples):
            image = read_image(sample.path)
            start = time.perf_counter()
            prediction = model.predict(image)
            seconds += time.perf_counter() - start
            mask = sample.load_mask(image.shape[:2])
            pixel.add(prediction.anomaly_map, mask)
            scores.append(prediction.score)
            labels.append(sample.label)
            rows.append({"image": str(sample.path), "defect_type": sample.defect_type, "label": sample.label, "score": prediction.score})
            if out_dir is not None:
                cases.append(
                    Case(sample.path.name, sample.label, prediction.score, thumbnail(image), thumbnail(prediction.anomaly_map), thumbnail(mask))
                )
            progress(index + 1, len(samples), "evaluating")
    metrics: dict[str, Any] = {}
    metrics.update(image_metrics(np.asarray(scores), np.asarray(labels)))
    metrics.update(pixel.result())
    metrics["seconds_per_image"] = seconds / max(1, len(samples))
    metrics["peak_rss_mb"] = memory.peak_rss_mb
    if memory.peak_gpu_mb:
        metrics["peak_gpu_mb"] = memory.peak_gpu_mb
    metrics["images"] = len(samples)
    metrics["protocol"] = protocol
    if out_dir is not None:
        write_evaluation(out_dir, metrics, rows, cases, cases_per_group, model)
    return metrics


def environment() -> dict[str, str]:
    import torch

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": str(__import__("os").cpu_count()),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def write_evaluation(
    out_dir: Path, metrics: dict[str, Any], rows: list[dict[str, Any]], cases: list[Case], count: int, model: AnomalyModel
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**metrics, "environment": environment(), "config": model.config.model_dump(mode="json")}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    report = metrics_report(metrics, "hrad evaluate")
    report += "\nF1-max values use the best threshold chosen on the test set itself (oracle); AUROC/AP/AUPRO need no threshold.\n"
    report += "\n![best and worst cases](cases.png)\n"
    worst = sorted(rows, key=lambda r: (-r["score"] if r["label"] == 0 else r["score"]))[: 2 * count]
    report += "\n## Worst cases\n\n" + table(worst, ["image", "defect_type", "label", "score"])
    (out_dir / "metrics.md").write_text(report)
    with (out_dir / "scores.csv").open("w") as handle:
        handle.write("image,defect_type,label,score\n")
        for row in rows:
            handle.write(f"{row['image']},{row['defect_type']},{row['label']},{row['score']:.6g}\n")
    if cases:
        vmax = float(np.percentile([c.anomaly_map.max() for c in cases], 90))
        case_grid(select_cases(cases, count), out_dir / "cases.png", vmax=vmax, title="hrad evaluate: worst and best cases")
