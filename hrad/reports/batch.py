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

from hrad.reports.svg import SvgPlot

#: passed images shown as thumbnails, closest to the threshold first; the rest are table rows
PASSED_SHOWN = 60

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .note { font-size: 12px; color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; } .card { border: 1px solid #ddd; padding: 6px; font-size: 12px; width: 240px; }
.card img { width: 240px; height: 180px; object-fit: contain; background: #f3f3f3; display: block; }
.card.wide { flex: 1 1 100%; box-sizing: border-box; width: auto; } .card.wide img { width: 100%; height: auto; }
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
    #: the thumbnail's width over its height, when known: a strip's card spans the page's width
    aspect: float | None = None


#: a thumbnail's width / height above which its card spans the page (a line-scan strip in the
#: 240 x 180 box of the others was a sliver a few pixels high); cases.png stacks panels above 2 too
WIDE_ASPECT = 2.0


def score_histogram(scores: Sequence[float], threshold: float | None, width: int = 640, height: int = 190) -> str:
    """The image scores' histogram with the threshold marked, as an inline SVG (:mod:`hrad.reports.svg`)."""
    values = np.asarray(scores, dtype=float)
    low, high = float(values.min()), float(values.max())
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=min(40, max(5, values.size // 3)), range=(low, high))
    peak = int(counts.max()) or 1
    plot = SvgPlot((low, high), (0, peak), "image score (images per bin)", width, height, y_ticks=[0, peak])
    for count, start, stop in zip(counts, edges[:-1], edges[1:], strict=True):
        plot.bar(start, stop, count)
    if threshold is not None:
        plot.mark(threshold, f"threshold {threshold:.4g}")
    return plot.render()


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
    if item.aspect is not None and item.aspect > WIDE_ASPECT:
        kind += " wide"
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
