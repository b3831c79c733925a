"""ONNX export of a tiled ensemble: one graph, the tile position as its second input.

A tiled ensemble has one detector per tile position; the backbone is shared. Two layouts were
possible: one network per position (``N`` graphs, each carrying its own copy of the backbone)
or one graph that takes ``(tiles, positions)`` and picks the position's scoring state inside
(``N`` banks stacked, one backbone). The second is chosen: the backbone is the larger part of
each per-position graph, so ``N`` graphs cost about ``N`` times its size on disk and ``N``
sessions in memory, while the stacked graph adds only the banks; it also scores tiles of
different positions in one batch.

Only the per-tile network is exported, as for :mod:`hrad.export`; resizing, windows, merging,
per-tile normalisation, seam smoothing, the mean/max image score and image normalisation are
array work done by :class:`OnnxEnsemblePredictor` with the strategy's own helpers and the
numbers in the sidecar. Detectors: PatchCore (exact kNN, PatchCore's reweighting included).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.export import (
    OPSET,
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    TOLERANCE,
    _atomic_write,
    _max_difference,
    _onnxruntime,
    inference_session,
    logsumexp_last,
    scoring_module,
)
from hrad.postprocess.seams import smooth_seams
from hrad.postprocess.smoothing import PostprocessConfig, gaussian_smooth, image_score
from hrad.strategies.base import to_tensor
from hrad.strategies.ensemble import TiledEnsemble, TiledEnsembleConfig, _resize
from hrad.strategies.tiled import resize
from hrad.strategies.tiling import TileGrid, TileMerger
from hrad.version import __version__

if TYPE_CHECKING:
    from hrad.model import AnomalyModel, Prediction

INPUT_NAMES = ("tiles", "positions")
OUTPUT_NAMES = ("maps", "scores")


class PositionedNearestNeighbourScoring(nn.Module):
    """PatchCore kNN scoring with one memory bank per tile position, picked by ``positions``.

    Same formulas as :class:`hrad.export.NearestNeighbourScoring` (mean distance to the ``k``
    nearest bank vectors; image score = max patch score, reweighted by PatchCore eq. 7), with the
    bank of each sample's position: ``banks`` is ``positions x N x C``.
    """

    banks: Tensor
    bank_norms: Tensor

    def __init__(self, banks: Tensor, k: int = 1, reweight_neighbours: int | None = None) -> None:
        super().__init__()
        banks = banks.detach().float()
        size = banks.shape[1]
        self.register_buffer("banks", banks.clone())
        self.register_buffer("bank_norms", (banks * banks).sum(-1))
        self.k = max(1, min(k, size))
        self.reweight_neighbours = None if reweight_neighbours is None else max(1, min(reweight_neighbours, size))

    def forward(self, embeddings: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, height, width = embeddings.shape
        queries = embeddings.flatten(2).transpose(1, 2)  # B x P x C
        bank = self.banks[positions]  # B x N x C
        norms = self.bank_norms[positions]  # B x N
        products = queries @ bank.transpose(1, 2)  # B x P x N
        squared = ((queries * queries).sum(-1, keepdim=True) - 2 * products + norms[:, None, :]).clamp_min(0)
        nearest_squared, nearest_index = torch.topk(squared, self.k, dim=-1, largest=False)
        nearest = nearest_squared.sqrt()
        patch_scores = nearest.mean(-1)  # B x P
        maps = patch_scores.reshape(batch, height, width)
        best, best_patch = patch_scores.max(dim=1)
        if self.reweight_neighbours is None:
            return maps, best
        rows = torch.arange(batch, device=embeddings.device)
        worst_query = queries[rows, best_patch]  # B x C
        anchor = bank[rows, nearest_index[rows, best_patch, 0]]  # B x C
        anchor_products = (anchor[:, None, :] @ bank.transpose(1, 2))[:, 0]  # B x N
        anchor_squared = ((anchor * anchor).sum(-1, keepdim=True) - 2 * anchor_products + norms).clamp_min(0)
        _, support = torch.topk(anchor_squared, self.reweight_neighbours, dim=-1, largest=False)  # B x b
        support_vectors = bank[rows[:, None], support]  # B x b x C
        distances = (worst_query[:, None, :] - support_vectors).pow(2).sum(-1).sqrt()
        log_ratio = nearest[rows, best_patch, 0] - logsumexp_last(distances)
        return maps, (1 - torch.exp(log_ratio)) * best


class EnsembleTileScorer(nn.Module):
    """What is exported: ``(windows B x 3 x S x S, positions B)`` -> ``(maps B x h x w, scores B)``."""

    def __init__(self, tiles: Any, scoring: nn.Module) -> None:
        super().__init__()
        self.embedder = tiles.embedder
        self.scoring = scoring
        self.crop_cells = tiles.crop_cells

    def forward(self, windows: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        embeddings = self.embedder(windows)
        c = self.crop_cells
        if c:
            embeddings = embeddings[..., c:-c, c:-c]
        maps, scores = self.scoring(embeddings, positions)
        return maps, scores


def _positioned_scoring(strategy: TiledEnsemble, detector_name: str) -> nn.Module:
    if detector_name != "patchcore":
        raise ConfigError(f"tiled-ensemble export supports the patchcore detector, not {detector_name!r}")
    modules: list[Any] = []
    for index in range(len(strategy.grid)):
        detector = strategy.detector_type(strategy.detector_config)
        detector.load_state_dict(strategy._tile_state(index))
        module = scoring_module(detector, detector_name)
        assert module is not None
        modules.append(module)
    sizes = {tuple(module.bank.shape) for module in modules}
    if len(sizes) != 1:
        raise ConfigError(f"tile memory banks differ in size ({sorted(sizes)}); cannot stack them into one graph")
    first = modules[0]
    return PositionedNearestNeighbourScoring(
        torch.stack([module.bank for module in modules]), k=first.k, reweight_neighbours=first.reweight_neighbours
    ).eval()


def export_ensemble_onnx(model: AnomalyModel, out_path: str | Path, verify: bool = True) -> Path:
    """Write the tiled ensemble's graph to ``out_path`` and its sidecar next to it; returns the sidecar.

    With ``verify`` the graph is run by onnxruntime on random windows at every position and
    must match the per-position PyTorch scoring to :data:`hrad.export.TOLERANCE`.
    """
    strategy = model.strategy
    if not isinstance(strategy, TiledEnsemble):
        raise ConfigError(f"strategy {model.config.strategy.name!r} is not a tiled ensemble")
    config = strategy.config
    grid = strategy.grid
    scorer = EnsembleTileScorer(strategy.tiles, _positioned_scoring(strategy, model.config.detector.name)).eval()
    side_h, side_w = strategy.tiles.window_input_size
    count = len(grid)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(count, 3, side_h, side_w, generator=generator)
    positions = torch.arange(count, dtype=torch.int64)
    with torch.no_grad():
        expected_maps, expected_scores = scorer(example, positions)
        # the stacked graph equals each position's own detector
        for index in range(count):
            detector = strategy.detector_type(strategy.detector_config)
            detector.load_state_dict(strategy._tile_state(index))
            own = detector.predict(strategy.tiles.crop(strategy.embedder(example[index : index + 1])))
            difference = _max_difference(expected_maps[index : index + 1].numpy(), own.maps.float().numpy())
            if not difference <= TOLERANCE:
                raise RuntimeError(f"stacked scoring differs from tile model {index} by {difference:.2e}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write_onnx(path: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                scorer, (example[:1], positions[:1]), path, dynamo=False, opset_version=OPSET,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_axes={"tiles": {0: "batch"}, "positions": {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}},
            )  # fmt: skip
        if verify:
            session = _onnxruntime().InferenceSession(path, providers=["CPUExecutionProvider"])
            maps, scores = session.run(None, {"tiles": example.numpy(), "positions": positions.numpy()})
            difference = max(
                _max_difference(maps, expected_maps.numpy()), _max_difference(scores, expected_scores.numpy())
            )
            if not difference <= TOLERANCE:
                raise RuntimeError(f"ONNX export differs from PyTorch by {difference:.2e} (relative); not written")

    _atomic_write(out_path, write_onnx)
    geometry = strategy._require_fitted()
    normalization = {key: value.double().reshape(-1).tolist() for key, value in strategy._normalization.items()}
    thresholds = model.thresholds
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "hrad_version": __version__,
        "onnx": out_path.name,
        "input": {
            "tiles": ["batch", 3, side_h, side_w],
            "positions": ["batch"],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "channels": "RGB",
            "layout": "NCHW",
        },
        "outputs": {"maps": ["batch", *expected_maps.shape[-2:]], "scores": ["batch"]},
        "geometry": {
            "strategy": "tiled-ensemble",
            "config": config.model_dump(mode="json"),
            "fitted_size": list(geometry.input_size),
            "work_size": list(geometry.work_size),
            "margin": strategy.tiles.margin,
            "tile_count": count,
        },
        "normalization": normalization,
        "postprocess": model.config.postprocess.model_dump(mode="json"),
        "thresholds": {"image": thresholds.image, "pixel": thresholds.pixel} if thresholds else None,
        "model": {
            "backbone": model.config.backbone.name,
            "detector": model.config.detector.name,
            "strategy": "tiled-ensemble",
        },
        "steps": [
            "read the image as float32 RGB in [0, 1]; with image_size null it must have the fitted size",
            "resize (bilinear, antialiased) to the working size (tiled-ensemble working_size rule)",
            "tile grid: tile, stride and tile_edge of the config; cut each window with margin context pixels",
            "run the graph on (windows, their position indices); upsample each map (bilinear) to the tile",
            "normalization=tile: (x - shift[position]) / scale[position] on maps and scores",
            "merge maps (overlaps averaged); seam_smoothing: Gaussian blur of the seam bands",
            "image score: mean or max (score_merge) of the tile scores",
            "normalization=image: (x - shift) / scale on the merged map and the score",
            "resize (bilinear) to the input size; then postprocess as hrad.export's sidecar says",
        ],
    }
    sidecar_path = out_path.with_suffix(".json")
    _atomic_write(sidecar_path, lambda path: Path(path).write_text(json.dumps(sidecar, indent=2)))
    return sidecar_path


class OnnxEnsemblePredictor:
    """Runs an exported tiled ensemble with onnxruntime, equal to :meth:`AnomalyModel.predict`."""

    def __init__(
        self, onnx_path: str | Path, sidecar: dict[str, Any], providers: list[str] | None = None, runtime: str = "onnxruntime"
    ) -> None:
        self.onnx_path = Path(onnx_path)
        self.sidecar = sidecar
        geometry = sidecar["geometry"]
        self.config = TiledEnsembleConfig.model_validate(geometry["config"])
        self.fitted_size: tuple[int, int] = (int(geometry["fitted_size"][0]), int(geometry["fitted_size"][1]))
        self.work_size: tuple[int, int] = (int(geometry["work_size"][0]), int(geometry["work_size"][1]))
        self.margin = int(geometry["margin"])
        self.window: tuple[int, int] = (int(sidecar["input"]["tiles"][-2]), int(sidecar["input"]["tiles"][-1]))
        self.normalization = {key: np.asarray(value, dtype=np.float64) for key, value in sidecar["normalization"].items()}
        self.postprocess = PostprocessConfig.model_validate(sidecar["postprocess"])
        self.session = inference_session(self.onnx_path, sidecar, runtime, providers)

    def _normalize(self, values: np.ndarray, kind: str, index: int) -> np.ndarray:
        return (values - self.normalization[f"{kind}_shift"][index]) / self.normalization[f"{kind}_scale"][index]

    def predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        config = self.config
        height, width = image.shape[:2]
        if config.image_size is None and (height, width) != self.fitted_size:
            raise InputError(f"image {width}x{height} differs from the fitted size {self.fitted_size[1]}x{self.fitted_size[0]}")
        work = self.work_size  # fixed at fit, as TiledEnsemble._prepare uses it
        grid = TileGrid.square(*work, config.tile, config.tile_stride, self.margin, config.tile_edge)
        padded = grid.pad(_resize(to_tensor(image), work)[0])
        merger = TileMerger(grid)
        tile_scores = np.zeros(len(grid))
        tile_normalized = config.normalization == "tile"
        for positions, windows in grid.batches(padded, config.batch_size):
            windows = resize(windows, self.window)  # as ContextEmbedder.resize_windows
            index = np.asarray([p.index for p in positions], dtype=np.int64)
            maps, scores = self.session.run(None, {"tiles": np.ascontiguousarray(windows.numpy()), "positions": index})
            upsampled = resize(torch.from_numpy(maps)[:, None].float(), (grid.tile_h, grid.tile_w))[:, 0]
            for position, tile_map, score in zip(positions, upsampled.double().numpy(), scores.astype(np.float64), strict=True):
                if tile_normalized:
                    tile_map = self._normalize(tile_map, "map", position.index)
                    score = self._normalize(np.array(score), "score", position.index)
                merger.add(position, tile_map)
                tile_scores[position.index] = score
        merged = merger.result()[0]
        if config.seam_smoothing:
            merged = smooth_seams(merged, grid, config.seam_band, config.seam_sigma)
        score = float(tile_scores.mean() if config.score_merge == "mean" else tile_scores.max())
        if config.normalization == "image":
            merged = self._normalize(merged, "map", 0)
            score = float(self._normalize(np.array([score]), "score", 0)[0])
        full = _resize(torch.from_numpy(np.ascontiguousarray(merged))[None, None], (height, width))
        return full[0, 0].numpy().astype(np.float32), score

    def predict(self, image: np.ndarray | str | Path) -> Prediction:
        from hrad.model import Prediction, as_image

        array = as_image(image)
        raw_map, raw_score = self.predict_raw(array)
        smoothed = gaussian_smooth(raw_map, self.postprocess.sigma)
        thresholds = self.sidecar.get("thresholds")
        return Prediction(
            anomaly_map=smoothed,
            score=image_score(smoothed, raw_score, self.postprocess),
            image_threshold=thresholds["image"] if thresholds else None,
            pixel_threshold=thresholds["pixel"] if thresholds else None,
        )


def load_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    sidecar = Path(onnx_path).with_suffix(".json")
    try:
        return json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{sidecar}: ONNX sidecar not found (written next to the .onnx by hrad export)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{sidecar}: corrupt ONNX sidecar") from None
