"""Running an hrad export: the sidecar, inference sessions (onnxruntime, OpenVINO) and the
predictors that do everything around the exported per-tile graph as ``hrad predict`` does.

Shared by :mod:`hrad.export` and :mod:`hrad.export_ensemble` (which write exports) and by
``hrad predict`` / ``hrad serve`` on an exported model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.imaging import resize
from hrad.postprocess.seams import smooth_seams
from hrad.postprocess.smoothing import PostprocessConfig, gaussian_smooth, image_score
from hrad.strategies.base import to_tensor
from hrad.strategies.ensemble import TiledEnsembleConfig
from hrad.strategies.tiled import long_side_size, predict_tiles
from hrad.strategies.tiling import TileGrid, TileMerger

if TYPE_CHECKING:
    from hrad.model import Prediction

SIDECAR_FORMAT = "hrad-onnx"
SIDECAR_VERSION = 2
INPUT_NAME = "tiles"
RUNTIMES = ("onnxruntime", "openvino")


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """``write(temporary path)`` beside ``path``, then moved over it (nothing half-written is left)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def max_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """Largest difference relative to the reference's magnitude (at least 1)."""
    return float(np.abs(ours - reference).max() / max(1.0, float(np.abs(reference).max())))


def load_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The sidecar ``.json`` next to an export's ``.onnx``; a one-line error when missing, corrupt or foreign."""
    sidecar = Path(onnx_path).with_suffix(".json")
    try:
        content = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{sidecar}: ONNX sidecar not found (written next to the .onnx by hrad export)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{sidecar}: corrupt ONNX sidecar") from None
    if not isinstance(content, dict) or content.get("format") != SIDECAR_FORMAT or content.get("format_version") != SIDECAR_VERSION:
        raise ArtifactError(f"{sidecar}: not an hrad ONNX sidecar of format version {SIDECAR_VERSION}")
    return content


def onnxruntime_module() -> Any:
    """The onnxruntime module, or a one-line error naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX export and OnnxPredictor run the graph with onnxruntime: pip install 'hrad[export]'") from None
    return onnxruntime


def openvino_module() -> Any:
    try:
        import openvino
    except ImportError:
        raise ConfigError("OpenVINO export and runtime need the openvino package: pip install 'hrad[openvino]'") from None
    return openvino


class OpenVINOSession:
    """onnxruntime's ``run(None, feeds) -> [outputs]`` over an OpenVINO model compiled for the CPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        openvino = openvino_module()
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
        return onnxruntime_module().InferenceSession(str(onnx_path), providers=providers or ["CPUExecutionProvider"])
    if runtime == "openvino":
        openvino_files = sidecar.get("openvino") or {}
        path = onnx_path.with_name(openvino_files["xml"]) if "xml" in openvino_files else onnx_path
        return OpenVINOSession(path)
    raise ConfigError(f"runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")


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


def _prediction(sidecar: dict[str, Any], postprocess: PostprocessConfig, raw_map: np.ndarray, raw_score: float) -> Prediction:
    from hrad.model import Prediction

    smoothed = gaussian_smooth(raw_map, postprocess.sigma)
    thresholds = sidecar.get("thresholds")
    return Prediction(
        anomaly_map=smoothed,
        score=image_score(smoothed, raw_score, postprocess),
        image_threshold=thresholds["image"] if thresholds else None,
        pixel_threshold=thresholds["pixel"] if thresholds else None,
    )


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
        if not self.onnx_path.is_file():
            raise ArtifactError(f"{self.onnx_path}: ONNX model not found")
        self.sidecar = load_sidecar(sidecar_path if sidecar_path is not None else self.onnx_path)
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
        from hrad.model import as_image

        return _prediction(self.sidecar, self.postprocess, *self.predict_raw(as_image(image)))


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
        padded = grid.pad(resize(to_tensor(image), work)[0])
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
        full = resize(torch.from_numpy(np.ascontiguousarray(merged))[None, None], (height, width))
        return full[0, 0].numpy().astype(np.float32), score

    def predict(self, image: np.ndarray | str | Path) -> Prediction:
        from hrad.model import as_image

        return _prediction(self.sidecar, self.postprocess, *self.predict_raw(as_image(image)))


def open_predictor(model_path: str | Path, runtime: str | None = None, providers: list[str] | None = None) -> Any:
    """The predictor of any hrad export (tiled/downsample or tiled ensemble), by its sidecar.

    ``model_path`` is the ``.onnx`` or, for an OpenVINO export, the ``.xml`` (whose default
    runtime is then ``openvino``); the sidecar is the ``.json`` next to it.
    """
    model_path = Path(model_path)
    if runtime is None:
        runtime = "openvino" if model_path.suffix == ".xml" else "onnxruntime"
    onnx_path = model_path.with_suffix(".onnx")
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: exported model not found")
    sidecar = load_sidecar(onnx_path)
    if sidecar.get("geometry", {}).get("strategy") == "tiled-ensemble":
        return OnnxEnsemblePredictor(onnx_path, sidecar, providers, runtime=runtime)
    return OnnxPredictor(onnx_path, providers=providers, runtime=runtime)
