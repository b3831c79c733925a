"""HiAD detector assignment (paper Sec. III-C): which detector of the pool scores which patch.

* ``a2o`` all patches -> one detector.
* ``o2o`` one detector per patch position (the reference code's A2O/O2O docstrings are
  swapped; these names follow the paper).
* ``na``  M contiguous spatial neighbourhoods (blocks of positions).
* ``sca`` KMeans over per-position mean features (mean over training images of each
  position's mean-pooled patch feature, L2-normalised): positions that look alike share one.
* ``ra``  KMeans over all training patch features (mean-pooled, raw L2 as in the paper); at
  test time each patch goes to its nearest centroid, wherever it lies: the multi-class mode.

Everything is fitted on training images only; the result is a small state saved with the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hrad.errors import ArtifactError, ConfigError
from hrad.hiad_math import nearest_centroid
from hrad.seeds import seed_bits

POSITIONAL = ("a2o", "o2o", "na", "sca")


def neighbourhood_labels(rows: int, cols: int, count: int) -> np.ndarray:
    """Split a ``rows x cols`` position grid into ``count`` contiguous blocks (row-major labels).

    Prefers an ``a x b = count`` block layout whose blocks are closest to square; when no such
    layout fits the grid, cuts the row-major (serpentine) order into ``count`` runs.
    """
    if count > rows * cols:
        raise ConfigError(
            f"hiad: {count} neighbourhoods requested but the image has only {rows * cols} patch positions"
        )
    best: tuple[float, int, int] | None = None
    for block_rows in range(1, count + 1):
        if count % block_rows:
            continue
        block_cols = count // block_rows
        if block_rows > rows or block_cols > cols:
            continue
        mismatch = abs(np.log((rows / block_rows) / (cols / block_cols)))
        if best is None or mismatch < best[0]:
            best = (mismatch, block_rows, block_cols)
    labels = np.zeros((rows, cols), dtype=np.int64)
    if best is not None:
        _, block_rows, block_cols = best
        for bi, row_ids in enumerate(np.array_split(np.arange(rows), block_rows)):
            for bj, col_ids in enumerate(np.array_split(np.arange(cols), block_cols)):
                labels[np.ix_(row_ids, col_ids)] = bi * block_cols + bj
        return labels.reshape(-1)
    order = [(r, c if r % 2 == 0 else cols - 1 - c) for r in range(rows) for c in range(cols)]
    for label, run in enumerate(np.array_split(np.arange(len(order)), count)):
        for index in run:
            labels[order[index]] = label
    return labels.reshape(-1)


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _kmeans(data: np.ndarray, count: int, seed: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer distinct clusters" is handled by compaction
        from sklearn.cluster import KMeans  # fit-time only: sklearn costs ~1 s of every command's start

        model = KMeans(n_clusters=count, n_init=10, random_state=seed_bits(seed, 32)).fit(np.asarray(data, dtype=np.float64))
    return model.cluster_centers_


@dataclass
class Assignment:
    """A fitted assignment: position labels (positional kinds) or centroids (``ra``)."""

    kind: str
    count: int
    position_labels: np.ndarray | None = None  # P
    centroids: np.ndarray | None = None  # M x C

    def assign(self, positions: np.ndarray, descriptors: np.ndarray | None) -> np.ndarray:
        """Detector index per patch from position indices (and mean-pooled features for ``ra``)."""
        if self.kind == "a2o":
            return np.zeros(len(positions), dtype=np.int64)
        if self.kind == "ra":
            if descriptors is None or self.centroids is None:
                raise RuntimeError("retrieval assignment needs patch descriptors and centroids")
            return nearest_centroid(descriptors, self.centroids)
        if self.position_labels is None:
            raise RuntimeError("positional assignment has no position labels")
        return self.position_labels[np.asarray(positions, dtype=np.int64)]

    def state_dict(self) -> dict[str, Tensor]:
        state = {"count": torch.tensor(self.count, dtype=torch.int64)}
        if self.position_labels is not None:
            state["labels"] = torch.from_numpy(np.ascontiguousarray(self.position_labels, dtype=np.int64))
        if self.centroids is not None:
            state["centroids"] = torch.from_numpy(np.ascontiguousarray(self.centroids, dtype=np.float64))
        return state

    @classmethod
    def from_state(cls, kind: str, state: dict[str, Tensor]) -> Assignment:
        if "count" not in state:
            raise ArtifactError(
                "hiad artifact has no assignment.count; it is incomplete or from another version"
            )
        labels = state["labels"].numpy() if "labels" in state else None
        centroids = state["centroids"].numpy() if "centroids" in state else None
        if (kind == "ra" and centroids is None) or (kind != "ra" and labels is None):
            raise ArtifactError(f"hiad artifact lacks the state of its {kind} assignment")
        return cls(kind, int(state["count"]), labels, centroids)


def fit_assignment(
    kind: str,
    count: int,
    grid_shape: tuple[int, int],
    descriptors: list[np.ndarray],
    seed: int = 0,
) -> Assignment:
    """Fit ``kind`` with (up to) ``count`` detectors.

    ``grid_shape``: patch rows x cols (positional kinds need one grid for all images);
    ``descriptors``: per training image, its patches' mean-pooled features (``P x C``).
    Clusters KMeans leaves empty (duplicate data) are dropped, so the pool may end smaller.
    """
    rows, cols = grid_shape
    positions = rows * cols
    if kind == "a2o":
        return Assignment(kind, 1, np.zeros(positions, dtype=np.int64))
    if kind == "o2o":
        return Assignment(kind, positions, np.arange(positions, dtype=np.int64))
    if kind in ("na", "sca") and count > positions:
        raise ConfigError(
            f"hiad: num_detectors={count} is larger than the {positions} patch positions ({rows}x{cols}); "
            "lower num_detectors or the patch size"
        )
    if kind == "na":
        return Assignment(kind, count, neighbourhood_labels(rows, cols, count))
    if kind == "sca":
        mean_per_position = l2_normalise(np.mean(np.stack(descriptors), axis=0))
        centroids = _kmeans(mean_per_position, count, seed)
        labels = nearest_centroid(mean_per_position, centroids)
        used, compact = np.unique(labels, return_inverse=True)
        return Assignment(kind, len(used), compact.astype(np.int64))
    if kind == "ra":
        data = np.concatenate(descriptors)
        if count > len(data):
            raise ConfigError(f"hiad: num_detectors={count} is larger than the {len(data)} training patches")
        centroids = _kmeans(data, count, seed)
        used = np.unique(nearest_centroid(data, centroids))
        return Assignment(kind, len(used), None, centroids[used])
    raise ConfigError(f"hiad: unknown assignment {kind!r}; known: a2o, o2o, na, sca, ra")
