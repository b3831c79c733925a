"""A self-contained HTML evaluation report: one file, every picture embedded as base64 PNG.

It shows the metrics table, image and pixel ROC curves, the PRO curve, AUPRO per defect-size
quartile, the training loss per epoch (trainable detectors), the image-score histograms with
the decision threshold, the best and worst cases with overlays, the config and the environment.
It takes plain numbers and arrays (no models), so anything that measured them can render it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from hrad.reports.figures import (  # noqa: E402
    PANEL_TITLE_HEIGHT,
    Case,
    case_caption,
    image_aspect,
    inspected_only,
    is_wide,
    show_inspected,
)
from hrad.reports.markdown import format_value  # noqa: E402

#: most points drawn per curve (curves have one vertex per score bin: often 10^5 or more)
MAX_CURVE_POINTS = 2000


@dataclass
class ReportData:
    """Everything the report shows; curves are ``(x, y)`` arrays, cases thumbnails."""

    title: str
    metrics: Mapping[str, Any]
    image_scores: np.ndarray
    image_labels: np.ndarray
    pixel_roc: tuple[np.ndarray, np.ndarray]
    pro: tuple[np.ndarray, np.ndarray]
    #: AUPRO@30 / @5 of cumulative defect-size quartiles Q1..Q4, and the area limits (pixels)
    quartile_aupro: dict[str, list[float]] = field(default_factory=dict)
    quartile_limits: list[float] = field(default_factory=list)
    #: mean training loss per epoch by training stage
    training_history: Mapping[str, Sequence[float]] = field(default_factory=dict)
    image_threshold: float | None = None
    #: the overlay colour scale (model thresholds) and the pixel threshold for contours
    overlay_range: tuple[float, float] | None = None
    pixel_threshold: float | None = None
    cases: Mapping[str, Sequence[Case]] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)
    notes: Sequence[str] = ()
    #: what the thresholds decided, in sentences; with ``metrics``' ``decisions_by_defect_type``
    #: and ``operating_points`` (oracle, explained by ``operating_points_note``) as tables
    decisions: Sequence[str] = ()
    operating_points_note: str = ""


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most :data:`MAX_CURVE_POINTS` vertices, keeping the first and last (for drawing only)."""
    if x.size <= MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, MAX_CURVE_POINTS).round().astype(int))
    return x[keep], y[keep]


def _image_roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    from sklearn.metrics import roc_curve

    if len(set(labels.tolist())) < 2:
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def roc_figure(data: ReportData) -> str:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    image_curve = _image_roc(np.asarray(data.image_scores), np.asarray(data.image_labels))
    for axis, curve, name, key in (
        (axes[0], image_curve, "image ROC", "image_auroc"),
        (axes[1], data.pixel_roc if data.pixel_roc[0].size else None, "pixel ROC", "pixel_auroc"),
    ):
        if curve is None:
            axis.text(0.5, 0.5, "undefined (one class only)", ha="center")
        else:
            x, y = _thin(*curve)
            axis.plot(x, y, color="tab:blue", label=f"AUROC {format_value(data.metrics.get(key, float('nan')))}")
            axis.legend(loc="lower right")
        axis.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        axis.set(title=name, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    return _png(figure)


def pro_figure(data: ReportData) -> str:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    fpr, pro = data.pro
    for axis, limit, key in ((axes[0], 0.3, "aupro_30"), (axes[1], 0.05, "aupro_05")):
        if fpr.size == 0:
            axis.text(0.5, 0.5, "undefined (no defects)", ha="center")
        else:
            inside = fpr <= limit * 1.02
            x, y = _thin(fpr[inside], pro[inside])
            axis.plot(x, y, color="tab:red", label=f"AUPRO to {limit:g}: {format_value(data.metrics.get(key, float('nan')))}")
            axis.legend(loc="lower right")
        axis.set(title=f"PRO curve to FPR {limit:g}", xlabel="false positive rate (normal pixels)", ylabel="per-region overlap",
                 xlim=(0, limit), ylim=(0, 1.01))
    return _png(figure)


def quartile_figure(data: ReportData) -> str:
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    labels = [f"Q{k}" for k in range(1, 5)]
    if data.quartile_limits:
        limits = [*data.quartile_limits, math.inf]
        labels = [f"Q{k}\n<= {limit:.0f} px" if math.isfinite(limit) else f"Q{k}\nall" for k, limit in enumerate(limits, start=1)]
    width = 0.38
    for offset, (name, values) in zip((-width / 2, width / 2), data.quartile_aupro.items(), strict=False):
        bars = axis.bar(np.arange(4) + offset, np.nan_to_num(values), width, label=name)
        for bar, value in zip(bars, values, strict=True):
            axis.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, format_value(value), ha="center", fontsize=7)
    axis.set_xticks(np.arange(4), labels, fontsize=8)
    axis.set(ylim=(0, 1.28), ylabel="AUPRO", title="AUPRO per cumulative defect-size quartile")
    axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axis.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    return _png(figure)


def loss_figure(history: Mapping[str, Sequence[float]]) -> str:
    figure, axis = plt.subplots(figsize=(6.5, 3.4))
    for name, values in history.items():
        axis.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    axis.set(xlabel="epoch", ylabel="mean training loss", title="training loss per epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    values = [value for series in history.values() for value in series]
    if values and min(values) > 0 and max(values) / min(values) > 20:  # log only when it spans decades
        axis.set_yscale("log")
    axis.legend(fontsize=8)
    return _png(figure)


def score_figure(data: ReportData) -> str:
    figure, axis = plt.subplots(figsize=(6.5, 3.4))
    scores, labels = np.asarray(data.image_scores, dtype=float), np.asarray(data.image_labels)
    bins = np.histogram_bin_edges(scores, bins=min(30, max(5, scores.size // 2)))
    for label, name, color in ((0, "normal", "tab:green"), (1, "anomalous", "tab:red")):
        axis.hist(scores[labels == label], bins=list(bins), alpha=0.6, color=color, label=f"{name} ({int((labels == label).sum())})")
    if data.image_threshold is not None:
        axis.axvline(data.image_threshold, color="black", linestyle="--", label="threshold (held-out normals)")
    axis.set(xlabel="image score", ylabel="images", title="image scores")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(fontsize=8)
    return _png(figure)


def case_figure(case: Case, overlay_range: tuple[float, float] | None, pixel_threshold: float | None) -> str:
    """Image and overlay side by side, or one above the other for a wide image (a line-scan strip);
    a region of interest is outlined on both and the overlay dimmed outside it."""
    if is_wide(case):
        figure, axes = plt.subplots(2, 1, figsize=(10.0, 2 * (10.0 / image_aspect(case) + PANEL_TITLE_HEIGHT)))
    else:
        figure, axes = plt.subplots(1, 2, figsize=(7.0, 2.9))
    image = np.clip(case.image, 0, 1)
    low, high = overlay_range if overlay_range else (float(case.anomaly_map.min()), float(case.anomaly_map.max()))
    axes[0].imshow(image)
    axes[1].imshow(image)
    shown = axes[1].imshow(inspected_only(case), cmap="jet", alpha=0.45, vmin=low, vmax=high)
    show_inspected(axes[0], case, dim=False)
    region = show_inspected(axes[1], case)
    if case.mask is not None and case.mask.any():
        for axis in axes:
            axis.contour(case.mask, levels=[0.5], colors="magenta", linewidths=1.2)
    if pixel_threshold is not None and (case.anomaly_map > pixel_threshold).any():
        axes[1].contour(case.anomaly_map > pixel_threshold, levels=[0.5], colors="red", linewidths=0.9)
    inspected = "\nregion inspected (white)" if region else ""
    axes[0].set_title(f"image, ground truth (magenta){inspected}", fontsize=8)
    axes[1].set_title(f"map (model's scale), prediction (red){inspected}", fontsize=8)
    for axis in axes:
        axis.axis("off")
    figure.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02)
    return _png(figure)


_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cases { display: flex; flex-wrap: wrap; gap: 12px; } .case { border: 1px solid #ddd; padding: 6px; font-size: 12px; }
.case img { width: 520px; } .case.wide img { width: 1060px; } .note { font-size: 12px; color: #555; } pre { font-size: 11px; background: #f6f6f6; padding: 8px; overflow-x: auto; }
img { max-width: 100%; }
"""


def _metric_rows(metrics: Mapping[str, Any]) -> str:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, (dict, list)):
            continue
        label = key + (" (oracle threshold)" if "f1_max" in key else "")
        cell = format_value(value) if isinstance(value, float) else html.escape(str(value))
        rows.append(f"<tr><td>{html.escape(label)}</td><td class=num>{cell}</td></tr>")
    return "<table><tr><th>metric</th><th>value</th></tr>" + "".join(rows) + "</table>"


def _rows_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(
            f"<td class=num>{format_value(row[column])}</td>" if isinstance(row[column], (int, float))
            else f"<td>{html.escape(str(row[column]))}</td>"
            for column in columns
        ) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table><tr>{head}</tr>{body}</table>"


def _decisions_section(data: ReportData) -> list[str]:
    by_type, points = data.metrics.get("decisions_by_defect_type"), data.metrics.get("operating_points")
    if not (data.decisions or by_type or points):
        return []
    parts = ["<h2>Decisions at the thresholds</h2>", *(f"<p>{html.escape(line)}</p>" for line in data.decisions)]
    if by_type:
        parts.append(_rows_table(by_type, ["defect_type", "images", "flagged", "share_flagged"]))
    if points:
        parts += [
            "<h3>Operating points</h3>",
            f'<p class="note">{html.escape(data.operating_points_note)}</p>',
            _rows_table(points, ["point", "threshold", "good_flagged", "defective_flagged"]),
        ]
    return parts


def render_html(data: ReportData) -> str:
    """The report as one HTML string (no external resources)."""
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(data.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1>",
        "<h2>Metrics</h2>",
        _metric_rows(data.metrics),
        *(f'<p class="note">{html.escape(note)}</p>' for note in data.notes),
        *_decisions_section(data),
        "<h2>ROC curves</h2>",
        _img(roc_figure(data), "ROC curves"),
        "<h2>PRO curve</h2>",
        _img(pro_figure(data), "PRO curve"),
    ]
    if data.quartile_aupro:
        parts += [
            "<h2>AUPRO per defect size</h2>",
            '<p class="note">Cumulative quartiles of the ground-truth regions\' areas (L2BT): Q1 holds the smallest quarter '
            "of the defects, Q4 all of them (the standard AUPRO).</p>",
            _img(quartile_figure(data), "AUPRO per defect-size quartile"),
        ]
    parts += ["<h2>Image scores</h2>", _img(score_figure(data), "image score histogram")]
    if data.training_history:
        parts += ["<h2>Training</h2>", _img(loss_figure(data.training_history), "training loss per epoch")]
    if data.cases:
        parts.append("<h2>Best and worst cases</h2>")
        decision = f", image threshold {format_value(data.image_threshold)}" if data.image_threshold is not None else ""
        parts.append(f'<p class="note">Overlays share one colour scale set by the model\'s thresholds{decision}.</p>')
        for group, members in data.cases.items():
            if not members:
                continue
            parts.append(f"<h3>{html.escape(group)}</h3><div class=cases>")
            for case in members:
                caption = f"{case.name}: {case_caption(case, data.image_threshold)}"
                kind = "case wide" if is_wide(case) else "case"
                parts.append(
                    f"<div class='{kind}'>{_img(case_figure(case, data.overlay_range, data.pixel_threshold), caption)}"
                    f"<div>{html.escape(caption)}</div></div>"
                )
            parts.append("</div>")
    parts += [
        "<h2>Config</h2>",
        f"<pre>{html.escape(json.dumps(data.config, indent=2, default=str))}</pre>",
        "<h2>Environment</h2>",
        "<table>" + "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in data.environment.items()
        ) + "</table>",
        "</body></html>",
    ]
    return "\n".join(parts)


__all__ = ["MAX_CURVE_POINTS", "ReportData", "render_html"]
