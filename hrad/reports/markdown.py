"""Markdown tables of metrics (reports and benchmark results)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3f}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; columns default to the union of keys in first-seen order."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def metrics_report(metrics: Mapping[str, Any], title: str = "Evaluation") -> str:
    """A two-column table of one evaluation, oracle metrics labelled as such."""
    rows = []
    for key, value in metrics.items():
        label = key + (" (oracle threshold)" if "f1_max" in key else "")
        rows.append({"metric": label, "value": value})
    return f"# {title}\n\n" + table(rows, ["metric", "value"])
