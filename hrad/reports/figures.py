"""Pictures people look at instead of reading numbers: case grids of the best and worst results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hrad.data.images import text_bytes  # noqa: E402


@dataclass
class Case:
    """One evaluated image reduced to thumbnails for a report."""

    name: str
    label: int
    score: float
    image: np.ndarray  # h x w x 3 thumbnail in [0, 1]
    anomaly_map: np.ndarray  # h x w thumbnail
    mask: np.ndarray | None  # h x w bool thumbnail
    #: h x w bool thumbnail of the model's region of interest (Prediction.inspected); None: all of it
    inspected: np.ndarray | None = None


def select_cases(cases: Sequence[Case], count: int) -> dict[str, list[Case]]:
    """Worst cases (missed anomalies, highest-scored normals) and best (most confident hits). An
    image is shown once: with few anomalous test images the best ones are those the worst group
    left (3 of 4 were shown twice, as worst and as best). A group that takes its whole class is
    titled so ('every anomalous, lowest score first'): on a small test set 'worst' headed every
    row, the best-scored normal image among them."""
    anomalous = sorted((c for c in cases if c.label == 1), key=lambda c: c.score)
    normal = sorted((c for c in cases if c.label == 0), key=lambda c: -c.score)
    worst = anomalous[:count]
    return {
        "worst: lowest-scored anomalous" if len(anomalous) > count else "every anomalous, lowest score first": worst,
        "worst: highest-scored normal" if len(normal) > count else "every normal, highest score first": normal[:count],
        "best: highest-scored anomalous": anomalous[len(worst) :][::-1][:count],
    }


def case_caption(case: Case, threshold: float | None) -> str:
    """What a case is and what the image threshold decided of it, in words (cases.png's panels and
    report.html's captions): 'anomalous, score 2.21, above the threshold 1.15: flagged'. The model's
    rule: flagged when the score is above the threshold."""
    label = {0: "normal", 1: "anomalous"}.get(case.label, "unlabelled")
    caption = f"{label}, score {float(case.score):.4g}"
    if threshold is None:
        return caption
    flagged = case.score > threshold
    return caption + f", {'above' if flagged else 'at or below'} the threshold {threshold:.4g}: {'flagged' if flagged else 'passed'}"


def shown(name: str) -> str:
    """A file name as a picture can draw it: the bytes of a name that is not UTF-8 (held by Python
    as lone surrogates, which matplotlib refuses with a TypeError) as U+FFFD, as a terminal shows them."""
    return text_bytes(name).decode("utf-8", "replace")


#: image width / height above which a case's panels are stacked (a row of three would be slivers)
STACK_ASPECT = 2.0
#: figure widths (inches): three panels side by side; one stacked panel
SIDE_BY_SIDE_WIDTH = 9.0
STACKED_WIDTH = 12.0
#: panel height limits (inches): a very tall image's panel; the room for a panel's title
MAX_PANEL_HEIGHT = 6.0
PANEL_TITLE_HEIGHT = 0.45


def image_aspect(case: Case) -> float:
    """Width over height of the case's image: above :data:`STACK_ASPECT`, panels are stacked."""
    return case.image.shape[1] / case.image.shape[0]


def is_wide(case: Case) -> bool:
    """Whether the case's panels are stacked rather than set side by side (:data:`STACK_ASPECT`)."""
    return image_aspect(case) > STACK_ASPECT


#: the region of interest's outline in every picture of a prediction (as in predict's overlays)
INSPECTED_COLOR = "white"


def inspected_only(case: Case) -> np.ndarray:
    """The case's map with the part outside its region of interest masked (drawn as no heat)."""
    if case.inspected is None:
        return case.anomaly_map
    return np.ma.masked_where(~case.inspected, case.anomaly_map)


def show_inspected(axis: plt.Axes, case: Case, dim: bool = True) -> bool:
    """Draw the case's region of interest on a panel: outside darkened to half (``dim``; the map
    there should be drawn with :func:`inspected_only`) and its outline in :data:`INSPECTED_COLOR`,
    as :func:`hrad.data.images.mark_inspected` does in overlays, so "not inspected" does not read
    as "inspected and fine". Whether there was a region to draw."""
    inspected = case.inspected
    if inspected is None or inspected.all() or not inspected.any():
        return False
    if dim:
        shade = np.zeros((*inspected.shape, 4), dtype=np.float32)
        shade[~inspected, 3] = 0.5
        axis.imshow(shade)
    axis.contour(inspected, levels=[0.5], colors=INSPECTED_COLOR, linewidths=0.8)
    return True


def case_grid(
    groups: dict[str, list[Case]],
    path: Path,
    vmax: float | None = None,
    title: str = "",
    vmin: float | None = None,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> Path:
    """One row per case: image with ground-truth contour, anomaly map, overlay; maps share ``vmin .. vmax``
    (default: 0, or the lowest map value when maps go negative, .. the highest), which a colour
    bar under the maps and overlays shows, ``pixel_threshold`` marked on it: without it no one
    could tell what a colour meant, nor that the rows compare. A case with a
    region of interest has it outlined on every panel and the map and overlay dimmed outside.
    The map's title says what the image ``threshold`` decided (:func:`case_caption`)."""
    rows = [(group, case) for group, members in groups.items() for case in members]
    height = max(1, len(rows))
    # wide images (line-scan strips) get their three panels stacked, full width, instead of side
    # by side, where a 1:8 strip would be a sliver; rows are as tall as the images' shape needs
    aspect = float(np.median([image_aspect(c) for _, c in rows])) if rows else 1.0
    stacked = aspect > STACK_ASPECT
    panel_width = STACKED_WIDTH if stacked else SIDE_BY_SIDE_WIDTH / 3
    panel_height = min(panel_width / aspect, MAX_PANEL_HEIGHT) + PANEL_TITLE_HEIGHT
    shape = (3 * height, 1) if stacked else (height, 3)
    size = (panel_width, 3 * height * panel_height) if stacked else (SIDE_BY_SIDE_WIDTH, height * panel_height)
    # constrained layout leaves room for the suptitle (tight_layout let it overlap the first row's titles)
    figure, grid = plt.subplots(*shape, figsize=size, squeeze=False, layout="constrained")
    axes = grid.reshape(height, 3)
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
        image_axis.set_title(f"{group}\n{shown(case.name)}", fontsize=7)
        show_inspected(image_axis, case, dim=False)
        map_axis.imshow(inspected_only(case), cmap="inferno", vmin=low, vmax=scale)
        map_axis.set_title(case_caption(case, threshold).replace(", above", "\nabove").replace(", at or", "\nat or"), fontsize=7)
        show_inspected(map_axis, case)
        overlay_axis.imshow(np.clip(case.image, 0, 1))
        overlay_axis.imshow(inspected_only(case), cmap="jet", alpha=0.45, vmin=low, vmax=scale)
        region = show_inspected(overlay_axis, case)
        if marked:
            overlay_axis.contour(case.mask, levels=[0.5], colors="lime", linewidths=0.8)
        notes = [*(["ground truth in green"] if marked else []), *(["region inspected in white"] if region else [])]
        overlay_axis.set_title(f"overlay ({', '.join(notes)})" if notes else "overlay", fontsize=7)
        for axis in (image_axis, map_axis, overlay_axis):
            axis.axis("off")
    if rows:
        bar = figure.colorbar(
            plt.cm.ScalarMappable(plt.Normalize(low, scale), "inferno"), ax=list(axes[:, 1:].ravel()), location="bottom",
            shrink=0.8, aspect=40, pad=0.01, fraction=min(0.15, 0.25 / height),
        )
        bar.set_label("anomaly map value, one scale for every row (overlays: the same range in jet)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
        if pixel_threshold is not None and low <= pixel_threshold <= scale:
            bar.ax.axvline(pixel_threshold, color="cyan", linewidth=1.5)
            bar.ax.text(pixel_threshold, 1.15, f"pixel threshold {pixel_threshold:.4g}", transform=bar.ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=6)  # fmt: skip
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
