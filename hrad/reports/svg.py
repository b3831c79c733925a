"""Small charts as inline SVG for the pages hrad writes beside its files (``hrad predict``'s
``index.html``, ``hrad info --page``).

Drawn by hand rather than with matplotlib: those pages are also written by the torch-free
runtime of exported models, whose install (``requirements-runtime.txt``) has no plotting
library, and an inline SVG keeps each page one file that scales crisply. Only what the pages
need: a frame with ticks, bars, lines, dots and marked values, in data coordinates.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

PALETTE = ("#4a86c5", "#d9822b", "#3a9a5b", "#8e6cc0", "#c24f4f")
MARK = "#c33"


class SvgPlot:
    """A chart of ``width x height`` pixels over ``x_range`` and ``y_range`` (data units)."""

    def __init__(
        self,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        x_label: str,
        width: int = 640,
        height: int = 190,
        y_ticks: Sequence[float] | None = None,
        whole_x: bool = False,
    ) -> None:
        low, high = x_range
        self.x_range = (low - 0.5, high + 0.5) if high <= low else (low, high)
        bottom, top = y_range
        self.y_range = (bottom, bottom + 1.0) if top <= bottom else (bottom, top)
        self.x_label, self.width, self.height = x_label, width, height
        self.left, self.right, self.top, self.bottom = 52, 30, 10, 34
        self.y_ticks = list(y_ticks) if y_ticks is not None else [self.y_range[0], self.y_range[1]]
        #: x ticks at whole numbers only (epochs)
        self.whole_x = whole_x
        self.parts: list[str] = []

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / (high - low) * self.plot_width

    def y(self, value: float) -> float:
        bottom, top = self.y_range
        return self.top + self.plot_height - (value - bottom) / (top - bottom) * self.plot_height

    def bar(self, start: float, stop: float, value: float, colour: str = PALETTE[0]) -> None:
        top, base = self.y(value), self.y(self.y_range[0])
        width = max(self.x(stop) - self.x(start) - 1, 1)
        self.parts.append(f'<rect x="{self.x(start):.1f}" y="{top:.1f}" width="{width:.1f}" height="{base - top:.1f}" fill="{colour}"/>')

    def line(self, xs: Sequence[float], ys: Sequence[float], colour: str = PALETTE[0]) -> None:
        points = " ".join(f"{self.x(float(a)):.1f},{self.y(float(b)):.1f}" for a, b in zip(xs, ys, strict=True))
        self.parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.8"/>')

    def dots(self, xs: Sequence[float], ys: Sequence[float], colour: str = PALETTE[0], radius: float = 4.0) -> None:
        for a, b in zip(xs, ys, strict=True):
            self.parts.append(f'<circle cx="{self.x(float(a)):.1f}" cy="{self.y(float(b)):.1f}" r="{radius}" fill="{colour}" fill-opacity="0.7"/>')

    def mark(self, value: float, label: str, colour: str = MARK, dashed: bool = True) -> None:
        """A vertical line at ``value`` with ``label`` beside its top (left of it near the right end)."""
        position = self.x(value)
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        self.parts.append(
            f'<line x1="{position:.1f}" y1="{self.top}" x2="{position:.1f}" y2="{self.top + self.plot_height}" stroke="{colour}" stroke-width="1.5"{dash}/>'
        )
        anchor, shift = ("end", -4) if position > self.left + self.plot_width * 0.7 else ("start", 4)
        self.parts.append(f'<text x="{position + shift:.1f}" y="{self.top + 10}" fill="{colour}" text-anchor="{anchor}">{html.escape(label)}</text>')

    def legend(self, entries: Sequence[tuple[str, str]]) -> None:
        """``(label, colour)`` entries down the top right corner."""
        for row, (label, colour) in enumerate(entries):
            y = self.top + 12 + 14 * row
            x = self.left + self.plot_width - 4
            self.parts.append(f'<text x="{x:.1f}" y="{y}" fill="{colour}" text-anchor="end">{html.escape(label)}</text>')

    def render(self) -> str:
        bottom = self.top + self.plot_height
        frame = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" font-size="11" font-family="sans-serif">',
            f'<line x1="{self.left}" y1="{bottom}" x2="{self.left + self.plot_width}" y2="{bottom}" stroke="#333"/>',
            f'<line x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{bottom}" stroke="#333"/>',
        ]
        ticks = np.linspace(*self.x_range, 5)
        for tick in np.unique(np.round(ticks)) if self.whole_x else ticks:
            frame.append(f'<text x="{self.x(tick):.1f}" y="{bottom + 14}" text-anchor="middle">{tick:.4g}</text>')
        for tick in self.y_ticks:
            frame.append(f'<text x="{self.left - 4}" y="{self.y(tick) + 4:.1f}" text-anchor="end">{tick:.4g}</text>')
        frame.append(f'<text x="{self.left + self.plot_width / 2:.1f}" y="{self.height - 4}" text-anchor="middle">{html.escape(self.x_label)}</text>')
        return "".join([*frame, *self.parts, "</svg>"])


__all__ = ["MARK", "PALETTE", "SvgPlot"]
