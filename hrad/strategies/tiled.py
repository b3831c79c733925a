"""Uniform downsampling and tiling through one shared detector.

Both are the same computation: the image is (optionally) resized, covered by a grid of tiles
and every tile goes through one detector; ``downsample`` is the special case of a single tile
covering the resized image. Maps are upsampled to tile size, merged with overlap averaging and
resized back to the input's own resolution.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import psutil
import torch
from pydantic import Field, model_validator
from torch import Tensor

from hrad.data.anomalies import AnomalySynthesiser
from hrad.detectors.base import Detector, DetectorConfig, build_detector, detector_class
from hrad.features.base import Embedder, FeatureExtractor
from hrad.imaging import resize
from hrad.progress import ProgressCallback, no_progress
from hrad.strategies.base import (
    AnomalyResult,
    ImageSource,
    StateReader,
    Strategy,
    StrategyConfig,
    sub_state,
)
from hrad.strategies.pixels import TileSource, working_image
from hrad.strategies.spill import ChunkRef, FeatureSpill, read_chunk
from hrad.strategies.tiling import (
    ContextEmbedder,
    ContextTilingConfig,
    TileGrid,
    TileMerger,
    TilePosition,
    round_to_multiple,
)

logger = logging.getLogger(__name__)

#: fraction of the memory available when a fit starts that its feature cache may hold by default
FEATURE_CACHE_FRACTION = 0.25


class FeatureCacheConfig(StrategyConfig):
    """Where the frozen-feature cache of a multi-pass (several-epoch) detector's fit lives."""

    #: MiB of float16 training embeddings held in RAM; beyond it they go to disk (memory-mapped
    #: .npy chunks in a temporary directory, removed when the fit ends); 0 = all on disk;
    #: None = a quarter of the memory available when the fit starts
    feature_cache_mb: float | None = Field(None, ge=0)
    #: directory the cache spills into; None = the system's temporary directory
    work_dir: Path | None = None


class DownsampleConfig(FeatureCacheConfig):
    """The baseline: the whole image resized to ``image_size`` x ``image_size``."""

    name: Literal["downsample"] = "downsample"
    #: side the whole image is resized to (a square)
    image_size: int = Field(256, ge=16)
    #: pad to a square (edge replication) before resizing, and crop the padding off the map
    pad_to_square: bool = False
    #: image score: the detector's own score, or the max of the final map
    score: Literal["detector", "max"] = "detector"


class TiledConfig(ContextTilingConfig, FeatureCacheConfig):
    """Full-resolution tiles of ``tile`` pixels moved by ``stride`` through one shared detector."""

    name: Literal["tiled"] = "tiled"
    #: tile side in pixels
    tile: int = Field(256, ge=16)
    stride: int | None = None  # default: tile (no overlap)
    #: resize the whole image to this long side first (None = native resolution)
    image_size: int | None = None
    #: image score: the detector's own score (max over tiles), or the max of the final map
    score: Literal["detector", "max"] = "detector"

    @model_validator(mode="after")
    def _check_stride(self) -> TiledConfig:
        if self.stride is not None and not 0 < self.stride <= self.tile:
            raise ValueError(f"stride {self.stride} must be in 1..tile ({self.tile})")
        return self


def long_side_size(height: int, width: int, long_side: int | None) -> tuple[int, int]:
    """``height x width`` scaled so its long side is ``long_side`` (unchanged when None)."""
    if long_side is None:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare_image(
    image: np.ndarray, working_size: Callable[[int, int], tuple[int, int]], pad_to_square: bool, device: torch.device | str = "cpu"
) -> TileSource:
    """``H x W x 3`` image (any pixel type) -> the working-size ``3 x h x w`` image its tiles are cut from
    (edge-replicated to a square first if asked).

    Without a resize it stays in its own pixel type (:class:`~hrad.strategies.pixels.PixelImage`:
    each window becomes float as it is cut); a resize reads it in bands of rows
    (:func:`~hrad.strategies.pixels.resize_pixels`), so the float image at its own size is never held.
    """
    if pad_to_square:  # edge replication (the map is cropped back in predict_tiles)
        side = max(image.shape[:2])
        image = np.pad(image, ((0, side - image.shape[0]), (0, side - image.shape[1]), (0, 0)), mode="edge")
    return working_image(image, working_size(*image.shape[:2]), device=device)


#: the per-tile scoring collaborator of :func:`predict_tiles`: tile windows ``B x 3 x h x w`` at
#: image scale (context margin included) -> ``(maps B x h' x w', scores B)`` of the tiles alone
WindowScorer = Callable[[Tensor], tuple[Tensor, Tensor]]


def _unchanged(windows: Tensor) -> Tensor:
    return windows


class _TiledImage:
    """One image's tiled prediction in progress: its grid, its running map, its tile scores."""

    def __init__(self, height: int, width: int, grid: TileGrid) -> None:
        self.height, self.width = height, width
        self.grid = grid
        self.merger = TileMerger(grid)
        self.scores: list[Tensor] = []
        self.remaining = len(grid)

    def add(self, positions: Sequence[TilePosition], maps: Tensor, scores: Tensor) -> None:
        """Tile maps at feature resolution (``n x h' x w'``) and their scores, in position order."""
        upsampled = resize(maps[:, None].float(), (self.grid.tile_h, self.grid.tile_w))[:, 0].cpu().numpy()
        for position, tile_map in zip(positions, upsampled, strict=True):
            self.merger.add(position, tile_map)
        self.scores.append(scores.float().cpu().reshape(-1))
        self.remaining -= len(positions)

    def result(self, pad_to_square: bool, score: str) -> AnomalyResult:
        """Merge, crop any square padding, resize back to the image and score (all tiles added)."""
        height, width = self.height, self.width
        merged = torch.from_numpy(self.merger.result())[None]  # 1 x 1 x h x w
        if pad_to_square:  # undo pad_to_square: crop the padding before anything is scored
            side = merged.shape[-1]
            merged = merged[..., : math.ceil(side * height / max(height, width)), : math.ceil(side * width / max(height, width))]
        full = np.asarray(resize(merged, (height, width))[0, 0].numpy(), dtype=np.float32)  # the merger's map, not a copy
        best = float(torch.cat(self.scores).max()) if score == "detector" else float(full.max())
        return AnomalyResult(anomaly_map=full, score=best)


def predict_tiles_batch(
    images: Sequence[np.ndarray],
    score_embeddings: WindowScorer,
    *,
    embed: Callable[[Tensor], Tensor] = _unchanged,
    working_size: Callable[[int, int], tuple[int, int]],
    grid: Callable[[int, int], TileGrid],
    pad_to_square: bool,
    batch_size: int,
    score: str,
    device: torch.device | str = "cpu",
) -> list[AnomalyResult]:
    """The tiled prediction of several images around any per-tile scoring, each result as if
    predicted alone: resize, tile, score, merge, crop, resize back.

    The tile windows of all images form one stream, cut ``batch_size`` at a time across image
    boundaries (images of any size; windows all have the grid's window size) and ``embed``-ded
    batch by batch; the embeddings are concatenated until they reach the bytes of one batch of
    windows (or the images end) and scored by one ``score_embeddings`` call (PatchCore: one
    nearest-neighbour search for all those tiles). Maps are then split back to their images,
    merged, and each image is finished as soon as its last tile is in. Memory: one batch of
    windows, that much of embeddings, the working image being cut, and each image's map.
    ``embed`` defaults to nothing (``score_embeddings`` then scores windows, as an exported graph does).
    """
    jobs: dict[int, _TiledImage] = {}
    results: list[AnomalyResult | None] = [None] * len(images)

    def windows() -> Iterator[tuple[int, TilePosition, Tensor]]:
        for index, image in enumerate(images):
            source = prepare_image(image, working_size, pad_to_square, device)  # released after its last window
            tiles = grid(*source.shape[-2:])
            jobs[index] = _TiledImage(image.shape[0], image.shape[1], tiles)
            padded = tiles.pad(source)
            for position in tiles.positions():
                yield index, position, tiles.window(padded, position)

    pending: list[tuple[list[tuple[int, TilePosition]], Tensor]] = []
    pending_bytes = 0

    def score_pending() -> None:
        nonlocal pending_bytes
        owners = [owner for chunk, _ in pending for owner in chunk]
        maps, scores = score_embeddings(torch.cat([embeddings for _, embeddings in pending]))
        pending.clear()
        pending_bytes = 0
        start = 0
        while start < len(owners):  # split per image, in tile order
            index = owners[start][0]
            stop = start
            while stop < len(owners) and owners[stop][0] == index and stop - start < max(1, batch_size):
                stop += 1
            job = jobs[index]
            job.add([position for _, position in owners[start:stop]], maps[start:stop], scores[start:stop])
            if job.remaining == 0:  # finished: its merger is freed, its map kept
                results[index] = jobs.pop(index).result(pad_to_square, score)
            start = stop

    stream = windows()
    while True:
        chunk = list(itertools.islice(stream, max(1, batch_size)))
        if not chunk:
            break
        batch = torch.stack([window for _, _, window in chunk])
        limit = batch.element_size() * batch[0].numel() * max(1, batch_size)  # bytes of one full batch of windows
        embeddings = embed(batch)
        del batch
        pending.append(([(index, position) for index, position, _ in chunk], embeddings))
        del chunk
        pending_bytes += embeddings.element_size() * embeddings.numel()
        if pending_bytes >= limit:
            score_pending()
    if pending:
        score_pending()
    if any(result is None for result in results):
        raise RuntimeError("predict_tiles_batch: an image's tiles were not all scored")
    return [result for result in results if result is not None]


def predict_tiles(
    image: np.ndarray,
    score_windows: WindowScorer,
    *,
    working_size: Callable[[int, int], tuple[int, int]],
    grid: Callable[[int, int], TileGrid],
    pad_to_square: bool,
    batch_size: int,
    score: str,
    device: torch.device | str = "cpu",
) -> AnomalyResult:
    """:func:`predict_tiles_batch` of one image with ``score_windows`` scoring whole windows
    (:meth:`TiledStrategy.predict` with a replaced scorer, such as an exported graph)."""
    return predict_tiles_batch(
        [image], score_windows, working_size=working_size, grid=grid, pad_to_square=pad_to_square,
        batch_size=batch_size, score=score, device=device,
    )[0]


class TiledStrategy(Strategy):
    """One detector over the tiles of every (optionally resized) image.

    Subclasses say how big the working image is and how it is tiled; fit, predict and the
    merging are shared.
    """

    config: DownsampleConfig | TiledConfig
    #: tile windows -> the tiles' own embeddings (context margin cropped)
    tiles: ContextEmbedder
    synthesises_anomalies = True

    def __init__(self, config: StrategyConfig, detector: DetectorConfig, extractor: FeatureExtractor) -> None:
        super().__init__(config, detector, extractor)
        detector_type = detector_class(detector.name)
        self.embedder = Embedder(extractor, detector_type.embedding_spec(detector, extractor))
        self.detector_config = detector_type.bind_layout(detector, self.embedder.layer_channels)
        self.detector: Detector = build_detector(self.detector_config)

    # -- geometry (subclasses) ------------------------------------------------------------------
    def _working_size(self, height: int, width: int) -> tuple[int, int]:
        """Size the image is resized to before tiling."""
        raise NotImplementedError

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        if self._pad_to_square():  # padded to a square first, then resized
            height = width = max(height, width)
        working_height, working_width = self._working_size(height, width)
        return working_height / height, working_width / width

    def _tiles(self, height: int, width: int) -> tuple[TileGrid, ContextEmbedder]:
        """The tile grid over a working-size image and the embedder of its windows."""
        raise NotImplementedError

    def _pad_to_square(self) -> bool:
        return False

    def _tile_embeddings(
        self, image: np.ndarray, synthesiser: AnomalySynthesiser | None = None
    ) -> Iterator[tuple[TileGrid, list[TilePosition], Tensor]]:
        """``(grid, positions, B x C x h x w embeddings)`` of one image's tiles, a batch at a time
        (packed with image-space anomalies when a ``synthesiser`` is given:
        :meth:`ContextEmbedder.training_rows`)."""
        tensor = prepare_image(image, self._working_size, self._pad_to_square(), self.device)
        grid, tiles = self._tiles(*tensor.shape[-2:])
        for positions, windows in grid.batches(grid.pad(tensor), self.config.batch_size):
            yield grid, positions, tiles.training_rows(windows, grid.margin, synthesiser)

    def embed_image(self, image: np.ndarray, synthesiser: AnomalySynthesiser | None = None) -> Iterator[Tensor]:
        """Embedding batches (``B x C x h x w``) of all tiles of one image, in tile order.

        What fit and predict feed the detector (fit: with image-space anomalies packed in when the
        detector asked for them); public for analyses and benchmarks that need the backbone's
        output (timing it alone, building a bank by hand) without a detector.
        """
        for _, _, embeddings in self._tile_embeddings(image, synthesiser):
            yield embeddings

    # -- fit / predict ------------------------------------------------------------------------
    def fit(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:
        source = _EmbeddingSource(self, images, progress, cache=self.detector.multi_pass)
        try:
            self.detector.fit(source)
        finally:
            source.close()

    def score_embeddings(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """Tile embeddings -> the detector's ``(maps, scores)``."""
        output = self.detector.predict(embeddings)
        return output.maps, output.scores

    def score_windows(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """The per-tile scoring of :meth:`predict`: windows -> the detector's ``(maps, scores)``."""
        return self.score_embeddings(self.tiles(windows))

    def _grid(self, height: int, width: int) -> TileGrid:
        return self._tiles(height, width)[0]

    def predict(self, image: np.ndarray, score_windows: WindowScorer | None = None) -> AnomalyResult:
        """Tiled prediction; ``score_windows`` replaces the per-tile scoring (an exported graph)."""
        if score_windows is None:
            return self.predict_batch([image])[0]
        return predict_tiles(
            image,
            score_windows,
            working_size=self._working_size,
            grid=self._grid,
            pad_to_square=self._pad_to_square(),
            batch_size=self.config.batch_size,
            score=self.config.score,
            device=self.device,
        )

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[AnomalyResult]:
        """Several images at once (:func:`predict_tiles_batch`): their tile windows share backbone
        batches of ``batch_size``, and the detector scores the concatenated embeddings of several
        batches in one call (PatchCore: one nearest-neighbour search); each result equals
        :meth:`predict` of that image to float tolerance."""
        return predict_tiles_batch(
            images,
            self.score_embeddings,
            embed=self.tiles,
            working_size=self._working_size,
            grid=self._grid,
            pad_to_square=self._pad_to_square(),
            batch_size=self.config.batch_size,
            score=self.config.score,
            device=self.device,
        )

    def state_dict(self) -> dict[str, Tensor]:
        return {f"detector.{key}": value for key, value in self.detector.state_dict().items()}

    def load_state(self, reader: StateReader) -> None:
        self.detector.load_state_dict(sub_state(reader, "detector"))


class _EmbeddingSource:
    """Re-iterable embedding batches of all tiles of all training images.

    Single-pass detectors get embeddings computed on the fly; multi-pass detectors (several
    epochs over the batches) get them computed once and cached in float16 on the host: in RAM
    up to ``feature_cache_mb`` (default a quarter of the available memory), the batches beyond
    it in a temporary directory (``work_dir``) as float16 ``.npy`` chunks that every epoch reads
    back memory-mapped (:mod:`hrad.strategies.spill`'s format), removed by :meth:`close`. Both
    give the detector the same float32 values, batch for batch.
    """

    def __init__(self, strategy: TiledStrategy, images: ImageSource, progress: ProgressCallback, cache: bool) -> None:
        self.strategy = strategy
        self.images = images
        self.progress = progress
        self.cache: list[Tensor | ChunkRef] | None = [] if cache else None
        self._cached = False
        config = strategy.config
        assert isinstance(config, FeatureCacheConfig)
        self.work_dir = config.work_dir
        megabytes = config.feature_cache_mb
        #: bytes of float16 embeddings the cache may hold in RAM
        self.budget = (
            int(FEATURE_CACHE_FRACTION * psutil.virtual_memory().available)
            if megabytes is None
            else int(megabytes * 2**20)
        )
        #: bytes held in RAM and written to disk
        self.held = self.spilled = 0
        self._spill: FeatureSpill | None = None

    def _store(self, batch: Tensor) -> Tensor | ChunkRef:
        half = batch.to("cpu", torch.float16)
        size = half.numel() * half.element_size()
        if self._spill is None and self.held + size <= self.budget:
            self.held += size
            return half
        if self._spill is None:
            parent = None if self.work_dir is None else str(self.work_dir)
            self._spill = FeatureSpill(parent, prefix="hrad-cache-")
            logger.info(
                "feature cache over its %.1f MiB budget: spilling the rest to %s",
                self.budget / 2**20,
                self._spill.root,
            )
        self.spilled += size
        return ChunkRef(self._spill.write(half))

    def close(self) -> None:
        """Remove the spilled chunks and drop the cache."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self.cache is not None:
            self.cache.clear()
        self._cached = False

    def _compute(self) -> Iterator[Tensor]:
        total = len(self.images)
        strategy = self.strategy
        rule = strategy.detector.image_anomalies(strategy.detector_config)
        # restarted with every pass: the same anomalies whether the batches are cached or not
        synthesiser = None if rule is None else rule.synthesiser(strategy.tiles.tile_size, strategy.device)
        for index in range(total):
            yield from strategy.embed_image(self.images[index], synthesiser)
            self.progress(index + 1, total, "embedding training images")

    def __iter__(self) -> Iterator[Tensor]:
        if self.cache is None:
            yield from self._compute()
            return
        if not self._cached:
            for batch in self._compute():
                self.cache.append(self._store(batch))
            self._cached = True
        device = self.strategy.device
        for item in self.cache:
            half = item if isinstance(item, Tensor) else torch.from_numpy(read_chunk(item))
            yield half.to(device, torch.float32)


class DownsampleStrategy(TiledStrategy):
    """Uniform downsampling of the whole image (the low-resolution baseline): one tile."""

    config: DownsampleConfig

    def __init__(self, config: StrategyConfig, detector: DetectorConfig, extractor: FeatureExtractor) -> None:
        super().__init__(config, detector, extractor)
        side = round_to_multiple(self.config.image_size, extractor.input_multiple)
        self.side = side
        self.tiles = ContextEmbedder(self.embedder, side, side, context=0)

    def _working_size(self, height: int, width: int) -> tuple[int, int]:
        return self.side, self.side

    def _tiles(self, height: int, width: int) -> tuple[TileGrid, ContextEmbedder]:
        return TileGrid.square(height, width, self.side), self.tiles

    def _pad_to_square(self) -> bool:
        return self.config.pad_to_square


class SharedTileStrategy(TiledStrategy):
    """Full-resolution tiles, each seen with its context margin, through one shared detector."""

    config: TiledConfig

    def __init__(self, config: StrategyConfig, detector: DetectorConfig, extractor: FeatureExtractor) -> None:
        super().__init__(config, detector, extractor)
        cfg = self.config
        self.tiles = ContextEmbedder(self.embedder, cfg.tile, cfg.tile, cfg.resolve_context(extractor))

    def _working_size(self, height: int, width: int) -> tuple[int, int]:
        return long_side_size(height, width, self.config.image_size)

    def _tiles(self, height: int, width: int) -> tuple[TileGrid, ContextEmbedder]:
        stride = self.config.stride or self.config.tile
        return self.tiles.grid(height, width, stride, stride, self.config.tile_edge), self.tiles
