"""MRF-AD: training-free multi-resolution x multi-layer nearest-neighbour banks.

The image is resized to about ``pixel_budget`` pixels (aspect kept), then to each of
``scales`` (sides rounded to the backbone's input multiple) and embedded once per scale,
returning every layer in ``layers``. Each (layer, scale) pair owns a memory bank of all
training patch vectors; a test patch scores its L2 (or cosine) distance to its nearest
neighbour in the matching bank. Every map is upsampled bilinearly to the input's own
resolution and the maps are averaged (or max-fused). Low scales see the whole defect
(recognition), high scales draw its boundary (refinement); the average gets both.

This strategy owns its banks directly: the model's ``detector`` section is ignored.

Layer numbering. The paper takes "layers {7, 9, 11}" of a 12-block ViT-B, "after the MLP
block", without saying whether the count starts at 0. We read them as 1-based block outputs
(Hugging Face ``hidden_states[l]``), i.e. ``block7, block9, block11`` of our extractors (block
``i`` = output of the ``i``-th transformer block). ViT-S/14 also has 12 blocks and gets the
same three. Backbones of another depth get the same relative depths (``round(l * depth /
12)``; tiny-vit's 4 blocks -> ``block2, block3, block4``); CNNs get ``layer2, layer3``.

Bank size. With ``P`` = pixel budget, ``L`` layers, ``D`` channels and ``N`` images the banks
hold ``N * L * sum_s(s^2) * P / 14^2`` vectors (:func:`bank_bytes_estimate`). Defaults with
ViT-S (D = 384): ``sum_s s^2 = 1.35`` -> 34,400 vectors per image and layer, 103,000 per image;
for N = 300 that is 31.0 M vectors = 47.6 GB (44.3 GiB) in float32, 23.8 GB even in float16.
Resident memory is about twice the float32 size (:class:`~hrad.detectors.knn.NearestNeighbours`
keeps the bank and faiss its own copy), so full banks cannot fit 24 GiB. By default
(``max_bank_gib = 6``) each image's vectors are therefore reduced by a greedy k-center
coreset (:func:`image_coreset`) to the ratio that keeps the float32 banks under 6 GiB (0.135 for the case above; about 12 GiB
resident plus the backbone). The union of per-image coresets covers every training patch
within the largest per-image covering radius, so rare normal patterns survive, only
near-duplicates go. Small training sets (under the cap) keep every vector, as in the paper.
Banks are saved in float16 (``bank_dtype``) and indexes are built from the rounded values at
fit time as well, so a reloaded model predicts bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from hrad.detectors.base import DetectorConfig
from hrad.detectors.coreset import random_projection
from hrad.detectors.knn import IVF_CENTROIDS_SUFFIX, NearestNeighbours
from hrad.errors import ArtifactError, ConfigError
from hrad.features.base import FeatureExtractor
from hrad.imaging import resize
from hrad.postprocess.foreground import ForegroundMasker, PCAForegroundMasker
from hrad.postprocess.smoothing import top_fraction_mean
from hrad.progress import ProgressCallback, no_progress
from hrad.strategies.base import (
    AnomalyResult,
    ImageSource,
    StateReader,
    Strategy,
    StrategyConfig,
    sub_state,
)
from hrad.strategies.pixels import PixelImage, check_enlargement, resize_pixels
from hrad.strategies.tiled import round_to_multiple

#: the paper's layers of a 12-block ViT (1-based block outputs)
PAPER_BLOCKS = (7, 9, 11)
PAPER_DEPTH = 12
#: training images whose features fit the foreground PCA (it needs a sample, not everything)
FOREGROUND_FIT_IMAGES = 16


class MRFConfig(StrategyConfig):
    """MRF-AD: one nearest-neighbour bank per (layer, scale), maps fused at full resolution."""

    name: Literal["mrf"] = "mrf"
    #: the image is first resized to about this many pixels, aspect kept (None: native size)
    pixel_budget: int | None = Field(5_000_000, ge=196)
    #: image scales of the banks (fractions of the resized image)
    scales: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    #: backbone layers; empty = the paper's blocks 7, 9, 11 (or their relative depth)
    layers: tuple[str, ...] = ()
    #: "cosine" scores 1 - cos on L2-normalised vectors
    distance: Literal["l2", "cosine"] = "l2"
    #: maps of all (layer, scale) banks fused by mean or max
    fusion: Literal["mean", "max"] = "mean"
    #: nearest-neighbour index: exact, IVF-Flat, or chosen from the bank size
    index: Literal["auto", "exact", "ivf"] = "auto"
    #: IVF lists of each bank index
    nlist: int = Field(512, ge=1)
    #: IVF lists probed per query. 8: search 0.7 s vs 3.2 s per image at 32 (exact 5.4 s; backbone 24 s),
    #: recall@1 0.997, fused map within 3e-4 of exact (benchmarks/results/mrf_search.md)
    nprobe: int = Field(8, ge=1)
    #: keep this fraction of each image's vectors per bank (greedy k-center); None = see max_bank_gib
    coreset_ratio: float | None = Field(None, gt=0, le=1)
    #: without coreset_ratio, banks whose float32 size would exceed this get the ratio that fits
    max_bank_gib: float | None = Field(6.0, gt=0)
    #: how banks are saved in the artifact; indexes search float32 copies of the same values
    bank_dtype: Literal["float16", "float32"] = "float16"
    #: zero the distances of background patches (built-in PCA masker); off for textures
    foreground: bool = False
    #: image score: map max, or mean of the top_fraction of pixels
    score: Literal["max", "top-fraction"] = "max"
    #: fraction of the highest pixels averaged by score="top-fraction"
    top_fraction: float = Field(0.001, gt=0, le=1)

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("at least one scale is needed")
        if any(not 0 < scale <= 4 for scale in value):
            raise ValueError(f"scales must be in (0, 4], got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"scales repeat: {value}")
        return tuple(sorted(value))


def default_layers(extractor: FeatureExtractor) -> tuple[str, ...]:
    """The paper's blocks 7, 9, 11 of 12, mapped to the extractor's depth; CNNs: layer2, layer3."""
    names = list(extractor.layer_strides)
    blocks = [name for name in names if name.startswith("block")]
    if blocks:
        depth = len(blocks)
        chosen = sorted({min(depth, max(1, round(b * depth / PAPER_DEPTH))) for b in PAPER_BLOCKS})
        return tuple(f"block{index}" for index in chosen)
    return tuple(name for name in ("layer2", "layer3") if name in names) or (names[-1],)


def working_size(height: int, width: int, pixel_budget: int | None) -> tuple[int, int]:
    """``(H, W)`` with about ``pixel_budget`` pixels and the input's aspect ratio."""
    if pixel_budget is None:
        return height, width
    factor = math.sqrt(pixel_budget / (height * width))
    return max(1, round(height * factor)), max(1, round(width * factor))


def scaled_size(size: tuple[int, int], scale: float, multiple: int) -> tuple[int, int]:
    return round_to_multiple(round(size[0] * scale), multiple), round_to_multiple(round(size[1] * scale), multiple)


def bank_bytes_estimate(
    n_images: int, pixel_budget: int, scales: Sequence[float], n_layers: int, channels: int, patch: int = 14, bytes_per_value: int = 4
) -> int:
    """Bytes of all banks without reduction: ``N * L * sum(s^2) * P / patch^2 * D * bytes``."""
    tokens = sum(scale**2 for scale in scales) * pixel_budget / patch**2
    return int(n_images * n_layers * tokens * channels * bytes_per_value)


def image_coreset(vectors: Tensor, count: int, seed: int = 0, projection_dim: int = 128) -> Tensor:
    """Indices of ``count`` rows chosen by greedy k-center (farthest point first), in selection order.

    The same selection rule as :func:`hrad.detectors.coreset.greedy_coreset` (seeded random
    start, Johnson-Lindenstrauss projection to ``projection_dim``), done as a plain scan: one
    image's bank part is small (<= ~13k rows), where one matrix-vector product per selection
    is ~50x faster than the pruned search built for whole-dataset banks.
    """
    total = len(vectors)
    if count >= total:
        return torch.arange(total)
    points = vectors.float()
    if points.shape[1] > projection_dim:
        points = random_projection(points, projection_dim, seed=seed + 1)
    squared_norms = (points * points).sum(1)
    nearest = torch.full((total,), float("inf"))
    current = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
    selected = torch.empty(count, dtype=torch.long)
    for position in range(count):
        selected[position] = current
        distances = squared_norms - 2 * (points @ points[current]) + squared_norms[current]
        torch.minimum(nearest, distances, out=nearest)
        nearest[current] = 0  # rounding can leave a tiny positive self-distance
        current = int(torch.argmax(nearest))
    return selected


def bank_key(layer: str, scale: float) -> str:
    """State key of one bank: ``banks.<layer>.<scale>``."""
    return f"banks.{layer}.{scale:g}"


class MRFStrategy(Strategy):
    """Multi-resolution fusion of nearest-neighbour maps (training-free; ignores the detector config).

    ``foreground_masker`` may be replaced by any :class:`ForegroundMasker` before ``fit``
    (e.g. a segmentation network); the config flag ``foreground`` switches masking on.
    After ``fit``/``load_state``, :attr:`bank_report` lists each bank's size and index kind.
    """

    config: MRFConfig
    #: the detector config is ignored, so a synthesis it asks for is nothing to refuse
    synthesises_anomalies = True

    def __init__(self, config: StrategyConfig, detector: DetectorConfig, extractor: FeatureExtractor) -> None:
        super().__init__(config, detector, extractor)
        self.layers = tuple(self.config.layers) or default_layers(extractor)
        missing = [name for name in self.layers if name not in extractor.layer_strides]
        if missing:
            known = ", ".join(extractor.layer_strides)
            raise ConfigError(f"strategy mrf: backbone has no layer(s) {', '.join(missing)}; available: {known}")
        self.foreground_masker: ForegroundMasker = PCAForegroundMasker()
        self.indexes: dict[tuple[str, float], NearestNeighbours] = {}
        self.bank_report: list[dict[str, Any]] = []
        self.coreset_ratio: float | None = None

    # -- geometry and embedding ---------------------------------------------------------------
    @property
    def keys(self) -> list[tuple[str, float]]:
        return [(layer, scale) for layer in self.layers for scale in self.config.scales]

    @property
    def reference(self) -> tuple[str, float]:
        """(layer, scale) whose features drive the foreground mask: deepest layer, coarsest scale."""
        return self.layers[-1], self.config.scales[0]

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        base_height, base_width = working_size(height, width, self.config.pixel_budget)
        return base_height / height, base_width / width

    def scale_sizes(self, height: int, width: int) -> dict[float, tuple[int, int]]:
        """Input size of the backbone at each scale for an ``height x width`` image."""
        base = working_size(height, width, self.config.pixel_budget)
        return {scale: scaled_size(base, scale, self.extractor.input_multiple) for scale in self.config.scales}

    def _pyramid(self, image: np.ndarray) -> Iterator[tuple[float, Tensor, dict[str, Tensor]]]:
        """``(scale, resized 1x3xhxw image, {layer: 1 x C x h' x w'})`` from the coarsest scale up."""
        pixels = PixelImage(image, self.device)  # each scale read in bands of rows, never float whole
        for scale, size in self.scale_sizes(*image.shape[:2]).items():
            budget = f"strategy.pixel_budget {self.config.pixel_budget}"
            check_enlargement((image.shape[0], image.shape[1]), size, f"at scale {scale:g} of {budget}", "give a smaller strategy.pixel_budget")
            resized = resize_pixels(pixels, size)[None]
            with torch.no_grad():
                maps = self.extractor.extract(resized, self.layers)
            yield scale, resized, maps

    def _vectors(self, feature_map: Tensor) -> Tensor:
        """``1 x C x h x w`` -> ``h*w x C`` float32 on the CPU (unit length for cosine)."""
        vectors = feature_map[0].flatten(1).T.float()
        if self.config.distance == "cosine":
            vectors = F.normalize(vectors, dim=1)
        return vectors.cpu().contiguous()

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:
        total = len(images)
        storage = getattr(torch, self.config.bank_dtype)
        parts: dict[tuple[str, float], list[Tensor]] = {key: [] for key in self.keys}
        masker_features: list[Tensor] = []
        ratio = self.config.coreset_ratio
        for index in range(total):
            image = images[index]
            vectors: dict[tuple[str, float], Tensor] = {}
            for scale, _, maps in self._pyramid(image):
                for layer in self.layers:
                    vectors[(layer, scale)] = self._vectors(maps[layer])
                if self.config.foreground and scale == self.reference[1] and len(masker_features) < FOREGROUND_FIT_IMAGES:
                    masker_features.append(maps[self.reference[0]][0].float().cpu())
            if index == 0:
                ratio = self._resolve_ratio(vectors, total)
            for key, bank_part in vectors.items():
                if ratio is not None and ratio < 1:
                    keep = max(1, math.ceil(ratio * len(bank_part)))
                    bank_part = bank_part[image_coreset(bank_part, keep, seed=index)]
                parts[key].append(bank_part.to(storage))
            progress(index + 1, total, "embedding training images into the banks")
        self.coreset_ratio = ratio
        self.indexes = {}
        for key in self.keys:  # one bank at a time: its float16 parts are freed as its index is built
            self.indexes[key] = build_index(torch.cat(parts.pop(key)), self.config)
        self._report()
        if self.config.foreground:
            self.foreground_masker.fit(masker_features)

    def _resolve_ratio(self, first: dict[tuple[str, float], Tensor], total: int) -> float | None:
        """The explicit coreset ratio, or the one that keeps float32 banks under ``max_bank_gib``."""
        if self.config.coreset_ratio is not None:
            return self.config.coreset_ratio
        if self.config.max_bank_gib is None:
            return None
        estimate = sum(part.numel() * 4 for part in first.values()) * total
        limit = self.config.max_bank_gib * 2**30
        return None if estimate <= limit else limit / estimate

    @property
    def banks(self) -> dict[tuple[str, float], Tensor]:
        """Each bank as the float32 ``N x D`` tensor its index searches (values exactly as stored)."""
        return {key: index.bank for key, index in self.indexes.items()}

    def _report(self) -> None:
        stored_bytes = 2 if self.config.bank_dtype == "float16" else 4
        self.bank_report = [
            {
                "layer": layer,
                "scale": scale,
                "vectors": index.size,
                "dims": int(index.bank.shape[1]),
                "index": index.index_kind,
                "float32_mb": index.size * index.bank.shape[1] * 4 / 2**20,
                "stored_mb": index.size * index.bank.shape[1] * stored_bytes / 2**20,
                "coreset_ratio": self.coreset_ratio,
            }
            for (layer, scale), index in self.indexes.items()
        ]

    # -- predict ---------------------------------------------------------------------------------
    def distance_maps(self, image: np.ndarray) -> dict[tuple[str, float], Tensor]:
        """Per-(layer, scale) nearest-neighbour distance maps at feature resolution (``h x w``, CPU)."""
        if not self.indexes:
            raise RuntimeError("MRFStrategy.predict called before fit or load_state")
        out: dict[tuple[str, float], Tensor] = {}
        foreground: Tensor | None = None
        for scale, resized, maps in self._pyramid(image):
            if self.config.foreground and foreground is None:  # the coarsest scale comes first
                reference = maps[self.reference[0]]
                foreground = self.foreground_masker.mask(resized[0], reference[0]).float().cpu()
            for layer in self.layers:
                feature_map = maps[layer]
                height, width = feature_map.shape[-2:]
                distances = search(self.indexes[(layer, scale)], self._vectors(feature_map), self.config.distance)
                grid = distances.reshape(height, width)
                if foreground is not None:
                    keep = resize(foreground[None, None], (height, width))[0, 0] >= 0.5
                    grid = torch.where(keep, grid, torch.zeros_like(grid))
                out[(layer, scale)] = grid
        return out

    def predict(self, image: np.ndarray) -> AnomalyResult:
        height, width = image.shape[:2]
        fused = fuse_maps(list(self.distance_maps(image).values()), (height, width), self.config.fusion)
        full = fused.numpy().astype(np.float32, copy=False)
        if self.config.score == "max":
            score = float(full.max())
        else:
            score = top_fraction_mean(full, self.config.top_fraction)
        return AnomalyResult(anomaly_map=full, score=score, extras={"banks": self.bank_report})

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        storage = getattr(torch, self.config.bank_dtype)
        state: dict[str, Tensor] = {}
        for (layer, scale), index in self.indexes.items():
            key = bank_key(layer, scale)
            saved = index.state_dict(key)  # the bank and, for IVF, its centroids (loading skips the k-means)
            saved[key] = saved[key].to(storage)
            state.update(saved)
        if self.coreset_ratio is not None:
            state["coreset_ratio"] = torch.tensor(self.coreset_ratio, dtype=torch.float64)
        if self.config.foreground:
            state.update({f"foreground.{key}": value for key, value in self.foreground_masker.state_dict().items()})
        return state

    def load_state(self, reader: StateReader) -> None:
        present = set(reader.keys())
        missing = [bank_key(layer, scale) for layer, scale in self.keys if bank_key(layer, scale) not in present]
        if missing:
            raise ArtifactError(f"mrf artifact lacks bank(s) {', '.join(missing)} (saved with other layers or scales?)")
        self.indexes = {}
        for layer, scale in self.keys:
            key = bank_key(layer, scale)
            saved = {name: reader.get(name).float() for name in (key, key + IVF_CENTROIDS_SUFFIX) if name in present}
            self.indexes[(layer, scale)] = new_index(self.config).load_state_dict(saved, key)
        self.coreset_ratio = float(reader.get("coreset_ratio")) if "coreset_ratio" in present else None
        self._report()
        if self.config.foreground:
            self.foreground_masker.load_state_dict(sub_state(reader, "foreground"))


def fuse_maps(maps: Sequence[Tensor], size: tuple[int, int], fusion: Literal["mean", "max"]) -> Tensor:
    """Upsample ``h x w`` maps bilinearly to ``size`` and average (or max) them; returns ``H x W``.

    For the mean, maps on the same grid are summed before upsampling: bilinear interpolation
    is linear, so this equals upsampling each map, at a fraction of the full-size work.
    """
    if not maps:
        raise ValueError("no maps to fuse")
    if fusion == "max":
        result: Tensor | None = None
        for grid in maps:
            upsampled = resize(grid[None, None].float(), size)[0, 0]
            result = upsampled if result is None else torch.maximum(result, upsampled)
        assert result is not None
        return result
    sums: dict[tuple[int, int], Tensor] = {}
    for grid in maps:
        shape = (int(grid.shape[0]), int(grid.shape[1]))
        sums[shape] = sums[shape] + grid.float() if shape in sums else grid.float().clone()
    total = torch.zeros(size)
    for grid_sum in sums.values():
        total += resize(grid_sum[None, None], size)[0, 0]
    return total / len(maps)



def new_index(config: MRFConfig) -> NearestNeighbours:
    """An unfitted nearest-neighbour index (exact, or IVF-Flat for big banks with ``index="auto"``)."""
    return NearestNeighbours(index=config.index, nlist=config.nlist, nprobe=config.nprobe)


def build_index(bank: Tensor, config: MRFConfig) -> NearestNeighbours:
    """The bank's nearest-neighbour index."""
    return new_index(config).fit(bank.float())


def search(index: NearestNeighbours, queries: Tensor, distance: Literal["l2", "cosine"]) -> Tensor:
    """Nearest-neighbour distance of each query row: L2, or ``1 - cos`` (= L2^2 / 2 on unit vectors)."""
    distances, _ = index.search(queries, k=1)
    distances = distances[:, 0]
    return distances.square() / 2 if distance == "cosine" else distances
