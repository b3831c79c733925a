"""Tiled ensemble (Rolih et al., "Divide and Conquer"): one detector per tile location.

The (optionally resized) image is cut into a fixed grid of tiles; the detector of location
``i`` is trained only on tile ``i`` of every training image, so it specialises on that part of
the object. At test time every tile goes to its own detector, tile maps are upsampled to tile
resolution, merged with pixel-wise averaging of overlaps, smoothed around the seams and resized
back to the input's resolution; the image score is the mean (paper) or max of the tile scores.

Memory is bounded by one tile model, not by the number of tiles (the reference implementation
keeps all of them in RAM): fit spills every training image's tile embeddings to disk in the
pool strategies' one format (:mod:`hrad.strategies.spill`, shared with HiAD), fits the locations
as jobs, one after another or on a runner (worker processes, Ray), and each job writes its
fitted state to a temporary safetensors file; predict loads tile models one at a time, from those
files or lazily from the artifact's :class:`~hrad.strategies.base.StateReader`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import Tensor

from hrad.detectors.base import Detector, DetectorConfig, detector_class
from hrad.errors import ArtifactError, ConfigError, HradError, InputError, named
from hrad.features.base import Embedder, FeatureExtractor
from hrad.imaging import resize
from hrad.postprocess.seams import smooth_seams
from hrad.prediction import check_ensemble_size
from hrad.progress import ProgressCallback, no_progress
from hrad.runners import active_runner
from hrad.strategies.base import (
    AnomalyResult,
    ImageSource,
    StateReader,
    Strategy,
    StrategyConfig,
    image_name,
    sub_state,
)
from hrad.strategies.pixels import TileSource, working_image
from hrad.strategies.spill import ChunkRef, FeatureSpill, FitJob, fit_detectors, job_devices, run_fit_job
from hrad.strategies.tiling import ContextEmbedder, ContextTilingConfig, TileGrid, TileMerger, TilePosition


class TiledEnsembleConfig(ContextTilingConfig):
    """Tiled ensemble options (paper setups: ENS4 = 512 image, tile 256, stride 256; ENS9 = stride 128)."""

    name: Literal["tiled-ensemble"] = "tiled-ensemble"
    #: resize every image to this size before tiling (square unless ``keep_aspect``); None = native
    image_size: int | None = Field(default=None, gt=0)
    #: with ``image_size``: scale the long side to ``image_size`` and keep the aspect ratio
    keep_aspect: bool = False
    #: tile side in pixels (after image_size)
    tile: int = Field(default=256, gt=0)
    #: tile stride; smaller than ``tile`` = overlapping tiles (stacking ensemble); None = ``tile``
    stride: int | None = Field(default=None, gt=0)
    #: image score from tile scores: "mean" (paper default) or "max" (better for tiny defects,
    #: which the mean over many clean tiles dilutes)
    score_merge: Literal["mean", "max"] = "mean"
    #: blur the map across tile seams
    seam_smoothing: bool = True
    #: half-width of the smoothed band, as a fraction of the tile size, on each side of a seam
    seam_band: float = Field(default=0.1, ge=0.0, le=0.5)
    #: Gaussian sigma (pixels) of the seam smoothing
    seam_sigma: float = Field(default=2.0, gt=0.0)
    #: put maps on one scale from held-out good images (``calibrate``): per tile model, or on
    #: the merged image map; never from test data
    normalization: Literal["none", "tile", "image"] = "none"
    #: "minmax": (x - min) / (max - min); "zscore": (x - mean) / std (validation statistics)
    normalization_stat: Literal["minmax", "zscore"] = "minmax"
    #: fit tile locations in this many worker processes (spawned); results equal serial fitting
    workers: int = Field(default=1, ge=1)
    #: tile models kept loaded between predictions (LRU); 1 = load, use and drop each model
    resident_tiles: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check_geometry(self) -> TiledEnsembleConfig:
        if self.stride is not None and self.stride > self.tile:
            raise ConfigError(f"tiled-ensemble stride {self.stride} is larger than the tile {self.tile}")
        if self.image_size is not None and self.image_size < self.tile:
            raise ConfigError(
                f"tiled-ensemble image_size {self.image_size} is smaller than the tile {self.tile}"
            )
        return self

    @property
    def tile_stride(self) -> int:
        return self.tile if self.stride is None else self.stride


@dataclass(frozen=True)
class _Geometry:
    """Sizes fixed at fit time: the training input size and the working (tiled) size."""

    input_size: tuple[int, int]
    work_size: tuple[int, int]

    def as_tensor(self, tile: int, stride: int) -> Tensor:
        return torch.tensor([*self.input_size, *self.work_size, tile, stride], dtype=torch.int64)


def working_size(config: TiledEnsembleConfig, height: int, width: int) -> tuple[int, int]:
    """Size an ``height x width`` input is tiled at."""
    if config.image_size is None:
        return height, width
    if not config.keep_aspect:
        return config.image_size, config.image_size
    scale = config.image_size / max(height, width)
    return max(config.tile, round(height * scale)), max(config.tile, round(width * scale))


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an H x W x 3 RGB image, got an array of shape {image.shape}")


class _TileSource:
    """Where fitted tile states live: temporary files after ``fit``, or an artifact reader."""

    def __init__(self, count: int, directory: Path | None = None, reader: StateReader | None = None) -> None:
        self.count, self.directory, self.reader = count, directory, reader

    def path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"tile_{index}.safetensors"

    def load(self, index: int) -> dict[str, Tensor]:
        if self.directory is not None:
            return load_file(self.path(index))
        assert self.reader is not None
        state = sub_state(self.reader, f"tiles.{index}")
        if not state:
            raise ArtifactError(f"tile model {index} missing from artifact")
        return state


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class TiledEnsemble(Strategy):
    """One detector per tile location; merged maps at the input's own resolution."""

    config: TiledEnsembleConfig
    synthesises_anomalies = True

    def __init__(self, config: StrategyConfig, detector: DetectorConfig, extractor: FeatureExtractor) -> None:
        if not isinstance(config, TiledEnsembleConfig):
            config = TiledEnsembleConfig.model_validate(config.model_dump())
        super().__init__(config, detector, extractor)
        self.detector_type = detector_class(detector.name)
        self.embedder = Embedder(extractor, self.detector_type.embedding_spec(detector, extractor))
        self.detector_config = self.detector_type.bind_layout(detector, self.embedder.layer_channels)
        self.tiles = ContextEmbedder(self.embedder, config.tile, config.tile, config.resolve_context(extractor))
        self._geometry: _Geometry | None = None
        self._tiles: _TileSource | None = None
        self._spill: FeatureSpill | None = None
        self._normalization: dict[str, Tensor] = {}
        self._cache: OrderedDict[int, Detector] = OrderedDict()
        #: tile models loaded right now, and the most that were loaded at once (memory-bound check)
        self.resident_models = 0
        self.max_resident_models = 0
        #: how many times a tile model was built (fit) or loaded (predict), for cache checks
        self.models_loaded = 0

    # ------------------------------------------------------------------ geometry
    @property
    def grid(self) -> TileGrid:
        return self._grid(self._require_fitted())

    def _grid(self, geometry: _Geometry) -> TileGrid:
        stride = self.config.tile_stride
        return self.tiles.grid(*geometry.work_size, stride, stride, self.config.tile_edge)

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        """With ``image_size``, a fitted ensemble resizes every image to its fitted working size
        (its tile models are bound to that grid), with ``keep_aspect`` too: an image of another
        aspect is stretched to it, not resized to the working size its own aspect would give."""
        fitted = self.working_size if self.config.image_size is not None else None
        working_height, working_width = fitted or working_size(self.config, height, width)
        return working_height / height, working_width / width

    def fitted_image_size(self) -> tuple[int, int] | None:
        """The training ``(H, W)`` when inputs must match it (``image_size`` None), else None."""
        if self._geometry is None or self.config.image_size is not None:
            return None
        return self._geometry.input_size

    @property
    def working_size(self) -> tuple[int, int] | None:
        """``(H, W)`` the tiles are cut from (after any ``image_size`` resize)."""
        return None if self._geometry is None else self._geometry.work_size

    def _require_fitted(self) -> _Geometry:
        if self._geometry is None:
            raise RuntimeError("tiled-ensemble strategy is not fitted or loaded")
        return self._geometry

    def check_input(self, image: np.ndarray) -> None:
        """Without ``image_size``, only the fitted size: one tile model per tile position."""
        _check_image(image)
        height, width = image.shape[:2]
        geometry = self._require_fitted()
        if self.config.image_size is None:
            check_ensemble_size(image, geometry.input_size)
        if min(height, width) < 1:
            raise InputError(f"image {width}x{height} is empty")

    def _prepare(self, image: np.ndarray, geometry: _Geometry) -> TileSource:
        """Image (any pixel type) -> padded ``3 x H x W`` image at working size, windows converted to
        float as they are cut; refuses inputs it cannot tile (:meth:`check_input`)."""
        self.check_input(image)
        return self._grid(geometry).pad(working_image(image, geometry.work_size))  # hrad.imaging.resize's rule

    def _check_tileable(self, height: int, width: int) -> None:
        tile = self.config.tile
        work_h, work_w = working_size(self.config, height, width)
        if work_h < tile or work_w < tile:
            raise InputError(f"image {work_w}x{work_h} is smaller than the tile {tile}x{tile}")

    # ------------------------------------------------------------------ fit
    def fit(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:
        if len(images) == 0:
            raise InputError("tiled-ensemble: no training images")
        self._release_all()
        self.resident_models = self.max_resident_models = self.models_loaded = 0
        self._normalization = {}
        first = images[0]
        _check_image(first)
        self._check_tileable(*first.shape[:2])
        geometry = _Geometry(tuple(first.shape[:2]), working_size(self.config, *first.shape[:2]))  # type: ignore[arg-type]
        self._geometry = geometry
        grid = self.grid
        # the spill directory also holds the fitted tile states until a save or the next fit
        self._spill = FeatureSpill(prefix="hrad-ensemble-")
        chunks = self._spill_embeddings(images, geometry, grid, self._spill, progress)
        self._fit_locations(chunks, self._spill.root, progress)
        for path in chunks:
            Path(path).unlink()
        self._tiles = _TileSource(len(grid), directory=self._spill.root)

    def _spill_embeddings(
        self, images: ImageSource, geometry: _Geometry, grid: TileGrid, spill: FeatureSpill, progress: ProgressCallback
    ) -> list[str]:
        """Embed every training tile once: one chunk per image, ``tiles x C x h x w`` (row = tile
        index), filled ``batch_size`` tile embeddings at a time."""
        chunks: list[str] = []
        positions = list(grid.positions())
        batch = self.config.batch_size
        rule = self.detector_type.image_anomalies(self.detector_config)
        synthesiser = None if rule is None else rule.synthesiser(self.tiles.tile_size, self.device)
        for image_index in range(len(images)):
            image = images[image_index]
            _check_image(image)
            if self.config.image_size is None:
                try:
                    check_ensemble_size(image, geometry.input_size, set_by=image_name(images, 0, "training image"))
                except InputError as error:
                    raise InputError(f"{image_name(images, image_index, 'training image')}: {error}") from None
            padded = self._prepare_training(image, geometry, grid)
            rows: np.memmap | None = None
            for start in range(0, len(positions), batch):
                part = positions[start : start + batch]
                windows = grid.windows(padded, part).to(self.device)
                embedded = self.tiles.training_rows(windows, grid.margin, synthesiser).float().cpu().numpy()
                if rows is None:
                    path, rows = spill.create((len(positions), *embedded.shape[1:]))
                    chunks.append(path)
                for offset, position in enumerate(part):
                    rows[position.index] = embedded[offset]
            assert rows is not None
            rows.flush()
            del rows
            progress(image_index + 1, len(images), "embedding training tiles")
        return chunks

    def _prepare_training(self, image: np.ndarray, geometry: _Geometry, grid: TileGrid) -> TileSource:
        return grid.pad(working_image(image, geometry.work_size))  # hrad.imaging.resize's rule

    def _fit_locations(self, chunks: list[str], directory: Path, progress: ProgressCallback) -> None:
        """One job per tile location: its row of every image's chunk, ``batch_size`` images per
        batch; each job writes the fitted state to ``tile_<index>.safetensors``."""
        count = len(self.grid)
        source = _TileSource(count, directory=directory)
        jobs = [
            FitJob(
                self.detector_type,
                self.detector_config,
                tuple(ChunkRef(path, (position.index,)) for path in chunks),
                device,
                self.config.batch_size,
                str(source.path(position.index)),
                f"tile ({position.row}, {position.col})",  # its workers' log lines and bars
            )
            for position, device in zip(self.grid.positions(), job_devices(count, "cpu"), strict=True)
        ]
        workers = min(self.config.workers, count)
        if workers <= 1 and active_runner() is None:
            for done, job in enumerate(jobs, start=1):
                self._count_resident(+1)
                try:
                    run_fit_job(job)
                finally:
                    self._count_resident(-1)
                progress(done, count, "fitting tile models")
            return
        # each worker holds one tile model at a time
        self.max_resident_models = max(self.max_resident_models, workers)
        self.models_loaded += count
        fit_detectors(jobs, workers, 1, lambda done, total: progress(done, total, "fitting tile models"))

    # ------------------------------------------------------------------ tile models
    def _count_resident(self, change: int) -> None:
        self.resident_models += change
        if change > 0:
            self.models_loaded += change
        self.max_resident_models = max(self.max_resident_models, self.resident_models)

    def _release_all(self) -> None:
        while self._cache:
            self._cache.popitem(last=False)
            self._count_resident(-1)

    def _acquire(self, index: int) -> Detector:
        """The detector of tile ``index``: from the LRU cache, else loaded (after evicting)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache.pop(index)
        while self._cache and len(self._cache) >= self.config.resident_tiles:
            self._cache.popitem(last=False)
            self._count_resident(-1)
        assert self._tiles is not None
        state = self._tiles.load(index)
        detector = self.detector_type(self.detector_config)
        self._count_resident(+1)
        try:
            detector.load_state_dict(state)
        except Exception:
            self._count_resident(-1)
            raise
        return detector

    def _release(self, index: int, detector: Detector) -> None:
        if self.config.resident_tiles > 1:
            self._cache[index] = detector
        else:
            self._count_resident(-1)

    def _location_groups(self, images: int) -> Iterator[list[TilePosition]]:
        """Tile locations in groups whose windows over ``images`` images fill one backbone batch
        (one location per group once ``images`` reaches ``batch_size``)."""
        positions = list(self.grid.positions())
        per_group = max(1, self.config.batch_size // max(1, images))
        for start in range(0, len(positions), per_group):
            yield positions[start : start + per_group]

    def _location_outputs(self, padded: Sequence[TileSource]) -> Iterator[tuple[TilePosition, Tensor, Tensor]]:
        """For every tile location: upsampled maps ``B x tile x tile`` and scores ``B`` of all images.

        The backbone is shared by all locations, so the windows of several locations (all images,
        location-major) go through it together, ``batch_size`` at a time: one image of an ENS4
        ensemble is one batch of 4 windows, not 4 batches of one. Each tile model is then loaded
        once per call, scores its location's embeddings and is released before the next one.
        Memory: the embeddings of one group, at most ``max(batch_size, len(padded))`` tiles.
        """
        grid = self.grid
        batch = self.config.batch_size
        count = len(padded)
        for group in self._location_groups(count):
            pairs = [(position, image) for position in group for image in padded]
            parts = []
            for start in range(0, len(pairs), batch):
                windows = torch.stack([grid.window(image, position) for position, image in pairs[start : start + batch]])
                parts.append(self.tiles(windows.to(self.device)))
            embedded = torch.cat(parts)
            for offset, position in enumerate(group):
                embeddings = embedded[offset * count : (offset + 1) * count]
                detector = self._acquire(position.index)
                try:
                    maps, scores = [], []
                    for start in range(0, count, batch):
                        output = detector.predict(embeddings[start : start + batch])
                        maps.append(output.maps.float().cpu())
                        scores.append(output.scores.float().cpu().reshape(-1))
                finally:
                    self._release(position.index, detector)
                    del detector
                upsampled = resize(torch.cat(maps)[:, None], (grid.tile_h, grid.tile_w))[:, 0]
                yield position, upsampled, torch.cat(scores)

    # ------------------------------------------------------------------ predict
    def predict(self, image: np.ndarray) -> AnomalyResult:
        return self.predict_many([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[AnomalyResult]:
        """:meth:`predict_many`: each tile model loaded once for all ``images``, and one
        location's windows of several images share backbone batches."""
        return self.predict_many(images)

    def predict_many(self, images: Sequence[np.ndarray]) -> list[AnomalyResult]:
        """Predict several images loading each tile model once (results equal :meth:`predict`)."""
        geometry = self._require_fitted()
        mode = self.config.normalization
        if mode != "none" and not self._normalization:
            raise ConfigError(
                f"tiled-ensemble normalization {mode!r} needs calibrate() with held-out good images before predict"
            )
        if not images:
            return []
        padded = [self._prepare(image, geometry) for image in images]
        maps, tile_scores = self._merged_raw(padded, normalize_tiles=mode == "tile")
        results = []
        for image, merged, scores in zip(images, maps, tile_scores, strict=True):
            score = float(scores.mean() if self.config.score_merge == "mean" else scores.max())
            if mode == "image":
                merged = self._normalize(merged, "map", None)
                score = float(self._normalize(np.array([score]), "score", None)[0])
            # float32 before the full-size resize; no copy when the map is already at the image's size
            merged = np.ascontiguousarray(merged, dtype=np.float32)
            full = resize(torch.from_numpy(merged)[None, None], tuple(image.shape[:2]))
            anomaly_map = full[0, 0].numpy()
            results.append(AnomalyResult(anomaly_map, score, {"tile_scores": scores.astype(np.float32)}))
        return results

    def _merged_raw(
        self, padded: Sequence[TileSource], normalize_tiles: bool
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Merged (and seam-smoothed) maps at working size plus per-tile scores of each image.

        Tile maps stream into one :class:`TileMerger` per image (overlaps averaged).
        """
        grid = self.grid
        mergers = [TileMerger(grid) for _ in padded]
        tile_scores = np.zeros((len(padded), len(grid)))
        for position, tile_maps, scores in self._location_outputs(padded):
            maps_np, scores_np = tile_maps.double().numpy(), scores.double().numpy()
            if normalize_tiles:
                maps_np = self._normalize(maps_np, "map", position.index)
                scores_np = self._normalize(scores_np, "score", position.index)
            for merger, tile_map in zip(mergers, maps_np, strict=True):
                merger.add(position, tile_map)
            tile_scores[:, position.index] = scores_np
        merged = []
        for merger in mergers:
            image_map = merger.result()[0]
            if self.config.seam_smoothing:
                image_map = smooth_seams(image_map, grid, self.config.seam_band, self.config.seam_sigma, inplace=True)
            merged.append(image_map)
        return merged, list(tile_scores)

    # ------------------------------------------------------------------ normalization
    def _normalize(self, values: np.ndarray, kind: str, index: int | None) -> np.ndarray:
        shift = self._normalization[f"{kind}_shift"].double().numpy()
        scale = self._normalization[f"{kind}_scale"].double().numpy()
        position = 0 if index is None else index
        return (values - shift[position]) / scale[position]

    @property
    def needs_calibration(self) -> bool:
        return self.config.normalization != "none"

    def calibrate(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:
        """Normalisation statistics from held-out good images (per tile model or per merged map)."""
        mode = self.config.normalization
        if mode == "none":
            return
        geometry = self._require_fitted()
        if len(images) == 0:
            raise InputError(
                f"tiled-ensemble normalization {mode!r} needs held-out good images; the validation split is empty"
            )
        groups = len(self.grid) if mode == "tile" else 1
        statistics = _Statistics(groups)
        batch = self.config.batch_size
        for start in range(0, len(images), batch):
            padded = []
            for index in range(start, min(start + batch, len(images))):
                try:
                    padded.append(self._prepare(images[index], geometry))
                except HradError as error:
                    raise named(image_name(images, index, "held-out image"), error) from None
            if mode == "tile":
                # maps only need to be observed per tile; merging is not needed
                for position, tile_maps, scores in self._location_outputs(padded):
                    statistics.add(position.index, tile_maps.double().numpy(), scores.double().numpy())
            else:
                maps, tile_scores = self._merged_raw(padded, normalize_tiles=False)
                for merged, per_tile in zip(maps, tile_scores, strict=True):
                    score = per_tile.mean() if self.config.score_merge == "mean" else per_tile.max()
                    statistics.add(0, merged, np.array([score]))
            progress(min(start + batch, len(images)), len(images), "calibrating tile models")
        self._normalization = statistics.shift_scale(self.config.normalization_stat)

    # ------------------------------------------------------------------ state
    def _own_state(self) -> dict[str, Tensor]:
        geometry = self._require_fitted()
        state = {"ensemble.geometry": geometry.as_tensor(self.config.tile, self.config.tile_stride)}
        state.update({f"normalization.{key}": value for key, value in self._normalization.items()})
        return state

    def _tile_state(self, index: int) -> dict[str, Tensor]:
        assert self._tiles is not None
        return self._tiles.load(index)

    def state_dict(self) -> dict[str, Tensor]:
        """Everything, flat: ``ensemble.geometry``, ``normalization.*``, ``tiles.<index>.<key>``.

        This holds all tile models at once; :meth:`save_state_to` writes the same tensors to a
        safetensors file holding one tile model at a time.
        """
        state = self._own_state()
        for index in range(len(self.grid)):
            state.update({f"tiles.{index}.{key}": value for key, value in self._tile_state(index).items()})
        return state

    def save_state_to(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Stream :meth:`state_dict` into a safetensors file with one tile model in memory at a time.

        Reads each tile state twice (shapes for the header, then data) to keep memory bounded.
        """
        own = self._own_state()
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
            (k, v.dtype, tuple(v.shape)) for k, v in own.items()
        ]
        count = len(self.grid)
        for index in range(count):
            layout += [
                (f"tiles.{index}.{k}", v.dtype, tuple(v.shape)) for k, v in self._tile_state(index).items()
            ]
        header: dict[str, object] = {}
        offset = 0
        for key, dtype, shape in layout:
            if dtype not in _SAFETENSORS_DTYPES:
                raise ConfigError(f"cannot save tensor {key} of dtype {dtype} to safetensors")
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[key] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        if metadata:
            header["__metadata__"] = dict(metadata)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(path, "wb") as file:
            file.write(len(encoded).to_bytes(8, "little"))
            file.write(encoded)
            for value in own.values():
                file.write(_tensor_bytes(value))
            for index in range(count):
                state = self._tile_state(index)
                for value in state.values():
                    file.write(_tensor_bytes(value))
                del state

    def load_state(self, reader: StateReader) -> None:
        keys = reader.keys()
        if "ensemble.geometry" not in keys:
            raise ArtifactError("artifact has no tiled-ensemble geometry (ensemble.geometry)")
        values = [int(v) for v in reader.get("ensemble.geometry").tolist()]
        if len(values) != 6:
            raise ArtifactError(f"tiled-ensemble geometry has {len(values)} values, expected 6")
        input_h, input_w, work_h, work_w, tile, stride = values
        if (tile, stride) != (self.config.tile, self.config.tile_stride):
            raise ArtifactError(
                f"artifact tiles are {tile}px with stride {stride} but the config says {self.config.tile}px "
                f"with stride {self.config.tile_stride}"
            )
        self._release_all()
        self._geometry = _Geometry((input_h, input_w), (work_h, work_w))
        count = len(self.grid)
        present = {key.split(".")[1] for key in keys if key.startswith("tiles.")}
        missing = [index for index in range(count) if str(index) not in present]
        if missing:
            raise ArtifactError(f"tile model {missing[0]} missing from artifact")
        self._normalization = {
            key.removeprefix("normalization."): reader.get(key)
            for key in keys
            if key.startswith("normalization.")
        }
        groups = count if self.config.normalization == "tile" else 1
        if self.config.normalization != "none" and self._normalization:
            sizes = {value.numel() for value in self._normalization.values()}
            if sizes != {groups}:
                raise ArtifactError(
                    f"artifact normalization statistics do not fit normalization {self.config.normalization!r} "
                    f"({sorted(sizes)} values, expected {groups})"
                )
        self._tiles = _TileSource(count, reader=reader)
        self._spill = None


class _Statistics:
    """Streaming min / max / mean / std of maps and scores, per group (tile or whole image)."""

    def __init__(self, groups: int) -> None:
        self.low = {kind: np.full(groups, np.inf) for kind in ("map", "score")}
        self.high = {kind: np.full(groups, -np.inf) for kind in ("map", "score")}
        self.total = {kind: np.zeros(groups) for kind in ("map", "score")}
        self.squares = {kind: np.zeros(groups) for kind in ("map", "score")}
        self.count = {kind: np.zeros(groups) for kind in ("map", "score")}

    def add(self, group: int, maps: np.ndarray, scores: np.ndarray) -> None:
        for kind, values in (("map", maps), ("score", scores)):
            self.low[kind][group] = min(self.low[kind][group], float(values.min()))
            self.high[kind][group] = max(self.high[kind][group], float(values.max()))
            self.total[kind][group] += float(values.sum())
            self.squares[kind][group] += float(np.square(values).sum())
            self.count[kind][group] += values.size

    def shift_scale(self, stat: str) -> dict[str, Tensor]:
        """``(x - shift) / scale`` parameters; a degenerate spread (one image, flat maps) gets scale 1."""
        out: dict[str, Tensor] = {}
        for kind in ("map", "score"):
            if stat == "minmax":
                shift, spread = self.low[kind], self.high[kind] - self.low[kind]
            else:
                shift = self.total[kind] / self.count[kind]
                spread = np.sqrt(np.maximum(self.squares[kind] / self.count[kind] - shift**2, 0.0))
            scale = np.where(spread > 1e-12, spread, 1.0)
            out[f"{kind}_shift"] = torch.from_numpy(shift.astype(np.float64))
            out[f"{kind}_scale"] = torch.from_numpy(scale.astype(np.float64))
        return out
