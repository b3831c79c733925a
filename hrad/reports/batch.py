"""The summary page of a batch of predictions (``hrad predict``'s ``index.html``): what an
inspection engineer opens after a run instead of reading ``scores.csv``.

It says how many images were flagged, failed and passed; shows the image scores against the
threshold (a histogram); then every flagged image, most anomalous
first, as a thumbnail of its overlay linking to the full one; the images that failed, with
why; and the passed ones, closest to the threshold first. Thumbnails and overlays are files
beside the page (relative links), so a page of ten thousand images stays small and loads them
as they scroll into view. It takes plain rows (no models, no files read), like the evaluation
report (:mod:`hrad.reports.html`).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: passed images shown as thumbnails, closest to the threshold first; the rest are table rows
PASSED_SHOWN = 60

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .note { font-size: 12px; color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; } .card { border: 1px solid #ddd; padding: 6px; font-size: 12px; width: 240px; }
.card img { width: 240px; height: 180px; object-fit: contain; background: #f3f3f3; display: block; }
.card.flagged { border-color: #c33; } .card .name { overflow-wrap: anywhere; } .flag { color: #c33; font-weight: 600; }
.summary { font-size: 15px; } .failed td { color: #a00; }
"""


@dataclass(frozen=True)
class BatchItem:
    """One image of the batch, as its ``scores.csv`` row says; links relative to the page."""

    path: str
    score: float | None = None
    flagged: bool | None = None
    regions: int | None = None
    #: the image-score threshold that decided
    threshold: float | None = None
    error: str | None = None
    #: the thumbnail's and the full picture's (overlay, else map) relative URLs, when written
    thumbnail: str | None = None
    link: str | None = None


def score_histogram(scores: Sequence[float], threshold: float | None, width: int = 640, height: int = 190) -> str:
    """The image scores' histogram with the threshold as an inline SVG. Drawn by hand, not with
    matplotlib: the page is also written by the torch-free runtime of exported models, whose
    install (``requirements-runtime.txt``) has no plotting library."""
    values = np.asarray(scores, dtype=float)
    low, high = float(values.min()), float(values.max())
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=min(40, max(5, values.size // 3)), range=(low, high))
    left, right, top, bottom = 44, 30, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = int(counts.max()) or 1

    def x(value: float) -> float:
        return left + (value - low) / (high - low) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" font-family="sans-serif">']
    for count, start, stop in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = count / peak * plot_h
        parts.append(f'<rect x="{x(start):.1f}" y="{top + plot_h - bar:.1f}" width="{max(x(stop) - x(start) - 1, 1):.1f}" height="{bar:.1f}" fill="#4a86c5"/>')
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>')
    for tick in np.linspace(low, high, 5):
        parts.append(f'<text x="{x(tick):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick:.4g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 9}" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">image score (images per bin)</text>')
    if threshold is not None:
        position = x(threshold)
        parts.append(f'<line x1="{position:.1f}" y1="{top}" x2="{position:.1f}" y2="{top + plot_h}" stroke="#c33" stroke-dasharray="5,3" stroke-width="1.5"/>')
        anchor = "end" if position > left + plot_w * 0.7 else "start"
        shift = -4 if anchor == "end" else 4
        parts.append(f'<text x="{position + shift:.1f}" y="{top + 10}" fill="#c33" text-anchor="{anchor}">threshold {threshold:.4g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _card(item: BatchItem) -> str:
    name = html.escape(item.path)
    picture = (
        f'<img loading="lazy" alt="{name}" src="{html.escape(item.thumbnail)}">' if item.thumbnail else "<div class=note>(no picture)</div>"
    )
    if item.link:
        picture = f'<a href="{html.escape(item.link)}">{picture}</a>'
    verdict = "<span class=flag>flagged</span>" if item.flagged else "passed"
    regions = "" if item.regions is None else f", {item.regions} region{'s' if item.regions != 1 else ''}"
    score = "" if item.score is None else f"score {item.score:.4g}"
    kind = "card flagged" if item.flagged else "card"
    return f"<div class='{kind}'>{picture}<div class=name>{name}</div><div>{verdict}: {score}{regions}</div></div>"


def _table(items: Sequence[BatchItem]) -> str:
    rows = []
    for item in items:
        name = html.escape(item.path)
        if item.link:
            name = f'<a href="{html.escape(item.link)}">{name}</a>'
        decision = "failed" if item.error else ("flagged" if item.flagged else "passed")
        score = "" if item.score is None else f"{item.score:.6g}"
        regions = "" if item.regions is None else str(item.regions)
        rows.append(
            f"<tr><td>{name}</td><td class=num>{score}</td><td>{decision}</td><td class=num>{regions}</td>"
            f"<td>{html.escape(item.error or '')}</td></tr>"
        )
    head = "<tr><th>image</th><th>score</th><th>decision</th><th>regions</th><th>error</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def render_batch_page(items: Sequence[BatchItem], title: str, facts: Mapping[str, str]) -> str:
    """The page as one HTML string; ``facts`` (model, when) are listed under the title, with the
    image threshold when one decided every image (the histogram marks it)."""
    failed = [item for item in items if item.error]
    scored = sorted((item for item in items if not item.error and item.score is not None), key=lambda item: -float(item.score or 0.0))
    flagged = [item for item in scored if item.flagged]
    passed = [item for item in scored if not item.flagged]
    thresholds = {item.threshold for item in scored}
    threshold = thresholds.pop() if len(thresholds) == 1 else None
    if threshold is not None:
        facts = {**facts, "image threshold": f"{threshold:.6g}"}
    total = len(items)
    share = f" ({len(flagged) / len(scored):.1%} of those predicted)" if scored else ""
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in facts.items()) + "</table>",
        f"<p class=summary>{total} image{'s' if total != 1 else ''}: <b>{len(flagged)} flagged</b>{share}, "
        f"{len(passed)} passed, {len(failed)} failed.</p>",
    ]
    if scored:
        parts.append(score_histogram([float(item.score or 0.0) for item in scored], threshold))
    if failed:
        parts += [f"<h2>Failed ({len(failed)})</h2>", "<div class=failed>", _table(failed), "</div>"]
    parts.append(f"<h2>Flagged ({len(flagged)}), most anomalous first</h2>")
    parts.append("<div class=grid>" + "".join(_card(item) for item in flagged) + "</div>" if flagged else "<p class=note>none</p>")
    parts.append(f"<h2>Passed ({len(passed)}), closest to the threshold first</h2>")
    if passed:
        shown = passed[:PASSED_SHOWN]
        parts.append("<div class=grid>" + "".join(_card(item) for item in shown) + "</div>")
        if len(passed) > len(shown):
            parts.append(f"<p class=note>{len(shown)} of {len(passed)} shown; all are in the table below.</p>")
    else:
        parts.append("<p class=note>none</p>")
    parts += [
        "<h2>All images</h2>",
        "<details><summary>the table, by score</summary>",
        _table([*failed, *scored]),
        "</details>",
        "<p class=note>Overlays share one colour scale set by the model's thresholds; "
        "scores.csv holds the same rows.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


__all__ = ["PASSED_SHOWN", "BatchItem", "render_batch_page", "score_histogram"]
