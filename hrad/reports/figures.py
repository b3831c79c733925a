"""Pictures people look at instead of reading numbers: case grids of the best and worst results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@dataclass
class Case:
    """One evaluated image reduced to thumbnails for a report."""

    name: str
    label: int
    score: float
    image: np.ndarray  # h x w x 3 thumbnail in [0, 1]
    anomaly_map: np.ndarray  # h x w thumbnail
    mask: np.ndarray | None  # h x w bool thumbnail


def thumbnail(array: np.ndarray, long_side: int = 320) -> np.ndarray:
    """Area-downscaled copy whose long side is at most ``long_side``."""
    import cv2

    height, width = array.shape[:2]
    scale = min(1.0, long_side / max(height, width))
    if scale == 1.0:
        return array.copy()
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if array.dtype == bool:
        return cv2.resize(array.astype(np.uint8), size, interpolation=cv2.INTER_AREA) > 0
    return cv2.resize(array.astype(np.float32), size, interpolation=cv2.INTER_AREA)


def select_cases(cases: Sequence[Case], count: int) -> dict[str, list[Case]]:
    """Worst cases (missed anomalies, highest-scored normals) and best (most confident hits)."""
    anomalous = sorted((c for c in cases if c.label == 1), key=lambda c: c.score)
    normal = sorted((c for c in cases if c.label == 0), key=lambda c: -c.score)
    return {
        "worst: lowest-scored anomalous": anomalous[:count],
        "worst: highest-scored normal": normal[:count],
        "best: highest-scored anomalous": anomalous[::-1][:count],
    }


def case_grid(
    groups: dict[str, list[Case]], path: Path, vmax: float | None = None, title: str = "", vmin: float | None = None
) -> Path:
    """One row per case: image with ground-truth contour, anomaly map, overlay; maps share ``vmin .. vmax``
    (default: 0, or the lowest map value when maps go negative, .. the highest)."""
    rows = [(group, case) for group, members in groups.items() for case in members]
    height = max(1, len(rows))
    # constrained layout leaves room for the suptitle (tight_layout let it overlap the first row's titles)
    figure, axes = plt.subplots(height, 3, figsize=(9, 2.6 * height), squeeze=False, layout="constrained")
    scale = vmax if vmax is not None else max((float(c.anomaly_map.max()) for _, c in rows), default=1.0)
    low = vmin if vmin is not None else min([0.0, *(float(c.anomaly_map.min()) for _, c in rows)])
    if not scale > low:
        scale = low + 1.0
    for row, (group, case) in enumerate(rows):
        image_axis, map_axis, overlay_axis = axes[row]
        marked = case.mask is not None and bool(case.mask.any())
        image_axis.imshow(np.clip(case.image, 0, 1))
        if marked:
            image_axis.contour(case.mask, levels=[0.5], colors="lime", linewidths=0.8)
        image_axis.set_title(f"{group}\n{case.name}", fontsize=7)
        map_axis.imshow(case.anomaly_map, cmap="inferno", vmin=low, vmax=scale)
        map_axis.set_title(f"score {case.score:.3g} (label {case.label})", fontsize=7)
        overlay_axis.imshow(np.clip(case.image, 0, 1))
        overlay_axis.set_title("overlay (ground truth in white)" if marked else "overlay", fontsize=7)
        overlay_axis.imshow(case.anomaly_map, cmap="jet", alpha=0.45, vmin=low, vmax=scale)
        if marked:
            overlay_axis.contour(case.mask, levels=[0.5], colors="white", linewidths=0.8)
        for axis in (image_axis, map_axis, overlay_axis):
            axis.axis("off")
    if not rows:
        axes[0][0].text(0.5, 0.5, "no cases", ha="center")
        for axis in axes[0]:
            axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
