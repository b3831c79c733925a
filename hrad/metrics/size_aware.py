"""Size-aware segmentation metrics of "Learning to Be a Transformer" (L2BT), Sec. IV-A.2 and IV-A.3.

Sec. IV-A.2 ("Performance across defect sizes"): the defect-size distribution of a category is
partitioned into CUMULATIVE quartiles Q1..Q4; the set of Qk holds every defect whose size is
"smaller than or equal to the considered quartile", so Q1 = the smallest ~25% of defects and
Q4 = all defects (Q4-AUPRO is the standard AUPRO). A defect is one connected component of a
ground-truth mask; its size is its pixel area. The paper does not say how a quartile between two
areas is placed: we use numpy's default linear interpolation (``np.percentile``).

Sec. IV-A.3 ("Robustness"), Eq. (4): rho = w * (1 - s) with w = mean of AUPRO(Q1..Q4) and
s = |AUPRO(Q4) - AUPRO(Q1)| / max(AUPRO(Q1), AUPRO(Q4)). Where both are 0, s is taken as 0
(no difference between small and all defects), so rho = w.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def cumulative_quartile_sets(areas: np.ndarray) -> list[np.ndarray]:
    """Boolean selections over ``areas`` for Q1..Q4 (cumulative: Q1 subset of Q2 ... Q4 = all)."""
    areas = np.asarray(areas, dtype=np.float64)
    if areas.size == 0:
        return [np.zeros(0, dtype=bool) for _ in range(4)]
    limits = np.percentile(areas, [25.0, 50.0, 75.0])
    sets = [areas <= limit for limit in limits]
    sets.append(np.ones(areas.shape, dtype=bool))
    return sets


def robustness_rho(quartile_aupros: Sequence[float]) -> float:
    """rho = w * (1 - s) of L2BT Eq. (4) from AUPRO(Q1..Q4); NaN when any input is NaN."""
    if len(quartile_aupros) != 4:
        raise ValueError(f"rho needs the four quartile AUPROs, got {len(quartile_aupros)}")
    values = [float(v) for v in quartile_aupros]
    if any(math.isnan(v) for v in values):
        return float("nan")
    weight = sum(values) / 4.0
    q1, q4 = values[0], values[3]
    largest = max(q1, q4)
    sensitivity = abs(q4 - q1) / largest if largest > 0 else 0.0
    return weight * (1.0 - sensitivity)
