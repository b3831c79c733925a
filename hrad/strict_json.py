"""JSON that strict readers take: every JSON file and every JSON line on stdout that hrad writes
goes through :func:`dumps`.

Python's ``json`` writes a NaN or an infinity as a bare ``NaN`` / ``Infinity``, which is not
JSON: JavaScript's ``JSON.parse``, jq and most strict readers refuse the whole file. hrad has
such numbers where a metric is undefined (the image AUROC of a test set with one class, pixel
metrics without defect pixels, a share of nothing), so they are written as ``null``: in hrad's
JSON files, ``null`` for a number means "undefined here". Readers of those files take ``null``
where they took NaN. Imports nothing of hrad, so every layer may use it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every non-finite number (also inside dicts, lists and tuples) as ``None``,
    numpy scalars as Python numbers and tuples as lists; anything else unchanged."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` of :func:`strict` ``(value)`` (``options`` as ``json.dumps`` takes them,
    ``indent``, ``default``, ...); never writes ``NaN`` or ``Infinity``."""
    return json.dumps(strict(value), allow_nan=False, **options)


__all__ = ["dumps", "strict"]
