"""HiAD (Zhang et al.): dual-branch high-resolution anomaly detection with a detector pool.

High branch: the image is cut into patches (:class:`~hrad.strategies.tiling.TileGrid`), each
patch gets a multi-resolution fused feature (:mod:`.fusion`), the assignment (:mod:`.assignment`)
picks one detector of the pool for it, and the per-patch maps are merged back (overlaps
averaged). Low branch: the whole image, resized so its long side is ``low_res_size``, goes
through its own detector. Every detector and the low branch are min-max calibrated on held-out
good images plus pseudo-anomaly copies (:mod:`hrad.postprocess.calibration`) before the
element-wise max of the two branches is taken, so only like is compared with like. Before its
min-max, the low branch's map is divided by its own border ratios (``low_border_calibration``,
:mod:`hrad.postprocess.border`), learned from the same held-out good images: not in the paper;
the whole downsized image's frame is wider and stronger than the patches' and would otherwise
decide good images' scores after the max (``benchmarks/hiad_branch_border.py``). Optionally
(``balance_branches``, off by default), the branch whose held-out good images peak higher
(their mean image score by the score rule below) has its min-max range widened until both
branches' normal peaks agree: not in the paper either; min-max puts each branch's
pseudo-anomaly peak at 1, not its normal peaks level with the other's, so a branch whose good
images peak high decided good images' scores over the other's defects
(``benchmarks/hiad_image_score.py``). Measured at two seeds, it helped SCA pools on hrad's textures
both times, but hurt A2O on some textures at one seed
(``benchmarks/results/hiad_branch_balance_corners.md``, ``..._seed1.md``).

Post-processing follows the reference: image score = max of the 16 x 16 (stride 1)
average-pooled final map after a sigma-4 Gaussian blur (``score_sigma``). The returned map is
left unsmoothed by default (``smoothing_sigma=0``) because :class:`hrad.model.AnomalyModel`
blurs every strategy's map (its default sigma is the reference's 4) with the same function, so
the model's map and this score agree; set ``smoothing_sigma=4`` when using the strategy alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hrad import hiad_math
from hrad.data.anomalies import AnomalySynthesiser, cell_fractions, pad_to
from hrad.detectors.base import Detector, DetectorConfig, detector_class, pack_anomalies
from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.features.base import Embedder, FeatureExtractor
from hrad.hiad_math import (
    low_branch_size,
    maximum_upsampled,
    normalize_range,
    pooled_max,
    pooled_max_of_bands,
)
from hrad.imaging import resize, shrinks
from hrad.postprocess import device_maps
from hrad.postprocess.border import BorderProfile, BorderRatios, calibrate_border, ratio_table
from hrad.postprocess.calibration import MinMaxCalibration, paste_pseudo_anomalies
from hrad.postprocess.smoothing import MapScore, blurred_bands, gaussian_smooth
from hrad.prediction import check_pool_size
from hrad.progress import ProgressCallback, no_progress
from hrad.seeds import seed_bits
from hrad.strategies.base import (
    AnomalyResult,
    DeviceResult,
    ImageSource,
    StateReader,
    Strategy,
    image_name,
    sub_state,
    to_tensor,
)
from hrad.strategies.hiad.assignment import POSITIONAL, Assignment, fit_assignment
from hrad.strategies.hiad.config import HiADConfig
from hrad.strategies.hiad.fusion import (
    ImageLevels,
    MultiResolutionFusion,
    resize_level,
    resolve_fusion,
    to_device,
)
from hrad.strategies.pixels import PixelImage
from hrad.strategies.spill import ChunkRef, FeatureSpill, FitJob, fit_detectors, job_devices
from hrad.strategies.tiling import ContextEmbedder, TileGrid, TileMerger, TilePosition

#: patch maps upsampled to patch size at a time when merging the high branch
MERGE_CHUNK = 16


@dataclass
class RawOutput:
    """Uncalibrated branch outputs for one image (patches in any order: ``positions``, ``labels``
    and ``patch_maps`` agree; :meth:`HiAD.raw_outputs` gives them in grid order, on the CPU)."""

    grid: TileGrid
    positions: list[TilePosition]
    labels: np.ndarray  # detector per patch
    patch_maps: Tensor  # P x g x g raw detector maps
    low_map: Tensor | None  # h x w raw low-branch map

    def grid_labels(self) -> np.ndarray:
        """The detector of every patch, ``rows x cols`` in grid order."""
        labels = np.empty(len(self.positions), dtype=np.int64)
        labels[[p.index for p in self.positions]] = self.labels
        return labels.reshape(self.grid.rows, self.grid.cols)


class HiAD(Strategy):
    synthesises_anomalies = True
    #: predict's map work (calibration, merge, the low branch's upsampling, blur and score) in torch
    #: on the device the maps come from, one copy of the finished map to the host; None: where that
    #: device is not the CPU. On the CPU the default is the numpy path, which holds one full-size map
    #: (bands for the rest) where this one holds several (:meth:`predict_on_device`)
    device_maps: bool | None = None

    def __init__(self, config: HiADConfig, detector: DetectorConfig, extractor: FeatureExtractor) -> None:  # type: ignore[override]
        super().__init__(config, detector, extractor)
        self.config: HiADConfig = config
        self.detector_type: type[Detector] = detector_class(detector.name)
        self.embedder = Embedder(extractor, self.detector_type.embedding_spec(detector, extractor))
        self.detector_config = self.detector_type.bind_layout(detector, self.embedder.layer_channels)
        self.multiple = math.lcm(self.embedder.stride, extractor.input_multiple)
        if config.patch_size % self.multiple:
            raise ConfigError(
                f"hiad: patch_size {config.patch_size} is not a multiple of the embedding stride {self.multiple} "
                f"(layers {', '.join(self.embedder.spec.layers)})"
            )
        patch = config.patch_size
        self.tiles = ContextEmbedder(self.embedder, patch, patch, config.resolve_context(extractor))
        self._rates: tuple[int, ...] | None = None
        self._weights: tuple[float, ...] | None = None
        self._image_size: tuple[int, int] | None = None
        self._assignment: Assignment | None = None
        self._detectors: dict[int, Detector] = {}
        self._low: Detector | None = None
        self._calibration: MinMaxCalibration | None = None
        self._low_border: BorderRatios | None = None
        self._reader: StateReader | None = None

    # ------------------------------------------------------------------ geometry

    @property
    def positional(self) -> bool:
        return self.config.assignment in POSITIONAL and self.config.assignment != "a2o"

    @property
    def fitted(self) -> bool:
        return self._assignment is not None

    @property
    def detector_count(self) -> int:
        return 0 if self._assignment is None else self._assignment.count

    @property
    def calibration(self) -> MinMaxCalibration | None:
        """Per-detector (``high.<m>``) and low-branch (``low``) raw score ranges, once calibrated."""
        return self._calibration

    @property
    def low_border_ratios(self) -> BorderRatios | None:
        """The low branch's border ratios (per token from the low map's border, :mod:`hrad.postprocess.border`:
        a list by distance to the nearest side, or with ``low_border_corners`` a table by row and
        column distance) learned by :meth:`calibrate`; None when off, not learned, or its good maps
        have no frame."""
        return self._low_border

    def fitted_image_size(self) -> tuple[int, int] | None:
        return self._image_size if self.positional else None

    def _fusion(self) -> MultiResolutionFusion:
        assert self._rates is not None and self._weights is not None
        return MultiResolutionFusion(
            self.tiles,
            self.config.patch_size,
            self.config.patch_stride,
            self._rates,
            self._weights,
            self.config.batch_size,
            margin=self.tiles.margin,
            edge=self.config.tile_edge,
        )

    def _embed_low(self, image: Tensor | PixelImage) -> Tensor:
        size = low_branch_size(image.shape[-2], image.shape[-1], self.config.low_res_size, self.multiple)
        return self.embedder(resize_level(image, size)[None])

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        """The low branch's factors: it resizes the whole image to ``low_res_size`` (images of
        other sizes reach its detector at other scales); the high branch works at each image's
        own resolution, so without the low branch ``(1, 1)``."""
        if not self.config.low_branch:
            return 1.0, 1.0
        low_height, low_width = low_branch_size(height, width, self.config.low_res_size, self.multiple)
        return low_height / height, low_width / width

    def resizing(self) -> str:
        return f"the hiad strategy's low branch resizes every image to a long side of {self.config.low_res_size} (low_res_size)"

    def check_input(self, image: np.ndarray) -> None:
        self._check_size(image, "image")

    def _check_size(self, image: np.ndarray, what: str) -> None:
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"hiad: {what} has shape {image.shape}; expected H x W x 3")
        if self.positional and self._image_size is not None:
            check_pool_size(image, self._image_size, self.config.assignment, what)

    # ------------------------------------------------------------------ fit

    def fit(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:
        count = len(images)
        if count == 0:
            raise InputError("hiad: no training images")
        first = images[0]
        self._image_size = (int(first.shape[0]), int(first.shape[1]))
        self._rates, self._weights = resolve_fusion(
            self.config.fusion_rates, self.config.fusion_weights, *self._image_size, self.config.fusion_base
        )
        fusion = self._fusion()
        rule = self.detector_type.image_anomalies(self.detector_config)
        patch = self.config.patch_size
        synthesiser = None if rule is None else rule.synthesiser((patch, patch), self.device)
        with FeatureSpill(self.config.work_dir, prefix="hrad-hiad-") as spill:
            chunks: list[str] = []
            low_chunks: list[str] = []
            descriptors: list[np.ndarray] = []
            grid_shape = (0, 0)
            for index in range(count):
                image = first if index == 0 else images[index]
                self._check_size(image, image_name(images, index, "training image"))
                tensor = PixelImage(image, self.device)  # windows become float as they are cut
                positions, features = fusion.all_patches(tensor)
                grid = fusion.grid(image.shape[0], image.shape[1])
                grid_shape = (grid.rows, grid.cols) if index == 0 else grid_shape
                descriptors.append(features.mean(dim=(2, 3)).double().cpu().numpy())
                low = self._embed_low(tensor) if self.config.low_branch else None
                if synthesiser is not None:
                    features, low = self._with_anomalies(image, synthesiser, fusion, grid, positions, features, low)
                chunks.append(spill.write(features))
                if low is not None:
                    low_chunks.append(spill.write(low))
                progress(index + 1, count, "hiad: embedding training images")
            assignment = fit_assignment(
                self.config.assignment, self.config.num_detectors, grid_shape, descriptors, self.config.seed
            )
            jobs = self._fit_jobs(assignment, chunks, descriptors, low_chunks)
            progress(0, len(jobs), "hiad: fitting detectors")
            states = fit_detectors(
                jobs, self.config.workers, progress=lambda done, total: progress(done, total, "hiad: fitting detectors")
            )
        self._assignment = assignment
        self._detectors = {m: self._restore(states[m]) for m in range(assignment.count)}
        self._low = self._restore(states[-1]) if self.config.low_branch else None
        self._calibration = None
        self._low_border = None
        self._reader = None

    def _with_anomalies(
        self,
        image: np.ndarray,
        synthesiser: AnomalySynthesiser,
        fusion: MultiResolutionFusion,
        grid: TileGrid,
        positions: list[TilePosition],
        features: Tensor,
        low: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The patch (and low-branch) training rows with image-space anomalies: a corrupted copy of
        the whole image (Perlin periods counted per patch), fused and embedded like the image, packed
        with the clean rows and the mask's exact fraction per token of each patch / of the low grid
        (:func:`~hrad.detectors.base.pack_anomalies`). Memory: the image as float32 twice."""
        corrupted, masks = synthesiser(to_tensor(image, self.device))
        _, anomalous = fusion.all_patches(corrupted)
        patch = self.config.patch_size
        padded = pad_to(masks, grid.padded_height, grid.padded_width)[0]
        fractions = torch.stack(
            [
                cell_fractions(padded[None, p.y : p.y + patch, p.x : p.x + patch], features.shape[-2:])[0]
                for p in positions
            ]
        ).to(features.device)
        packed = pack_anomalies(features, anomalous, fractions)
        if low is None:
            return packed, None
        low_fractions = cell_fractions(masks, low.shape[-2:]).to(low.device)
        return packed, pack_anomalies(low, self._embed_low(corrupted), low_fractions)

    def _fit_jobs(
        self, assignment: Assignment, chunks: list[str], descriptors: list[np.ndarray], low_chunks: list[str]
    ) -> list[FitJob]:
        per_detector: list[list[ChunkRef]] = [[] for _ in range(assignment.count)]
        for path, image_descriptors in zip(chunks, descriptors, strict=True):
            positions = np.arange(len(image_descriptors))
            labels = assignment.assign(positions, image_descriptors)
            for m in np.unique(labels):
                per_detector[int(m)].append(
                    ChunkRef(path, tuple(int(i) for i in np.flatnonzero(labels == m)))
                )
        groups = [tuple(refs) for refs in per_detector]
        # what each job's worker log lines and bars are called
        pool = f"{assignment.kind}, {self.config.patch_size} px patches"
        names = [f"detector {m + 1}/{assignment.count} ({pool})" for m in range(assignment.count)]
        if self.config.low_branch:
            groups.append(tuple(ChunkRef(path) for path in low_chunks))
            names.append(f"low branch ({self.config.low_res_size} px)")
        devices = job_devices(len(groups), str(self.device))
        return [
            FitJob(self.detector_type, self.detector_config, refs, device, label=label)
            for refs, device, label in zip(groups, devices, names, strict=True)
        ]

    def _restore(self, state: dict[str, Tensor]) -> Detector:
        detector = self.detector_type(self.detector_config)
        detector.load_state_dict(state)
        return detector

    # ------------------------------------------------------------------ raw outputs

    def _detector(self, index: int) -> Detector:
        if index not in self._detectors:
            if self._reader is None:
                raise ArtifactError(f"hiad: detector {index} of the pool is missing")
            state = sub_state(self._reader, f"high.{index}")
            if not state:
                raise ArtifactError(
                    f"hiad artifact has no tensors for detector high.{index}; it is incomplete"
                )
            self._detectors[index] = self._restore(state)
        return self._detectors[index]

    def _low_detector(self) -> Detector:
        if self._low is None:
            state = sub_state(self._reader, "low") if self._reader is not None else {}
            if not state:
                raise ArtifactError(
                    "hiad artifact has no low-branch detector (low.*) although low_branch is on"
                )
            self._low = self._restore(state)
        return self._low

    def raw_outputs(self, image: np.ndarray) -> RawOutput:
        """Uncalibrated per-patch maps (grid order), their detectors and the raw low-branch map, on the CPU."""
        raw = self._device_outputs(image)
        order = np.argsort([p.index for p in raw.positions], kind="stable")
        return RawOutput(
            raw.grid,
            [raw.positions[i] for i in order],
            raw.labels[order],
            raw.patch_maps.cpu()[torch.from_numpy(order)],
            None if raw.low_map is None else raw.low_map.cpu(),
        )

    def _device_outputs(self, image: np.ndarray) -> RawOutput:
        """:meth:`raw_outputs` left on the features' device, patches grouped by detector: each
        detector of the pool predicts its patches of the image in batches of ``batch_size``
        (not one call per detector per chunk of the grid), and nothing waits for the device (but
        ``ra``'s descriptors, read per chunk: its labels depend on them)."""
        if self._assignment is None:
            raise ConfigError("hiad: fit() or load_state() must run before predicting")
        self._check_size(image, "image")
        tensor = PixelImage(image, self.device)  # windows become float as they are cut
        fusion = self._fusion()
        prepared = fusion.prepare(tensor)
        if self.config.assignment == "ra":
            positions, labels, maps = self._retrieved_patch_maps(fusion, prepared)
        else:
            positions, labels, maps = self._positional_patch_maps(fusion, prepared)
        low_map = None
        if self.config.low_branch:
            embedding = self._embed_low(tensor)  # a CPU index answers on the CPU: its map joins the others
            low_map = self._low_detector().predict(embedding).maps.detach().to(embedding.device, torch.float32)[0]
        return RawOutput(prepared.grid, positions, np.asarray(labels, dtype=np.int64), torch.cat(maps), low_map)

    def _positional_patch_maps(
        self, fusion: MultiResolutionFusion, prepared: ImageLevels
    ) -> tuple[list[TilePosition], list[int], list[Tensor]]:
        """Patches, labels and maps of a pool assigned by position: the labels are known before
        any feature, so each detector takes all its patches of the image in turn."""
        assert self._assignment is not None
        grid_positions = list(prepared.grid.positions())
        grid_labels = self._assignment.assign(np.array([p.index for p in grid_positions]), None)
        positions: list[TilePosition] = []
        labels: list[int] = []
        maps: list[Tensor] = []
        for m in np.unique(grid_labels):
            chosen = [grid_positions[i] for i in np.flatnonzero(grid_labels == m)]
            for start in range(0, len(chosen), fusion.batch_size):
                chunk = chosen[start : start + fusion.batch_size]
                features = fusion.fuse(prepared, chunk)
                maps.append(self._patch_maps(int(m), features))
                positions.extend(chunk)
                labels.extend([int(m)] * len(chunk))
        return positions, labels, maps

    def _retrieved_patch_maps(
        self, fusion: MultiResolutionFusion, prepared: ImageLevels
    ) -> tuple[list[TilePosition], list[int], list[Tensor]]:
        """Patches, labels and maps of a retrieval pool (``ra``): each chunk of the grid is fused,
        its descriptors read back (the one wait per chunk: the labels depend on them) and its
        patches scored by their nearest centroid's detector."""
        assert self._assignment is not None
        positions: list[TilePosition] = []
        labels: list[int] = []
        maps: list[Tensor] = []
        for chunk, features in fusion.batches(prepared):
            descriptors = features.mean(dim=(2, 3)).double().cpu().numpy()
            chunk_labels = self._assignment.assign(np.array([p.index for p in chunk]), descriptors)
            for m in np.unique(chunk_labels):
                selected = np.flatnonzero(chunk_labels == m)
                maps.append(self._patch_maps(int(m), features.index_select(0, to_device(selected, features.device))))
                positions.extend(chunk[i] for i in selected)
                labels.extend([int(m)] * len(selected))
        return positions, labels, maps

    def _patch_maps(self, index: int, features: Tensor) -> Tensor:
        """Detector ``index``'s float32 maps of fused patch features, on the features' device (a
        CPU index answers on the CPU)."""
        output = self._detector(index).predict(features)
        return output.maps.detach().to(features.device, torch.float32).reshape(len(features), *features.shape[-2:])

    # ------------------------------------------------------------------ calibration

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def map_score(self) -> MapScore | None:
        """The score is the pooled maximum of the returned map blurred at ``score_sigma`` while that
        map is unsmoothed (``smoothing_sigma`` 0, the default), so a border-calibrated map is scored
        again by the same rule; a map smoothed here already keeps the scaled score."""
        return MapScore(self.config.score_sigma, self.config.score_pool) if self.config.smoothing_sigma == 0 else None

    def calibrate(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:
        """Min-max statistics per detector and branch from held-out good images (+ pseudo-anomalies)."""
        if self._assignment is None:
            raise ConfigError("hiad: fit() must run before calibrate()")
        count = len(images)
        if count == 0:
            raise InputError("hiad: calibration needs at least one held-out good image; none were given")
        calibration = MinMaxCalibration()
        patch = self.config.patch_size
        reached: set[str] = set()  # detectors whose validation patches a pseudo-anomaly touched
        # raw low maps (token resolution, small) kept until the good ones' border profile is known
        low_maps: list[np.ndarray] = []
        profile = BorderProfile()
        # the good images' raw outputs (token resolution, small) for the branches' balance
        balance = self.config.balance_branches and self.config.low_branch
        good: list[RawOutput] = []
        for index in range(count):
            image = images[index]
            variants: list[tuple[np.ndarray, np.ndarray | None]] = [(image, None)]
            if self.config.pseudo_anomalies:
                rng = np.random.default_rng([seed_bits(self.config.seed), index])
                variants.append(paste_pseudo_anomalies(image, rng))
            for variant, pasted in variants:
                raw = self.raw_outputs(variant)
                if pasted is None and balance:
                    good.append(raw)
                for m in np.unique(raw.labels):
                    calibration.update(f"high.{int(m)}", raw.patch_maps[torch.from_numpy(raw.labels == m)])
                if raw.low_map is not None:
                    low_maps.append(raw.low_map.numpy())
                    if pasted is None:
                        profile.update(low_maps[-1])
                if pasted is not None:  # positions are image coordinates (the grid pads bottom / right)
                    reached.update(
                        f"high.{int(label)}"
                        for p, label in zip(raw.positions, raw.labels, strict=True)
                        if pasted[p.y : p.y + patch, p.x : p.x + patch].any()
                    )
            progress(index + 1, count, "hiad: calibrating")
        self._low_border = None
        if self.config.low_border_calibration and low_maps:
            self._low_border = profile.corner_ratios() if self.config.low_border_corners else profile.ratios()
        for low_map in low_maps:  # the low branch's range is that of its border-calibrated maps
            calibration.update("low", calibrate_border(low_map, self._low_border))
        names = [f"high.{m}" for m in range(self._assignment.count)]
        calibration.complete_pool(names, reached if self.config.shared_anomaly_peak else None)
        self._calibration = calibration
        if balance and good:
            self._balance_branches(calibration, names, good)

    def _balance_branches(self, calibration: MinMaxCalibration, names: list[str], good: list[RawOutput]) -> None:
        """Widen the min-max range of the branch whose good held-out images peak higher (mean of
        their image scores, :meth:`_pooled_score`) so that its peaks come down to the other's:
        scaling a calibrated map by ``s`` is widening its range ``(lo, hi)`` to ``(lo, lo + (hi -
        lo) / s)`` (equal below the clip at 1), so the ranges alone carry it (the state and the
        exports need nothing new). The mean, not a spread, because it holds with the two or three
        good images a small fit holds out."""
        high_peaks, low_peaks = [], []
        for raw in good:
            assert raw.low_map is not None
            high_map = self._merged_high_map(raw)
            high_peaks.append(self._pooled_score(high_map))
            high_map.fill(0.0)  # its buffer takes the low map (calibrated maps are >= 0)
            low_peaks.append(self._pooled_score(self._maximum_with_low(high_map, self._calibrated_low(raw.low_map))))
        peaks = {"high": float(np.mean(high_peaks)), "low": float(np.mean(low_peaks))}
        level = min(peaks.values())
        if level <= 0:  # a branch whose good images are all at its floor: nothing to scale by
            return
        for branch, peak in peaks.items():
            if peak > level:
                for name in names if branch == "high" else ["low"]:
                    low, high = calibration.range(name)
                    calibration.set_range(name, low, low + (high - low) * peak / level)

    def _pooled_score(self, calibrated_map: np.ndarray) -> float:
        """A calibrated map (a branch's, or both's maximum) scored by HiAD's rule (blur at
        ``score_sigma``, pooled max), a band of rows at a time (no blurred copy of the map)."""
        bands = blurred_bands(calibrated_map, self.config.score_sigma, hiad_math.BAND_VALUES)
        return pooled_max_of_bands((rows for _, rows in bands), calibrated_map.shape[0], self.config.score_pool)

    def _calibrated_low(self, low_map: Tensor) -> Tensor:
        """The raw low map divided by the low branch's border ratios, then min-max calibrated."""
        array = calibrate_border(low_map.numpy().copy(), self._low_border) if self._low_border else low_map
        assert self._calibration is not None
        return self._calibration.normalize("low", torch.as_tensor(array))

    # ------------------------------------------------------------------ predict

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[AnomalyResult]:
        """One image at a time (the base loop), on purpose: the pool's detectors stay resident
        after their first use, so there is no per-image model load to share (as the tiled
        ensemble shares its tile models), and an image's patches are fused from that image's own
        resolution levels (:meth:`MultiResolutionFusion.prepare` embeds each level whole) and
        its low branch embeds the whole image, so sharing backbone batches across images would
        need a second, cross-image path through the fusion; not done."""
        return [self.predict(image) for image in images]

    def predict(self, image: np.ndarray) -> AnomalyResult:
        """The calibrated branches' maximum at the image's resolution and its pooled score.

        Memory: besides the image, one float32 map of the image's size is made (the high branch's
        :class:`TileMerger`, into which each patch map is upsampled and added one chunk of patches
        at a time); the low branch's map is upsampled into it a band of rows at a time through
        ``np.maximum(out=...)`` (:func:`~hrad.hiad_math.maximum_upsampled`), and the score blurs
        and pools it a band at a time (:func:`~hrad.postprocess.smoothing.blurred_bands`,
        :func:`~hrad.hiad_math.pooled_max_of_bands`; with ``score_sigma == smoothing_sigma`` the
        smoothed map itself is pooled, blurred once). ``return_branch_maps`` keeps the two branch
        maps whole as well (two more maps). Same map and score, to float32 rounding, as upsampling
        every map whole.
        """
        if self._calibration is None:
            raise ConfigError("hiad: calibrate() must run on held-out good images before predict()")
        if self.maps_on_device:
            return self.predict_on_device(image).to_host()
        raw = self.raw_outputs(image)
        height, width = image.shape[:2]
        high_map = self._merged_high_map(raw)
        final = high_map
        low_map: np.ndarray | None = None
        if raw.low_map is not None:
            low_calibrated = self._calibrated_low(raw.low_map)
            if self.config.return_branch_maps:  # whole: the caller wants the low map
                low_map = resize(low_calibrated[None, None], (height, width))[0, 0].numpy()
                final = np.maximum(high_map, low_map)
            else:
                final = self._maximum_with_low(high_map, low_calibrated)
        same_sigma = self.config.score_sigma == self.config.smoothing_sigma
        if not same_sigma:  # the score from bands of its own blur, before the map is smoothed in place
            score = self._pooled_score(final)
        # smoothed in place unless it is the high branch's map the caller also gets
        keep = self.config.return_branch_maps and final is high_map
        returned = gaussian_smooth(final, self.config.smoothing_sigma, in_place=not keep)
        if same_sigma:  # one blur serves both (pooled_max is banded too)
            score = pooled_max(returned, self.config.score_pool)
        return AnomalyResult(returned, score, self._extras(raw, high_map, low_map))

    def _extras(self, raw: RawOutput, high_map: np.ndarray | Tensor, low_map: np.ndarray | Tensor | None) -> dict:
        """A prediction's extras, on the host or the device alike: which pool detector scored
        each patch and, with ``return_branch_maps``, the two branch maps (the low one None without
        a low branch)."""
        extras: dict = {"patch_detectors": raw.grid_labels()}
        if self.config.return_branch_maps:
            extras["high_map"] = high_map
            extras["low_map"] = low_map
        return extras

    @property
    def maps_on_device(self) -> bool:
        """Whether predict's map work runs in torch on the maps' device (:attr:`device_maps`; by
        default wherever that device is not the CPU); the model then finishes the map there too."""
        return self.device.type != "cpu" if self.device_maps is None else self.device_maps

    def predict_on_device(self, image: np.ndarray) -> DeviceResult:
        """:meth:`predict` with every full-resolution step in torch on the maps' device: the patch
        maps calibrated, upsampled and merged there, the low branch's calibrated map upsampled and
        maxed in, the blur and the pooled score too; nothing waits for the device (``ra``'s
        descriptors aside, :meth:`_device_outputs`), the map, the score and the branch maps are
        left there as tensors (:meth:`predict` copies them back: the host waits for the finished
        map). Same map and score as the host path to float32 rounding.

        Device memory: several maps of the image's size (the merge's sum and count, the upsampled
        low map, the maximum, the blur's padded passes), 16 MB each at 2K, 1 GB at 16K."""
        assert self._calibration is not None
        raw = self._device_outputs(image)
        height, width = image.shape[:2]
        high_map = self._merged_high_tensor(raw)
        final, low_map = high_map, None
        if raw.low_map is not None:
            low_map = resize(self._calibrated_low_tensor(raw.low_map)[None, None], (height, width))[0, 0]
            final = torch.maximum(high_map, low_map)
        sigma, score_sigma = self.config.smoothing_sigma, self.config.score_sigma
        returned = device_maps.gaussian_blur(final, sigma)
        blurred = returned if score_sigma == sigma else device_maps.gaussian_blur(final, score_sigma)
        score = device_maps.pooled_max(blurred, self.config.score_pool)
        return DeviceResult(returned, score, self._extras(raw, high_map, low_map))

    def _calibrated_patch_chunks(self, raw: RawOutput) -> Iterator[tuple[list[TilePosition], Tensor]]:
        """The merge rule both merges follow (:meth:`_merged_high_map` on the host,
        :meth:`_merged_high_tensor` on the device): each detector's patch maps min-max calibrated
        by its range, then :data:`MERGE_CHUNK` patches at a time upsampled to patch size, on the
        patch maps' device; yields each chunk's positions and ``n x patch x patch`` maps."""
        assert self._calibration is not None
        maps = raw.patch_maps
        calibrated = torch.empty_like(maps)
        for m in np.unique(raw.labels):
            rows = to_device(np.flatnonzero(raw.labels == m), maps.device)
            low, high = self._calibration.range(f"high.{int(m)}")
            calibrated.index_copy_(0, rows, normalize_range(maps.index_select(0, rows), low, high))
        grid = raw.grid
        for start in range(0, len(raw.positions), MERGE_CHUNK):
            upsampled = resize(calibrated[start : start + MERGE_CHUNK, None], (grid.tile_h, grid.tile_w))[:, 0]
            yield raw.positions[start : start + MERGE_CHUNK], upsampled

    def _merged_high_tensor(self, raw: RawOutput) -> Tensor:
        """:meth:`_merged_high_map` on the patch maps' device: the calibrated, upsampled patches
        (:meth:`_calibrated_patch_chunks`) added into one map, the overlaps averaged by a count of
        the patches over each pixel (a second map, where the host's :class:`TileMerger` keeps one
        and divides by the tiles over each row times those over each column)."""
        grid = raw.grid
        total = raw.patch_maps.new_zeros((grid.padded_height, grid.padded_width))
        count = torch.zeros_like(total)
        for positions, upsampled in self._calibrated_patch_chunks(raw):
            for position, tile_map in zip(positions, upsampled, strict=True):
                ys, xs = slice(position.y, position.y + grid.tile_h), slice(position.x, position.x + grid.tile_w)
                total[ys, xs] += tile_map
                count[ys, xs] += 1
        return (total / count)[: grid.height, : grid.width]  # the grid covers every pixel

    def _calibrated_low_tensor(self, low_map: Tensor) -> Tensor:
        """:meth:`_calibrated_low` on the low map's device: divided by the border ratios as a
        factor map (:func:`~hrad.postprocess.device_maps.border_factors`, the model's own border
        calibration on the device uses too: per map size, ratios and device, copied once), then
        min-max calibrated."""
        assert self._calibration is not None
        if self._low_border:
            low_map = low_map * device_maps.border_factors((low_map.shape[0], low_map.shape[1]), self._low_border, low_map.device)
        return self._calibration.normalize("low", low_map)

    @staticmethod
    def _maximum_with_low(target: np.ndarray, low_calibrated: Tensor) -> np.ndarray:
        """``np.maximum(target, the calibrated low map upsampled to target's size)``, written into
        ``target``: a band of rows at a time (no second full-size map), or whole where (a few
        pixels past a tiny image's side) the resize shrinks, which needs the antialiased kernel."""
        if shrinks((int(low_calibrated.shape[-2]), int(low_calibrated.shape[-1])), target.shape):
            return np.maximum(target, resize(low_calibrated[None, None], target.shape)[0, 0].numpy(), out=target)
        return maximum_upsampled(target, low_calibrated.numpy())

    def _merged_high_map(self, raw: RawOutput) -> np.ndarray:
        """The calibrated patch maps upsampled to patch size (:meth:`_calibrated_patch_chunks`, on
        the CPU here) merged into one float32 map on the host, overlaps averaged (:class:`TileMerger`:
        one full-size map)."""
        merger = TileMerger(raw.grid)
        for positions, upsampled in self._calibrated_patch_chunks(raw):
            for position, tile_map in zip(positions, upsampled.numpy(), strict=True):
                merger.add(position, tile_map)
        return np.ascontiguousarray(merger.result()[0], dtype=np.float32)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Tensor]:
        if self._assignment is None or self._rates is None or self._weights is None:
            raise ConfigError("hiad: nothing to save before fit()")
        state: dict[str, Tensor] = {}
        for m in range(self._assignment.count):
            for key, value in self._detector(m).state_dict().items():
                state[f"high.{m}.{key}"] = value
        if self.config.low_branch:
            for key, value in self._low_detector().state_dict().items():
                state[f"low.{key}"] = value
        for key, value in self._assignment.state_dict().items():
            state[f"assignment.{key}"] = value
        if self._calibration is not None:
            for key, value in self._calibration.state_dict().items():
                state[f"calibration.{key}"] = value
        if self._low_border:
            state["border.low"] = torch.tensor(self._low_border, dtype=torch.float64)
        state["fusion.rates"] = torch.tensor(self._rates, dtype=torch.int64)
        state["fusion.weights"] = torch.tensor(self._weights, dtype=torch.float64)
        assert self._image_size is not None
        state["geometry.image_size"] = torch.tensor(self._image_size, dtype=torch.int64)
        return {key: value.detach().cpu().contiguous() for key, value in state.items()}

    def load_state(self, reader: StateReader) -> None:
        """Assignment, fusion and calibration now; detectors lazily, one at a time, when used."""
        keys = set(reader.keys())
        for key in ("fusion.rates", "fusion.weights", "geometry.image_size", "assignment.count"):
            if key not in keys:
                raise ArtifactError(
                    f"hiad artifact lacks {key}; it is incomplete or was saved by another strategy"
                )
        self._rates = tuple(int(r) for r in reader.get("fusion.rates").tolist())
        self._weights = tuple(float(w) for w in reader.get("fusion.weights").tolist())
        height, width = (int(v) for v in reader.get("geometry.image_size").tolist())
        self._image_size = (height, width)
        self._assignment = Assignment.from_state(self.config.assignment, sub_state(reader, "assignment"))
        calibration_state = sub_state(reader, "calibration")
        self._calibration = None
        if calibration_state:
            self._calibration = MinMaxCalibration()
            self._calibration.load_state_dict(calibration_state)
        # artifacts from before the low branch's border calibration have no ratios: maps as then
        self._low_border = None
        if "border.low" in keys:  # 1-D (saved before corner ratios) or the 2-D table
            self._low_border = reader.get("border.low").tolist()
            try:
                ratio_table(self._low_border)
            except ValueError as error:
                raise ArtifactError(f"hiad artifact: border.low: {error}") from None
        if self.config.low_branch and not any(key.startswith("low.") for key in keys):
            raise ArtifactError("hiad artifact has no low-branch detector (low.*) although low_branch is on")
        self._detectors = {}
        self._low = None
        self._reader = reader
