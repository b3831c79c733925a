"""Streaming pixel metrics at full resolution in bounded memory.

A test set of hundreds of 1500x1000 .. 8K maps holds billions of pixel scores; concatenating
them is not an option. :class:`PixelMetrics` instead maps every float32 score to a monotone
integer bin and accumulates, per bin, the number of normal and of anomalous pixels (plus a
sparse histogram per ground-truth region for AUPRO). Every curve is then computed over the bins
in descending order, with all pixels of one bin treated as ties (a straight, trapezoid segment).

Binning, the only approximation
    A float32 is turned into a uint32 whose unsigned order equals the float order (flip all
    bits of negatives, set the sign bit of positives); the bin is its top ``score_bits`` bits.
    With the default 24 bits (sign, 8 exponent bits, 15 mantissa bits) a bin spans a relative
    width of 2**-15 ~ 3e-5 of the score, and there are at most 2**24 bins (in practice a map in
    [0, 1] touches a few hundred thousand). Scores that fall into different bins are ordered
    exactly, so when no two distinct scores share a bin (e.g. distinct multiples of a power of
    two above the bin width) every metric equals the brute force over the concatenated pixels.
    ``score_bits=32`` keeps every float32 value apart: exact for any float32 map. The threshold
    that realises a bin is its lower edge: "bin >= b" is exactly "score >= lower_edge(b)".

Definitions (thresholds t run over every bin; a pixel is positive when score >= t)
    * Normal pixels: every pixel outside the ground-truth masks, including all pixels of normal
      images (mask None or all False). FPR(t) = normal positives / normal pixels.
    * Pixel AUROC: area under TPR(FPR) through (0, 0) with trapezoids; equals sklearn's
      ``roc_auc_score``. ``auroc(fpr_limit)`` integrates to ``fpr_limit`` only (linear
      interpolation at the limit) and divides by the limit (MVTec AD 2's AU-ROC_0.05); this is
      not sklearn's McClish-standardised ``max_fpr``.
    * Pixel AP: sum over thresholds of (recall step) x precision; equals sklearn's
      ``average_precision_score``.
    * Pixel F1-max: max over thresholds of 2TP / (2TP + FP + FN). ORACLE: the threshold is
      chosen with the test labels.
    * AUPRO: regions are the 8-connected components of each ground-truth mask (counted per
      image). PRO(t) = mean over regions of (region pixels with score >= t) / (region area).
      The PRO-vs-FPR polyline starts at (0, 0), has one vertex per threshold, is integrated
      with trapezoids from FPR 0 to the limit (linearly interpolated at the limit) and divided
      by the limit, so a perfect map scores 1. ``aupro_30`` / ``aupro_05`` use limits 0.3 / 0.05.
    * Size-aware AUPRO and rho: see :mod:`hrad.metrics.size_aware` (L2BT Sec. IV-A). FPR
      always runs over all normal pixels; only the regions averaged in PRO change.
    * SegF1 (MVTec AD 2): ``f1_at(t)`` = F1 over all pixels of the test set at threshold t.
      Thresholds passed as ``seg_thresholds`` are counted exactly per image; any other one is
      answered from the bins (exact when t is a bin lower edge).

Protocols: ``"full"`` (default) evaluates the maps as given. ``"hiad512"`` reproduces the HiAD
paper's evaluation: each map is resized bilinearly and each mask with nearest neighbour to
512 x 512 before accumulating (a defect that vanishes in the resize leaves a normal image).

Memory: the global histogram is stored in dense pages of 1024 bins allocated on first touch
(16 KiB each; a map in [0, 1] touches a few hundred pages), so adding more images with the same
score range does not grow it. The per-region histograms hold at most one entry per
(region, touched bin), which grows with the number of defects, not of images or pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from hrad.errors import ConfigError, InputError
from hrad.metrics.size_aware import cumulative_quartile_sets, robustness_rho

PROTOCOLS = ("full", "hiad512")
HIAD_EVAL_SIZE = 512
_SIGN_BIT = np.uint32(0x80000000)
_BLOCK_PIXELS = 1 << 22  # rows are binned in blocks of about this many pixels to bound temporaries


def sortable_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is the float32 order of ``values`` (-0.0 counts as +0.0)."""
    floats = np.asarray(values, dtype=np.float32) + np.float32(0.0)  # a fresh array; -0.0 + 0.0 = +0.0
    keys = floats.view(np.uint32)
    flip = (keys >> np.uint32(31)) * np.uint32(0x7FFFFFFF)
    flip |= _SIGN_BIT
    keys ^= flip
    return keys


def key_to_value(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`sortable_keys`: the float32 whose key is ``keys``."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where(keys & _SIGN_BIT, keys ^ _SIGN_BIT, ~keys).astype(np.uint32)
    return bits.view(np.float32)


def _histogram(bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique bins and their counts; a bincount when the bins span a small range (fast)."""
    if bins.size == 0:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64)
    low = int(bins.min())
    span = int(bins.max()) - low + 1
    if span <= max(bins.size, 1 << 16):
        counts = np.bincount((bins - np.uint32(low)).astype(np.intp, copy=False), minlength=span)
        present = np.flatnonzero(counts)
        return (present + low).astype(np.uint32), counts[present].astype(np.int64)
    unique, counts = np.unique(bins, return_counts=True)
    return unique, counts.astype(np.int64)


def normalised_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (0, 0), (x_i, y_i) from 0 to ``limit``, divided by ``limit``.

    ``x`` must be non-decreasing and reach at least ``limit``; the curve is linearly
    interpolated between the last vertex at or below the limit and the first one above it.
    """
    xs = np.concatenate(([0.0], np.asarray(x, dtype=np.float64)))
    ys = np.concatenate(([0.0], np.asarray(y, dtype=np.float64)))
    inside = int(np.searchsorted(xs, limit, side="right"))
    curve_x, curve_y = xs[:inside], ys[:inside]
    if inside < xs.size and curve_x[-1] < limit:
        x0, x1, y0, y1 = xs[inside - 1], xs[inside], ys[inside - 1], ys[inside]
        curve_x = np.append(curve_x, limit)
        curve_y = np.append(curve_y, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.trapezoid(curve_y, curve_x) / limit)


class _PagedHistogram:
    """Per-bin (normal, anomalous) counts, stored densely in pages of 1024 bins allocated on first touch.

    Adding one image's histogram is a fancy-index ``+=`` (no sort, no merge), and memory is
    16 bytes x 1024 per touched page, bounded by the score range, not by the number of images.
    """

    page_bits = 10

    def __init__(self) -> None:
        size = 1 << self.page_bits
        self._page_ids = np.zeros(0, np.int64)  # sorted
        self._page_slots = np.zeros(0, np.intp)  # row of each page in the count arrays
        self._normal = np.zeros((0, size), np.int64)
        self._anomalous = np.zeros((0, size), np.int64)
        self._n_pages = 0

    @property
    def nbytes(self) -> int:
        return int(
            self._page_ids.nbytes + self._page_slots.nbytes + self._normal.nbytes + self._anomalous.nbytes
        )

    def add(self, bins: np.ndarray, normal: np.ndarray | None, anomalous: np.ndarray | None) -> None:
        """Adds counts for ``bins`` (sorted, unique uint32)."""
        if bins.size == 0:
            return
        pages = (bins >> np.uint32(self.page_bits)).astype(np.int64)
        self._ensure_pages(pages[np.concatenate(([True], pages[1:] != pages[:-1]))])
        rows = self._page_slots[np.searchsorted(self._page_ids, pages)]
        flat = rows * (1 << self.page_bits) + (bins & np.uint32((1 << self.page_bits) - 1))
        if normal is not None:
            self._normal.reshape(-1)[flat] += normal
        if anomalous is not None:
            self._anomalous.reshape(-1)[flat] += anomalous

    def _ensure_pages(self, pages: np.ndarray) -> None:
        position = np.searchsorted(self._page_ids, pages)
        known = position < self._page_ids.size
        known[known] = self._page_ids[position[known]] == pages[known]
        new_pages = pages[~known]
        if new_pages.size == 0:
            return
        needed = self._n_pages + new_pages.size
        if needed > self._normal.shape[0]:
            capacity = max(needed, 2 * self._normal.shape[0], 16)
            for name in ("_normal", "_anomalous"):
                grown = np.zeros((capacity, 1 << self.page_bits), np.int64)
                grown[: self._n_pages] = getattr(self, name)[: self._n_pages]
                setattr(self, name, grown)
        ids = np.concatenate((self._page_ids, new_pages))
        slots = np.concatenate((self._page_slots, np.arange(self._n_pages, needed, dtype=np.intp)))
        order = np.argsort(ids, kind="stable")
        self._page_ids, self._page_slots, self._n_pages = ids[order], slots[order], needed

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Touched bins in ascending order with their normal and anomalous counts."""
        size = 1 << self.page_bits
        normal = self._normal[self._page_slots].reshape(-1)
        anomalous = self._anomalous[self._page_slots].reshape(-1)
        bins = ((self._page_ids[:, None] << self.page_bits) + np.arange(size)[None, :]).reshape(-1)
        touched = (normal != 0) | (anomalous != 0)
        return bins[touched].astype(np.uint32), normal[touched], anomalous[touched]


@dataclass(frozen=True)
class _Regions:
    """All regions' sparse histograms, concatenated; built lazily for curve computations."""

    areas: np.ndarray  # int64, one per region
    entry_region: np.ndarray  # intp, region of each histogram entry
    entry_bin_index: np.ndarray  # intp, index of each entry's bin in the global bin array
    entry_counts: np.ndarray  # int64


class PixelMetrics:
    """Accumulates anomaly maps and masks image by image; see the module docstring for definitions.

    ``add`` every test image (normal ones with ``mask=None``), then read ``result()``.
    """

    def __init__(
        self,
        protocol: str = "full",
        score_bits: int = 24,
        seg_thresholds: tuple[float, ...] | list[float] = (),
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"unknown pixel-metrics protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}"
            )
        if not 12 <= score_bits <= 32:
            raise ConfigError(f"score_bits must be between 12 and 32, got {score_bits}")
        self.protocol = protocol
        self.score_bits = score_bits
        self._shift = np.uint32(32 - score_bits)
        self._pixel_counts = _PagedHistogram()
        self._bins = np.zeros(0, np.uint32)  # the histogram's table, rebuilt after each add when read
        self._normal = np.zeros(0, np.int64)
        self._anomalous = np.zeros(0, np.int64)
        self._table_stale = False
        self._region_bins: list[np.ndarray] = []
        self._region_counts: list[np.ndarray] = []
        self._region_lengths: list[np.ndarray] = []
        self._region_areas: list[np.ndarray] = []
        self._regions_cache: _Regions | None = None
        self._seg_counts = {float(t): np.zeros(3, np.int64) for t in seg_thresholds}  # tp, fp, fn
        self.n_images = 0
        self.n_anomalous_images = 0

    # ------------------------------------------------------------------ accumulation

    def _to_bins(self, values: np.ndarray) -> np.ndarray:
        return sortable_keys(values) >> self._shift

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray | None = None, name: str | None = None) -> None:
        """Add one image: ``anomaly_map`` float H x W (higher = more anomalous), ``mask`` bool H x W or None."""
        where = name or "anomaly map"
        scores = np.asarray(anomaly_map)
        if scores.ndim != 2 or scores.size == 0:
            raise InputError(f"{where}: expected a non-empty H x W anomaly map, got shape {scores.shape}")
        scores = scores.astype(np.float32, copy=False)
        if np.isnan(scores.min()):  # min propagates NaN without a full-size temporary
            raise InputError(f"{where}: anomaly map contains NaN values")
        truth: np.ndarray | None = None
        if mask is not None:
            truth = np.asarray(mask)
            if truth.shape != scores.shape:
                raise InputError(
                    f"{where}: mask shape {truth.shape} differs from anomaly map shape {scores.shape}"
                )
            truth = truth.astype(bool, copy=False)
        if self.protocol == "hiad512":
            scores, truth = self._hiad_resize(scores, truth)
        if truth is not None and not truth.any():
            truth = None

        self._regions_cache = None
        self._table_stale = True
        self.n_images += 1
        self._add_all_pixels(scores)
        if truth is not None:
            self.n_anomalous_images += 1
            self._add_regions(scores, truth)
        self._count_seg_thresholds(scores, truth)

    @staticmethod
    def _hiad_resize(scores: np.ndarray, truth: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        size = (HIAD_EVAL_SIZE, HIAD_EVAL_SIZE)
        resized = cv2.resize(np.ascontiguousarray(scores), size, interpolation=cv2.INTER_LINEAR)
        if truth is None:
            return resized, None
        resized_mask = cv2.resize(truth.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        return resized, resized_mask

    def _add_all_pixels(self, scores: np.ndarray) -> None:
        """Counts every pixel as normal; ``_add_regions`` moves the anomalous ones over."""
        block_rows = max(1, _BLOCK_PIXELS // scores.shape[1])
        for top in range(0, scores.shape[0], block_rows):
            bins, counts = _histogram(self._to_bins(scores[top : top + block_rows]).ravel())
            self._pixel_counts.add(bins, counts, None)

    def _add_regions(self, scores: np.ndarray, truth: np.ndarray) -> None:
        rows, cols = np.flatnonzero(truth.any(axis=1)), np.flatnonzero(truth.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # labelling only the defects' box
        scores, truth = scores[box], truth[box]
        n_labels, labels = cv2.connectedComponents(truth.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        region_of_pixel = labels[truth].astype(np.uint64) - np.uint64(1)
        anomalous_bins = self._to_bins(scores[truth])
        bins, counts = _histogram(anomalous_bins)
        self._pixel_counts.add(bins, -counts, counts)
        keys = (region_of_pixel << np.uint64(32)) | anomalous_bins.astype(np.uint64)
        unique_keys, counts = np.unique(keys, return_counts=True)
        counts = counts.astype(np.int64)
        regions = (unique_keys >> np.uint64(32)).astype(np.intp)
        bins = (unique_keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        n_regions = n_labels - 1
        self._region_bins.append(bins)
        self._region_counts.append(counts)
        self._region_lengths.append(np.bincount(regions, minlength=n_regions).astype(np.int64))
        self._region_areas.append(np.bincount(regions, weights=counts, minlength=n_regions).astype(np.int64))

    def _count_seg_thresholds(self, scores: np.ndarray, truth: np.ndarray | None) -> None:
        n_true = 0 if truth is None else int(truth.sum())
        for threshold, counts in self._seg_counts.items():
            predicted = scores >= threshold
            n_predicted = int(predicted.sum())
            true_positives = 0 if truth is None else int(np.count_nonzero(predicted & truth))
            counts += (true_positives, n_predicted - true_positives, n_true - true_positives)

    def _refresh_table(self) -> None:
        """Rebuilds the sorted (bins, normal, anomalous) table after adds; cheap enough to do once per read."""
        if self._table_stale:
            self._bins, self._normal, self._anomalous = self._pixel_counts.table()
            self._table_stale = False

    # ------------------------------------------------------------------ inspection

    @property
    def n_bins(self) -> int:
        """Number of distinct score bins seen so far (size of the global histogram)."""
        self._refresh_table()
        return int(self._bins.size)

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the accumulator (paged histogram, its sorted table, region histograms)."""
        arrays: list[np.ndarray] = [self._bins, self._normal, self._anomalous]
        arrays += self._region_bins + self._region_counts + self._region_lengths + self._region_areas
        return self._pixel_counts.nbytes + int(sum(a.nbytes for a in arrays))

    @property
    def region_areas(self) -> np.ndarray:
        """Pixel area of every ground-truth region, in the order added (select with it for ``aupro``)."""
        return np.concatenate(self._region_areas) if self._region_areas else np.zeros(0, np.int64)

    @property
    def n_regions(self) -> int:
        return int(sum(a.size for a in self._region_areas))

    def _regions(self) -> _Regions:
        self._refresh_table()
        if self._regions_cache is None:
            lengths = np.concatenate(self._region_lengths) if self._region_lengths else np.zeros(0, np.int64)
            bins = np.concatenate(self._region_bins) if self._region_bins else np.zeros(0, np.uint32)
            counts = np.concatenate(self._region_counts) if self._region_counts else np.zeros(0, np.int64)
            self._regions_cache = _Regions(
                areas=self.region_areas,
                entry_region=np.repeat(np.arange(lengths.size), lengths),
                entry_bin_index=np.searchsorted(self._bins, bins),
                entry_counts=counts,
            )
        return self._regions_cache

    def _descending_counts(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Cumulative (false positives, true positives) at each bin threshold, high to low."""
        self._refresh_table()
        false_positives = np.cumsum(self._normal[::-1])
        true_positives = np.cumsum(self._anomalous[::-1])
        n_normal = int(false_positives[-1]) if false_positives.size else 0
        n_anomalous = int(true_positives[-1]) if true_positives.size else 0
        return false_positives, true_positives, n_normal, n_anomalous

    # ------------------------------------------------------------------ metrics

    def auroc(self, fpr_limit: float | None = None) -> float:
        """Pixel AUROC; with ``fpr_limit`` the area up to that FPR divided by it (AU-ROC_0.05 of MVTec AD 2)."""
        limit = _check_limit(1.0 if fpr_limit is None else fpr_limit)
        false_positives, true_positives, n_normal, n_anomalous = self._descending_counts()
        if n_normal == 0 or n_anomalous == 0:
            return float("nan")
        return normalised_area(false_positives / n_normal, true_positives / n_anomalous, limit)

    def average_precision(self) -> float:
        false_positives, true_positives, _, n_anomalous = self._descending_counts()
        if n_anomalous == 0:
            return float("nan")
        recall = true_positives / n_anomalous
        precision = true_positives / (true_positives + false_positives)
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))

    def f1_max(self) -> tuple[float, float]:
        """ORACLE best pixel F1 and the threshold (score >= threshold) that reaches it."""
        false_positives, true_positives, _, n_anomalous = self._descending_counts()
        if n_anomalous == 0:
            return float("nan"), float("nan")
        f1 = 2 * true_positives / (true_positives + false_positives + n_anomalous)
        best = int(np.argmax(f1))
        best_bin = self._bins[self._bins.size - 1 - best]
        threshold = float(key_to_value(np.array([best_bin], dtype=np.uint32) << self._shift)[0])
        return float(f1[best]), (float("-inf") if np.isnan(threshold) else threshold)

    def f1_at(self, threshold: float) -> float:
        """SegF1 over all pixels at ``score >= threshold`` (exact for ``seg_thresholds``, else from the bins)."""
        true_positives, false_positives, false_negatives = self.counts_at(threshold)
        denominator = 2 * true_positives + false_positives + false_negatives
        return float("nan") if denominator == 0 else 2 * true_positives / denominator

    def decisions_at(self, threshold: float) -> dict[str, float]:
        """Pixel precision, recall and F1 of the decision ``score >= threshold`` over all pixels
        (a deployed pixel threshold's, not an oracle's; exact for ``seg_thresholds``)."""
        true_positives, false_positives, false_negatives = self.counts_at(threshold)
        predicted, actual = true_positives + false_positives, true_positives + false_negatives
        return {
            "precision": true_positives / predicted if predicted else float("nan"),
            "recall": true_positives / actual if actual else float("nan"),
            "f1": self.f1_at(threshold),
        }

    def counts_at(self, threshold: float) -> tuple[int, int, int]:
        """True positive, false positive and false negative pixels at ``score >= threshold``."""
        if float(threshold) in self._seg_counts:
            true_positives, false_positives, false_negatives = (
                int(v) for v in self._seg_counts[float(threshold)]
            )
        else:
            self._refresh_table()
            threshold_bin = (sortable_keys(np.array([threshold], dtype=np.float32)) >> self._shift)[0]
            above = self._bins >= threshold_bin
            true_positives = int(self._anomalous[above].sum())
            false_positives = int(self._normal[above].sum())
            false_negatives = int(self._anomalous.sum()) - true_positives
        return true_positives, false_positives, false_negatives

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel ``(fpr, tpr)`` from (0, 0), one vertex per bin threshold (high to low); empty
        arrays without normal or anomalous pixels."""
        false_positives, true_positives, n_normal, n_anomalous = self._descending_counts()
        if n_normal == 0 or n_anomalous == 0:
            return np.zeros(0), np.zeros(0)
        return (np.concatenate([[0.0], false_positives / n_normal]), np.concatenate([[0.0], true_positives / n_anomalous]))

    def pro_curve(self, components: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, pro)`` from (0, 0), one vertex per bin threshold: the polyline :meth:`aupro`
        integrates (``components`` as there); empty arrays when undefined."""
        fpr, pro = self._pro_polyline(components)
        if fpr is None or pro is None:
            return np.zeros(0), np.zeros(0)
        return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])

    def aupro(self, fpr_limit: float = 0.3, components: np.ndarray | None = None) -> float:
        """AUPRO to ``fpr_limit`` (normalised) over all regions or the ones selected by ``components``.

        ``components``: a boolean array over :attr:`region_areas` or integer region indices.
        """
        limit = _check_limit(fpr_limit)
        fpr, pro = self._pro_polyline(components)
        if fpr is None or pro is None:
            return float("nan")
        return normalised_area(fpr, pro, limit)

    def _pro_polyline(self, components: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        regions = self._regions()
        selected = np.ones(regions.areas.size, dtype=bool)
        if components is not None:
            chosen = np.asarray(components)
            if chosen.dtype == bool:
                if chosen.shape != selected.shape:
                    raise InputError(
                        f"components selects {chosen.size} regions but {selected.size} were added"
                    )
                selected = chosen
            else:
                selected = np.zeros_like(selected)
                selected[chosen.astype(np.intp)] = True
        false_positives, _, n_normal, _ = self._descending_counts()
        n_selected = int(selected.sum())
        if n_normal == 0 or n_selected == 0:
            return None, None
        keep = selected[regions.entry_region]
        overlap = regions.entry_counts[keep] / regions.areas[regions.entry_region[keep]]
        per_bin = np.bincount(regions.entry_bin_index[keep], weights=overlap, minlength=self._bins.size)
        pro = np.cumsum(per_bin[::-1]) / n_selected
        return false_positives / n_normal, pro

    def result(self) -> dict[str, float]:
        """Every pixel metric by name; NaN where undefined (no anomalous or no normal pixels)."""
        f1, _ = self.f1_max()
        out = {
            "pixel_auroc": self.auroc(),
            "pixel_auroc_05": self.auroc(0.05),
            "pixel_ap": self.average_precision(),
            "pixel_f1_max": f1,
        }
        quartiles = cumulative_quartile_sets(self.region_areas)
        for limit, tag in ((0.3, "30"), (0.05, "05")):
            values = [
                self.aupro(limit, selection) if selection.any() else float("nan") for selection in quartiles
            ]
            out[f"aupro_{tag}"] = values[3]
            for k, value in enumerate(values, start=1):
                out[f"aupro_{tag}_q{k}"] = value
            out[f"rho_{tag}"] = robustness_rho(values)
        return out


def _check_limit(limit: float) -> float:
    if not 0.0 < float(limit) <= 1.0:
        raise ConfigError(f"FPR limit must be in (0, 1], got {limit}")
    return float(limit)
