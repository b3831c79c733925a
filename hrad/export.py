"""ONNX export of the per-tile network, plus the sidecar that says what to do around it.

Only the part that needs a neural-network runtime is exported: one tile (or, for
``downsample``, the whole resized image) ``B x 3 x S x S`` in [0, 1] -> the detector's anomaly
maps at feature resolution ``B x h x w`` and its scores ``B`` (backbone + :class:`Embedder` +
the detector's :meth:`~hrad.detectors.base.Detector.scoring_module`). Resizing, tiling, merging,
smoothing and thresholds are cheap array work; the JSON sidecar records every number they need
and :class:`OnnxPredictor` is the reference implementation of them around onnxruntime, equal
to :meth:`AnomalyModel.predict` up to float rounding.

``tiled-ensemble`` (PatchCore) exports through :mod:`hrad.export_ensemble` (one graph, the tile
position as a second input); ``hiad`` and ``mrf`` are not exportable yet, detectors without a
scoring module neither. :func:`open_predictor` opens either kind of export.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from hrad.detectors.base import Detector
from hrad.errors import ArtifactError, ConfigError
from hrad.postprocess.smoothing import PostprocessConfig, gaussian_smooth, image_score
from hrad.strategies.tiled import (
    DownsampleConfig,
    TiledConfig,
    TiledStrategy,
    long_side_size,
    predict_tiles,
    resize,
    round_to_multiple,
)
from hrad.strategies.tiling import ContextEmbedder, TileGrid
from hrad.version import __version__

if TYPE_CHECKING:
    from hrad.features.base import Embedder
    from hrad.model import AnomalyModel, Prediction

SIDECAR_FORMAT = "hrad-onnx"
SIDECAR_VERSION = 2
EXPORTABLE_STRATEGIES = ("downsample", "tiled", "tiled-ensemble")
INPUT_NAME = "tiles"
OUTPUT_NAMES = ("maps", "scores")
#: ONNX opset: 17 has everything a CNN/ViT backbone and the kNN/Gaussian scorers need
OPSET = 17
#: exported graph vs the PyTorch module, relative to the map's magnitude
TOLERANCE = 1e-4


class TileScorer(nn.Module):
    """What is exported: tile windows ``B x 3 x S x S`` in [0, 1] -> ``(maps B x h x w, scores B)``.

    ``crop_cells`` feature cells of context margin are cut off each side of the embedding before
    scoring (:class:`~hrad.strategies.tiling.ContextEmbedder`), so maps cover the tile alone.
    """

    def __init__(self, embedder: Embedder, scoring: nn.Module, crop_cells: int = 0) -> None:
        super().__init__()
        self.embedder = embedder
        self.scoring = scoring
        self.crop_cells = crop_cells

    def forward(self, tiles: Tensor) -> tuple[Tensor, Tensor]:
        embeddings = self.embedder(tiles)
        c = self.crop_cells
        if c:
            embeddings = embeddings[..., c:-c, c:-c]
        maps, scores = self.scoring(embeddings)
        return maps, scores


def _vectors(embeddings: Tensor) -> Tensor:
    """``B x C x h x w`` -> ``B x hw x C`` (row-major positions, as the detectors flatten them)."""
    return embeddings.flatten(2).transpose(1, 2)


def logsumexp_last(values: Tensor) -> Tensor:
    """``log(sum(exp(x)))`` over the last dim, written out (max-shifted): OpenVINO 2026.4's ONNX
    reader drops the axes of ``ReduceLogSumExp`` (what ``torch.logsumexp`` exports to) and
    reduces over every dim."""
    peak = values.max(dim=-1, keepdim=True).values
    return peak.squeeze(-1) + torch.log(torch.exp(values - peak).sum(-1))


def _squared_distances(queries: Tensor, bank: Tensor, bank_norms: Tensor) -> Tensor:
    """Squared L2 ``... x Q x N`` by ``|q|^2 - 2 q.b + |b|^2`` (one matmul; what faiss's flat index does)."""
    products = queries @ bank.transpose(0, 1)
    return ((queries * queries).sum(-1, keepdim=True) - 2 * products + bank_norms).clamp_min(0)


class NearestNeighbourScoring(nn.Module):
    """Exact kNN scoring against a memory bank in plain torch (PatchCore): no faiss in the graph.

    Patch score = mean L2 distance to the ``k`` nearest bank vectors. Image score = the largest
    patch score ``s*``; with ``reweight_neighbours`` = b it is reweighted by PatchCore eq. 7,
    ``(1 - exp(|m_test* - m*|) / sum_{m in N_b(m*)} exp(|m_test* - m|)) * s*``, where ``m*`` is
    the bank vector nearest the worst patch ``m_test*`` and ``N_b(m*)`` its b nearest bank
    vectors, ``m*`` included (as :class:`~hrad.detectors.patchcore.PatchCore` computes it).
    """

    bank: Tensor
    bank_norms: Tensor

    def __init__(self, bank: Tensor, k: int = 1, reweight_neighbours: int | None = None) -> None:
        super().__init__()
        bank = bank.detach().float()
        self.register_buffer("bank", bank.clone())
        self.register_buffer("bank_norms", (bank * bank).sum(1))
        self.k = max(1, min(k, len(bank)))
        self.reweight_neighbours = None if reweight_neighbours is None else max(1, min(reweight_neighbours, len(bank)))

    def forward(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, height, width = embeddings.shape
        queries = _vectors(embeddings)  # B x P x C
        squared = _squared_distances(queries, self.bank, self.bank_norms)  # B x P x N
        nearest_squared, nearest_index = torch.topk(squared, self.k, dim=-1, largest=False)
        nearest = nearest_squared.sqrt()  # B x P x k, ascending
        patch_scores = nearest.mean(-1)  # B x P
        maps = patch_scores.reshape(batch, height, width)
        best, best_patch = patch_scores.max(dim=1)  # B
        if self.reweight_neighbours is None:
            return maps, best
        rows = torch.arange(batch, device=embeddings.device)
        worst_query = queries[rows, best_patch]  # B x C
        anchor = self.bank[nearest_index[rows, best_patch, 0]]  # B x C
        anchor_squared = _squared_distances(anchor, self.bank, self.bank_norms)  # B x N
        _, support = torch.topk(anchor_squared, self.reweight_neighbours, dim=-1, largest=False)  # B x b
        support_vectors = self.bank[support]  # B x b x C
        distances = (worst_query[:, None, :] - support_vectors).pow(2).sum(-1).sqrt()  # B x b
        log_ratio = nearest[rows, best_patch, 0] - logsumexp_last(distances)
        return maps, (1 - torch.exp(log_ratio)) * best


class MahalanobisScoring(nn.Module):
    """Per-position Gaussian scoring in plain torch (PaDiM): distance ``sqrt(d^T inv(cov) d)``.

    ``channels`` (optional) selects PaDiM's random channel subset before scoring; ``mean`` is
    ``P x D`` and ``inverse_covariance`` ``P x D x D`` for the ``P = h * w`` positions.
    """

    mean: Tensor
    inverse_covariance: Tensor
    channels: Tensor | None

    def __init__(self, mean: Tensor, inverse_covariance: Tensor, channels: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("inverse_covariance", inverse_covariance.detach().float().clone())
        self.register_buffer("channels", None if channels is None else channels.detach().long().clone())

    def forward(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, height, width = embeddings.shape
        if self.channels is not None:
            embeddings = embeddings.index_select(1, self.channels)
        delta = _vectors(embeddings) - self.mean[None]  # B x P x D
        projected = (self.inverse_covariance[None] @ delta.unsqueeze(-1)).squeeze(-1)  # B x P x D
        maps = (delta * projected).sum(-1).clamp_min(0).sqrt().reshape(batch, height, width)
        return maps, maps.flatten(1).max(1).values


def _patchcore_scoring(detector: Detector) -> nn.Module:
    config: Any = detector.config
    return NearestNeighbourScoring(
        detector.state_dict()["memory_bank"],
        k=config.num_neighbors,
        reweight_neighbours=config.reweight_neighbors if config.reweight else None,
    )


def _padim_scoring(detector: Detector) -> nn.Module:
    state = detector.state_dict()
    return MahalanobisScoring(state["mean"], state["inv_covariance"], state["channel_indices"])


#: scoring modules of detectors that do not (yet) implement ``Detector.scoring_module`` themselves,
#: by registered detector name; built from the detector's public config and saved state only
SCORING_HOOKS: dict[str, Callable[[Detector], nn.Module]] = {
    "patchcore": _patchcore_scoring,
    "padim": _padim_scoring,
}


def scoring_module(detector: Detector, name: str) -> nn.Module | None:
    """The detector's own :meth:`~Detector.scoring_module`, else its hook in :data:`SCORING_HOOKS`."""
    module = detector.scoring_module()
    if module is None and name in SCORING_HOOKS:
        module = SCORING_HOOKS[name](detector)
    return module


@dataclass(frozen=True)
class Geometry:
    """How an image becomes network inputs; mirrors :class:`TiledStrategy` for both configs.

    ``downsample``: the (optionally square-padded) image is resized to ``tile`` x ``tile`` and
    is the one tile. ``tiled``: the image is resized to ``long_side`` (if set) and covered by
    :class:`~hrad.strategies.tiling.TileGrid` (``tile`` at ``stride``, ``edge`` rule); each tile
    is cut with ``margin`` context pixels on every side (reflected past the image border) and
    the window resized to ``input_size + 2 * input_margin`` when that differs (ViTs need
    multiples of 14). The network crops the margin's cells itself.
    """

    strategy: str
    tile: int
    stride: int
    input_size: int
    long_side: int | None
    pad_to_square: bool
    score: str
    batch_size: int
    margin: int = 0
    input_margin: int = 0
    edge: str = "shift"

    @property
    def network_input(self) -> int:
        return self.input_size + 2 * self.input_margin

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        if self.strategy == "downsample":
            return self.tile, self.tile
        return long_side_size(height, width, self.long_side)

    def grid(self, height: int, width: int) -> TileGrid:
        if self.strategy == "downsample":
            return TileGrid.square(height, width, max(height, width), max(height, width))
        return TileGrid.square(height, width, self.tile, self.stride, self.margin, self.edge)  # type: ignore[arg-type]


def export_geometry(model: AnomalyModel, tile_size: int | None = None) -> Geometry:
    """The geometry of ``model``'s strategy; ``tile_size`` replaces the tile (downsample: image) side.

    With ``tile_size`` a tiled model keeps its overlap fraction (stride scales with the tile).
    Only position-free detectors give meaningful maps at another size than they were fitted on.
    """
    config = model.config.strategy
    multiple = model.extractor.input_multiple
    if tile_size is not None and tile_size < 16:
        raise ConfigError(f"tile size {tile_size} is too small (at least 16 pixels)")
    if isinstance(config, DownsampleConfig):
        side = tile_size if tile_size is not None else round_to_multiple(config.image_size, multiple)
        if side % multiple:
            raise ConfigError(f"tile size {side} is not a multiple of {multiple}, which {model.config.backbone.name} needs")
        return Geometry("downsample", side, side, side, None, config.pad_to_square, config.score, config.batch_size)
    if isinstance(config, TiledConfig):
        tile = tile_size if tile_size is not None else config.tile
        stride = config.stride or config.tile
        if tile_size is not None:
            stride = min(tile, max(1, round(stride * tile / config.tile)))
        tiles = _context_embedder(model, tile)
        return Geometry(
            "tiled", tile, stride, tiles.input_size[0], config.image_size, False, config.score, config.batch_size,
            margin=tiles.margin, input_margin=tiles.input_margin, edge=config.tile_edge,
        )  # fmt: skip
    raise _unexportable_strategy(config.name)


def _context_embedder(model: AnomalyModel, tile: int) -> ContextEmbedder:
    """The strategy's own window embedder, or one for another tile size (same context rule)."""
    strategy = model.strategy
    config = model.config.strategy
    assert isinstance(strategy, TiledStrategy) and isinstance(config, TiledConfig)
    tiles = strategy.tiles
    if tiles.tile_size == (tile, tile):
        return tiles
    return ContextEmbedder(strategy.embedder, tile, tile, config.resolve_context(model.extractor))


def _unexportable_strategy(name: str) -> ConfigError:
    return ConfigError(f"strategy {name!r} cannot be exported to ONNX yet; exportable: {', '.join(EXPORTABLE_STRATEGIES)}")


def _scoring_module(model: AnomalyModel) -> nn.Module:
    strategy = model.strategy
    name = model.config.strategy.name
    if name not in EXPORTABLE_STRATEGIES or not isinstance(strategy, TiledStrategy):
        raise _unexportable_strategy(name)
    module = scoring_module(strategy.detector, model.config.detector.name)
    if module is None:
        raise ConfigError(f"detector {model.config.detector.name!r} cannot be exported to ONNX")
    return module.eval()


def _sidecar(model: AnomalyModel, geometry: Geometry, onnx_name: str, map_shape: tuple[int, int]) -> dict[str, Any]:
    post = model.config.postprocess
    thresholds = model.thresholds
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "hrad_version": __version__,
        "onnx": onnx_name,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, geometry.network_input, geometry.network_input],
                  "dtype": "float32", "range": [0.0, 1.0], "channels": "RGB", "layout": "NCHW"},
        "outputs": {"maps": ["batch", *map_shape], "scores": ["batch"]},
        "geometry": asdict(geometry),
        "postprocess": post.model_dump(mode="json"),
        "thresholds": {"image": thresholds.image, "pixel": thresholds.pixel} if thresholds else None,
        "model": {
            "backbone": model.config.backbone.name,
            "backbone_weights": model.extractor.weights_source,
            "detector": model.config.detector.name,
            "strategy": model.config.strategy.name,
            "fitted_size": list(model.fitted_size) if model.fitted_size else None,
        },
        "steps": [
            "read the image as float32 RGB in [0, 1], H x W x 3",
            "downsample with pad_to_square: edge-replicate to a square at bottom/right",
            "resize (bilinear, align_corners=false, antialiased when shrinking) to the working size: "
            "downsample -> tile x tile; tiled -> long side = long_side, or native when null",
            "tile origins every stride pixels, row-major; edge=shift: the last row/column starts at "
            "size - tile (an image smaller than a tile is reflect-padded at bottom/right to one tile); "
            "edge=zeros: zero-pad bottom/right to the grid",
            "cut each tile with margin context pixels on every side, reflecting past the image border "
            "(zeros with edge=zeros); resize each window to input_size + 2 * input_margin when it differs; "
            "run the network in batches (it crops the margin's cells itself)",
            "resize each map (bilinear) to tile x tile; average overlapping tiles; crop the padding "
            "(and the square padding, scaled); resize (bilinear) to H x W",
            "score: max of the network's scores over tiles (score=detector) or max of that map (score=max)",
            "Gaussian-smooth the map with postprocess.sigma (kernel 2*int(4*sigma+0.5)+1, reflected border)",
            "image score per postprocess.image_score (strategy = the score above, max, or top-fraction mean) "
            "of the smoothed map; anomalous when score > thresholds.image, pixels when map > thresholds.pixel",
        ],
    }


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _max_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """Largest difference relative to the reference's magnitude (at least 1)."""
    return float(np.abs(ours - reference).max() / max(1.0, float(np.abs(reference).max())))


def export_onnx(model: AnomalyModel, out_path: str | Path, tile_size: int | None = None, verify: bool = True) -> Path:
    """Write ``out_path`` (ONNX) and its sidecar ``out_path.with_suffix('.json')``; returns the sidecar.

    With ``verify`` the written graph is run by onnxruntime on random tiles (batches of 1 and 2)
    and must match the PyTorch module to :data:`TOLERANCE`.
    """
    if model.config.strategy.name == "tiled-ensemble":
        from hrad.export_ensemble import export_ensemble_onnx

        if tile_size is not None:
            raise ConfigError("a tiled ensemble has one model per position of its fitted grid; --tile-size does not apply")

        return export_ensemble_onnx(model, out_path, verify=verify)
    out_path = Path(out_path)
    geometry = export_geometry(model, tile_size)
    scoring = _scoring_module(model).to(model.device)
    crop = (geometry.input_margin // model.strategy.embedder.stride) if geometry.strategy == "tiled" else 0  # type: ignore[attr-defined]
    scorer = TileScorer(model.strategy.embedder, scoring, crop).eval()  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    side = geometry.network_input
    example = torch.rand(2, 3, side, side, generator=generator).to(model.device)
    with torch.no_grad():
        try:
            expected_maps, expected_scores = scorer(example)
        except RuntimeError as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"{model.config.detector.name} cannot score {geometry.tile}x{geometry.tile} inputs ({first})") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write_onnx(path: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                scorer, (example[:1],), path, dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}},
            )  # fmt: skip
        if verify:
            _verify(path, example.cpu().numpy(), expected_maps.cpu().numpy(), expected_scores.cpu().numpy())

    try:
        _atomic_write(out_path, write_onnx)
    except (torch.onnx.errors.OnnxExporterError, torch.onnx.errors.UnsupportedOperatorError) as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"{model.config.backbone.name} / {model.config.detector.name} cannot be exported to ONNX ({first})") from None
    sidecar = out_path.with_suffix(".json")
    content = _sidecar(model, geometry, out_path.name, tuple(expected_maps.shape[-2:]))  # type: ignore[arg-type]
    _atomic_write(sidecar, lambda path: Path(path).write_text(json.dumps(content, indent=2)))
    return sidecar


def _onnxruntime() -> Any:
    """The onnxruntime module, or a one-line error naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX export and OnnxPredictor run the graph with onnxruntime: pip install 'hrad[export]'") from None
    return onnxruntime


def _verify(path: str, tiles: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> None:
    onnxruntime = _onnxruntime()

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for count in (1, 2):
        onnx_maps, onnx_scores = session.run(None, {INPUT_NAME: tiles[:count]})
        difference = max(_max_difference(onnx_maps, maps[:count]), _max_difference(onnx_scores, scores[:count]))
        if not difference <= TOLERANCE:
            raise RuntimeError(f"ONNX export differs from PyTorch by {difference:.2e} (relative); not written")


class OnnxPredictor:
    """Runs an exported model with onnxruntime and does everything around it as hrad does.

    ``predict`` returns the same :class:`~hrad.model.Prediction` as :meth:`AnomalyModel.predict`
    on the exported model, so it is the executable specification of the sidecar's ``steps``.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        sidecar_path: str | Path | None = None,
        providers: list[str] | None = None,
        runtime: str = "onnxruntime",
    ) -> None:
        self.onnx_path = Path(onnx_path)
        sidecar = Path(sidecar_path) if sidecar_path is not None else self.onnx_path.with_suffix(".json")
        if not self.onnx_path.is_file():
            raise ArtifactError(f"{self.onnx_path}: ONNX model not found")
        try:
            self.sidecar = json.loads(sidecar.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{sidecar}: ONNX sidecar not found (written next to the .onnx by hrad export)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{sidecar}: corrupt ONNX sidecar") from None
        if self.sidecar.get("format") != SIDECAR_FORMAT or self.sidecar.get("format_version") != SIDECAR_VERSION:
            raise ArtifactError(f"{sidecar}: not an hrad ONNX sidecar of format version {SIDECAR_VERSION}")
        self.geometry = Geometry(**self.sidecar["geometry"])
        self.postprocess = PostprocessConfig.model_validate(self.sidecar["postprocess"])
        self.session = inference_session(self.onnx_path, self.sidecar, runtime, providers)

    def score_windows(self, windows: Tensor) -> tuple[Tensor, Tensor]:
        """Tile windows at image scale -> the graph's ``(maps, scores)`` (resized to its input first)."""
        side = self.geometry.network_input
        inputs = np.ascontiguousarray(resize(windows, (side, side)).numpy(), dtype=np.float32)
        maps, scores = self.session.run(None, {INPUT_NAME: inputs})
        return torch.from_numpy(maps), torch.from_numpy(scores)

    def predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Unsmoothed full-resolution map and the strategy score: :func:`predict_tiles`, the code
        :meth:`TiledStrategy.predict` runs, with the exported graph as the per-tile scoring."""
        geometry = self.geometry
        result = predict_tiles(
            image,
            self.score_windows,
            working_size=geometry.working_size,
            grid=geometry.grid,
            pad_to_square=geometry.pad_to_square,
            batch_size=geometry.batch_size,
            score=geometry.score,
        )
        return result.anomaly_map, result.score

    def predict(self, image: np.ndarray | str | Path) -> Prediction:
        """Smoothed full-resolution map, image score and threshold decisions, as the model gives them."""
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


def open_predictor(model_path: str | Path, runtime: str | None = None, providers: list[str] | None = None) -> Any:
    """The predictor of any hrad export (tiled/downsample or tiled ensemble), by its sidecar.

    ``model_path`` is the ``.onnx`` or, for an OpenVINO export, the ``.xml`` (whose default
    runtime is then ``openvino``); the sidecar is the ``.json`` next to it.
    """
    from hrad.export_ensemble import OnnxEnsemblePredictor, load_sidecar

    model_path = Path(model_path)
    if runtime is None:
        runtime = "openvino" if model_path.suffix == ".xml" else "onnxruntime"
    onnx_path = model_path.with_suffix(".onnx")
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: exported model not found")
    sidecar = load_sidecar(onnx_path)
    if sidecar.get("format") == SIDECAR_FORMAT and sidecar.get("geometry", {}).get("strategy") == "tiled-ensemble":
        return OnnxEnsemblePredictor(onnx_path, sidecar, providers, runtime=runtime)
    return OnnxPredictor(onnx_path, providers=providers, runtime=runtime)


# -- runtimes -------------------------------------------------------------------------------------
RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "fp16")
#: OpenVINO IR vs onnxruntime on the same inputs, relative to the output's magnitude: FP32 runs
#: other CPU kernels (summation order), FP16 stores the weights in half precision
OPENVINO_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise ConfigError("OpenVINO export and runtime need the openvino package: pip install 'hrad[openvino]'") from None
    return openvino


class OpenVINOSession:
    """onnxruntime's ``run(None, feeds) -> [outputs]`` over an OpenVINO model compiled for the CPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        openvino = _openvino()
        core = openvino.Core()
        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.outputs = list(self.compiled.outputs)

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.compiled(feeds)
        return [np.asarray(result[output]) for output in self.outputs]


def inference_session(onnx_path: Path, sidecar: dict[str, Any], runtime: str, providers: list[str] | None = None) -> Any:
    """A session with ``run(None, feeds)`` for the export at ``onnx_path``: onnxruntime on the ONNX
    graph, or OpenVINO on the sidecar's IR (``hrad export --format openvino``), else on the ONNX."""
    if runtime == "onnxruntime":
        return _onnxruntime().InferenceSession(str(onnx_path), providers=providers or ["CPUExecutionProvider"])
    if runtime == "openvino":
        openvino_files = sidecar.get("openvino") or {}
        path = onnx_path.with_name(openvino_files["xml"]) if "xml" in openvino_files else onnx_path
        return OpenVINOSession(path)
    raise ConfigError(f"runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")


def _random_feeds(sidecar: dict[str, Any], batch: int = 2) -> dict[str, np.ndarray]:
    """Random inputs in [0, 1] for an export's graph (tile positions 0.. for an ensemble)."""
    generator = np.random.default_rng(0)
    shape = sidecar["input"].get("tiles") or sidecar["input"]["shape"]
    feeds: dict[str, np.ndarray] = {INPUT_NAME: generator.random((batch, *shape[1:]), dtype=np.float32)}
    if "positions" in sidecar["input"]:
        feeds["positions"] = np.arange(batch, dtype=np.int64) % int(sidecar["geometry"]["tile_count"])
    return feeds


def export_openvino(
    model: AnomalyModel, out_path: str | Path, precision: str = "fp32", tile_size: int | None = None
) -> Path:
    """ONNX export (verified against PyTorch), converted to OpenVINO IR ``out_path`` (.xml + .bin).

    The ``.onnx`` and the sidecar ``.json`` are written next to the IR; the sidecar names the IR
    and records how far it is from onnxruntime on random inputs (must be within
    :data:`OPENVINO_TOLERANCE`). ``precision`` fp16 stores the weights in half precision (OpenVINO
    still computes in FP32 on CPUs without native FP16/BF16). Returns the sidecar's path.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    openvino = _openvino()
    xml_path = Path(out_path).with_suffix(".xml")
    onnx_path = xml_path.with_suffix(".onnx")
    sidecar_path = export_onnx(model, onnx_path, tile_size=tile_size)
    sidecar = json.loads(sidecar_path.read_text())
    converted = openvino.convert_model(str(onnx_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        openvino.save_model(converted, str(xml_path), compress_to_fp16=precision == "fp16")
    feeds = _random_feeds(sidecar)
    reference = _onnxruntime().InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    ours = OpenVINOSession(xml_path).run(None, feeds)
    difference = max(_max_difference(a, b) for a, b in zip(ours, reference, strict=True))
    if not difference <= OPENVINO_TOLERANCE[precision]:
        xml_path.unlink(missing_ok=True)
        xml_path.with_suffix(".bin").unlink(missing_ok=True)
        raise RuntimeError(f"OpenVINO {precision} export differs from ONNX by {difference:.2e} (relative); not written")
    sidecar["openvino"] = {
        "xml": xml_path.name,
        "bin": xml_path.with_suffix(".bin").name,
        "precision": precision,
        "openvino_version": openvino.__version__,
        "max_difference_vs_onnx": difference,
    }
    _atomic_write(sidecar_path, lambda path: Path(path).write_text(json.dumps(sidecar, indent=2)))
    return sidecar_path
