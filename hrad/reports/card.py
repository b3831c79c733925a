"""A fitted model's page (``hrad info MODEL --page model.html``): what ``hrad info`` says, and the
pictures behind it that an engineer checks before trusting the model on a line.

- The thresholds: every held-out normal image's score as a dot, their mean and the image
  threshold (mean + k std) marked, so it is plain how close the good images came to being
  flagged, and how few images the threshold rests on.
- The training loss per epoch of each stage (trainable detectors).
- The region of interest, as its mask.

Plain values in (the facts :func:`hrad.export_runtime.saved_model_facts` reads, a mask), one
self-contained HTML document out; charts are inline SVG (:mod:`hrad.reports.svg`), so exported
models get the page without torch or matplotlib.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from hrad.reports.svg import PALETTE, SvgPlot

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1000px; color: #222; padding: 0 12px; }
h1 { font-size: 20px; overflow-wrap: anywhere; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; } td { border: 1px solid #ddd; padding: 3px 8px; vertical-align: top; }
.note { font-size: 13px; color: #444; max-width: 760px; } img.roi { max-width: 480px; border: 1px solid #ccc; }
"""


def held_out_chart(scores: list[float], threshold: float, sigmas: float | None) -> str:
    """The held-out scores as dots (spread over rows so equal ones stay apart), their mean and the threshold."""
    values = np.asarray(scores, dtype=float)
    low, high = min(float(values.min()), threshold), max(float(values.max()), threshold)
    span = (high - low) or 1.0
    plot = SvgPlot((low - 0.05 * span, high + 0.05 * span), (0, 1), "held-out normal image score", height=120, y_ticks=[])
    plot.dots(values.tolist(), [0.25 + 0.5 * ((index * 0.618) % 1.0) for index in range(values.size)])
    if sigmas is not None and values.size > 1:
        plot.mark(float(values.mean()), "mean", colour="#666", dashed=False)
    plot.mark(threshold, f"image threshold {threshold:.4g}")
    return plot.render()


def loss_chart(training: Mapping[str, Mapping[str, Any]]) -> str:
    """Each training stage's loss per epoch as a line."""
    curves = {stage: [float(value) for value in run["losses"]] for stage, run in training.items() if run.get("losses")}
    everything = [value for values in curves.values() for value in values]
    longest = max(len(values) for values in curves.values())
    low, high = min(everything), max(everything)
    plot = SvgPlot((1, max(longest, 2)), (low, high), "epoch", height=200, y_ticks=[low, high], whole_x=True)
    entries = []
    for index, (stage, values) in enumerate(curves.items()):
        colour = PALETTE[index % len(PALETTE)]
        plot.line(list(range(1, len(values) + 1)), values, colour)
        entries.append((f"{stage} loss", colour))
    plot.legend(entries)
    return plot.render()


def _mask_png(mask: np.ndarray, longest: int = 480) -> str:
    height, width = mask.shape
    scale = min(1.0, longest / max(height, width))
    picture: np.ndarray = np.where(mask, 235, 60).astype(np.uint8)
    if scale < 1.0:
        picture = cv2.resize(picture, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    ok, buffer = cv2.imencode(".png", picture)
    if not ok:
        raise ValueError("cannot encode the region of interest as PNG")
    return base64.b64encode(buffer.tobytes()).decode("ascii")


def render_model_page(lines: Mapping[str, Any], facts: Mapping[str, Any], roi_mask: np.ndarray | None = None) -> str:
    """The page as one HTML string: ``lines`` as ``hrad info`` prints them, then the pictures of
    ``facts`` (thresholds, training) and of the region of interest's ``roi_mask``."""
    title = f"hrad model {lines.get('path', '')}"
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>"
        + "".join(f"<tr><td>{html.escape(key)}</td><td>{html.escape(str(value))}</td></tr>" for key, value in lines.items() if value is not None)
        + "</table>",
    ]
    thresholds = facts.get("thresholds")
    parts.append("<h2>Thresholds</h2>")
    if not thresholds:
        parts.append("<p class=note>None: the fit had no held-out normal images, so images are scored but not decided.</p>")
    else:
        scores, sigmas = thresholds.get("held_out_scores") or [], thresholds.get("sigmas")
        source = "good images given to hrad calibrate" if thresholds.get("calibrated") else "held-out normal images"
        if scores:
            rule = f"mean + {sigmas:g} std of their scores" if sigmas is not None else "set from their scores"
            parts.append(
                f"<p class=note>An image is flagged when its score is above the image threshold, {thresholds['image']:.6g}: "
                f"{rule}, over {len(scores)} {source}. Each dot below is one of them; the nearer the dots come to the "
                "threshold, the more good parts will be flagged. A threshold resting on a few images is rough: "
                "<code>hrad calibrate</code> sets it again from more good images, <code>--sigmas</code> moves it.</p>"
            )
            parts.append(held_out_chart(scores, float(thresholds["image"]), sigmas))
        pixel = f"<p class=note>Pixel threshold {thresholds['pixel']:.6g}"
        if thresholds.get("pixel_mean") is not None and thresholds.get("pixel_std") is not None and sigmas is not None:
            pixel += f": mean {thresholds['pixel_mean']:.4g} + {sigmas:g} x std {thresholds['pixel_std']:.4g} of the same images' map values"
        parts.append(pixel + "; masks, contours and defect regions follow it.</p>")
    training = facts.get("training") or {}
    if any(run.get("losses") for run in training.values()):
        parts += ["<h2>Training</h2>", "<p class=note>Mean training loss per epoch of each stage (from the model's own record).</p>"]
        parts.append(loss_chart(training))
    if roi_mask is not None:
        parts += [
            "<h2>Region of interest</h2>",
            f"<p class=note>Light: inspected ({float(roi_mask.mean()):.1%} of each image), dark: never flagged. "
            "The mask is stretched to each image's size.</p>",
            f'<img class=roi alt="region of interest" src="data:image/png;base64,{_mask_png(roi_mask)}">',
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["held_out_chart", "loss_chart", "render_model_page"]
