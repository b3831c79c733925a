"""Running an hrad export without torch: the sidecar, inference sessions (onnxruntime, OpenVINO)
and the predictors that do everything around the exported per-tile graph as ``hrad predict`` does.

This module and what it imports need numpy, OpenCV, Pillow, SciPy and onnxruntime or OpenVINO,
never torch (``tests/test_export_runtime.py`` runs it with torch hidden), so an exported model
runs on a box without a training environment. Shared by :mod:`hrad.export` and
:mod:`hrad.export_ensemble` (which write exports) and by ``hrad predict`` / ``hrad serve`` on an
exported model (``--model model.onnx`` or ``model.xml``).

The array work follows the sidecar's ``steps``: what :func:`hrad.strategies.tiled.predict_tiles`
and :class:`hrad.strategies.ensemble.TiledEnsemble` do with torch, written with numpy and Pillow.
Resizing is Pillow's bilinear filter on float32 planes, which is torch's
``interpolate(bilinear, align_corners=False, antialias=True)`` (Pillow's filter is what torch's
antialiasing reproduces; when enlarging, both are plain bilinear). :class:`TileLayout` is the
strategies' own tile arithmetic (:class:`hrad.tile_geometry.TileGeometry`, torch-free) cutting
numpy arrays; the tests check the exports against the torch model on the same images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hrad import strict_json
from hrad.data.bit_depth import stored_bit_depth
from hrad.data.images import as_image, atomic_write, is_gray, model_input, stored_gray
from hrad.errors import ArtifactError, ConfigError, HradError, InputError, named
from hrad.hiad_math import (
    bilinear_weights,
    cell_centres,
    level_size,
    low_branch_size,
    nearest_centroid,
    normalize_range,
    pooled_max,
    valid_cells,
)
from hrad.openvino_core import openvino_core
from hrad.postprocess.border import calibrate_border, ratio_table
from hrad.postprocess.roi import RegionOfInterest, finished_prediction
from hrad.postprocess.seams import smooth_seams
from hrad.postprocess.smoothing import (
    MapScore,
    PostprocessConfig,
    gaussian_smooth,
    smooth_and_score,
    top_fraction_mean,
)
from hrad.prediction import (
    Prediction,
    Thresholds,
    check_ensemble_size,
    check_image_size,
    check_pool_size,
    decision_thresholds,
    tell_colour,
    tell_scale,
)
from hrad.tile_geometry import Edge, TileGeometry, TilePosition

SIDECAR_FORMAT = "hrad-onnx"
SIDECAR_VERSION = 2
INPUT_NAME = "tiles"
RUNTIMES = ("onnxruntime", "openvino")


def write_sidecar(path: Path, content: dict[str, Any]) -> Path:
    """Write an export's sidecar ``content`` (JSON) atomically to ``path``; returns ``path``."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(strict_json.dumps(content, indent=2)))
    return path


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


def saved_model_facts(record: dict[str, Any], exported: bool, where: str) -> dict[str, Any]:
    """What a saved model is, as values, from its manifest (``hrad.json``) or, ``exported``, its
    export's sidecar (``where`` names the file): who saved it, its parts, fitted size, bit depth,
    region of interest, thresholds and training losses. The one reading of both files that
    ``hrad info`` and ``hrad serve``'s ``/health`` show; here, torch-free, so both can import it.
    Fields are not checked one by one when the file is read: a damaged one is one line."""
    return saved_model_reading(record, exported, where)[0]


def saved_model_reading(record: dict[str, Any], exported: bool, where: str) -> tuple[dict[str, Any], RegionOfInterest | None]:
    """:func:`saved_model_facts` and the region of interest they were read from, decoded once
    (``hrad info --page`` draws its mask)."""
    try:
        return _saved_model_facts(record, exported, where)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        what = "corrupt ONNX sidecar" if exported else "corrupt model manifest"
        raise ArtifactError(f"{where}: {what} ({type(error).__name__}: {' '.join(str(error).split())})") from None


def _saved_model_facts(record: dict[str, Any], exported: bool, where: str) -> tuple[dict[str, Any], RegionOfInterest | None]:
    if exported:
        about = record.get("model", {})
        names = {part: about.get(part) for part in ("strategy", "detector", "backbone")}
        # a tiled ensemble's sidecar keeps its size in the geometry only, where its predictor reads it
        fitted = about.get("fitted_size") or record.get("geometry", {}).get("fitted_size")
        weights, history = about.get("backbone_weights"), None
    else:
        config = record.get("config", {})
        names = {part: (config.get(part) or {}).get("name") for part in ("strategy", "detector", "backbone")}
        weights, fitted, history = record.get("backbone_weights"), record.get("fitted_size"), record.get("training_history")
    roi = RegionOfInterest.from_json(record.get("roi"), where)
    thresholds = record.get("thresholds")
    facts = {
        "saved_by": record.get("hrad_version"),
        **names,
        "backbone_weights": weights,
        "fitted_size": {"width": int(fitted[1]), "height": int(fitted[0])} if fitted else None,
        "bit_depth": stored_bit_depth(record.get("bit_depth"), where),  # what loading the model would accept
        "pixel_type": record.get("pixel_type"),  # of the training images (None: saved or exported before it was kept)
        "gray": stored_gray(record.get("gray"), where),  # whether the training images were gray (None: not recorded)
        "region_of_interest": (
            {"width": roi.mask.shape[1], "height": roi.mask.shape[0], "inspected": roi.inspected} if roi is not None else None
        ),
        "thresholds": (
            {
                "image": float(thresholds["image"]),
                "pixel": float(thresholds["pixel"]),
                "sigmas": None if thresholds.get("sigmas") is None else float(thresholds["sigmas"]),
                "held_out_images": len(thresholds.get("validation_image_scores") or []),
                "held_out_scores": [float(score) for score in thresholds.get("validation_image_scores") or []],
                "pixel_mean": None if thresholds.get("pixel_mean") is None else float(thresholds["pixel_mean"]),
                "pixel_std": None if thresholds.get("pixel_std") is None else float(thresholds["pixel_std"]),
                "calibrated": bool(thresholds.get("calibrated", False)),
            }
            if thresholds
            else None
        ),
        "training": {
            str(stage): {
                "epochs": len(values), "first_loss": float(values[0]), "last_loss": float(values[-1]), "losses": [float(v) for v in values]
            }
            for stage, values in (history or {}).items()
            if values
        },
    }
    return facts, roi


def onnxruntime_module() -> Any:
    """The onnxruntime module, or a one-line error naming what installs it (the package itself on a
    torch-free runtime box, where the extra would pull torch)."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX export and OnnxPredictor run the graph with onnxruntime: pip install onnxruntime (or 'hrad[export]' beside torch)") from None
    return onnxruntime


def openvino_module() -> Any:
    try:
        import openvino
    except ImportError:
        raise ConfigError("OpenVINO export and runtime need the openvino package: pip install openvino (or 'hrad[openvino]' beside torch)") from None
    return openvino


class OpenVINOSession:
    """onnxruntime's ``run(None, feeds) -> [outputs]`` over an OpenVINO model compiled for the CPU.

    Computed in FP32 on every CPU (an FP16 IR only stores its weights in half precision; an INT8
    one keeps its scoring in float): left to itself, OpenVINO's CPU plugin runs float graphs in
    bf16 on CPUs with AMX / AVX-512 BF16, 0.3-0.5% off onnxruntime, past what ``hrad export``
    verified and records in the sidecar. Every session compiles through the process's one
    ``openvino.Core`` (:func:`hrad.openvino_core.openvino_core`: a Core per session, HiAD holds
    several, crashed the next signal handler)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        openvino_module()  # installed, or one line saying how
        core = openvino_core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.outputs = list(self.compiled.outputs)

    def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.compiled(feeds)
        return [np.asarray(result[output]) for output in self.outputs]


def _loaded(path: Path, load: Callable[[], Any]) -> Any:
    """``load()`` the graph at ``path``, a missing or unreadable one (an export copied without all
    its files, or cut short) as one line naming it instead of the runtime's traceback."""
    if not path.is_file():
        raise ArtifactError(f"{path}: graph of the export not found (hrad export writes it beside the sidecar: copy all of the export's files)")
    try:
        return load()
    except HradError:
        raise
    except Exception as error:
        reason = " ".join(str(error).split()).rsplit(f"{path} failed:", 1)[-1].strip()  # onnxruntime: "... Load model from PATH failed:WHY"
        raise ArtifactError(f"{path}: the runtime cannot load this graph (cut short or damaged? copy or export it again): {reason[:300]}") from None


#: onnxruntime's session config key for whether its intra-op worker threads busy-wait between ops
SPINNING_KEY = "session.intra_op.allow_spinning"


def onnxruntime_session(graph: str | Path | bytes, providers: list[str] | None = None, spinning: bool = False) -> Any:
    """An onnxruntime ``InferenceSession`` of ``graph`` (a path or the serialized model) on
    ``providers`` (default: the CPU), the one place hrad creates them (exports' checks included).

    Its intra-op threads sleep between ops unless ``spinning``: onnxruntime lets them busy-wait by
    default, which on a shared or loaded CPU (2-core CI, a line PC running other software) takes
    the cores from the work itself: on a loaded 2-core CPU, predict time off / on was 0.77 (HiAD),
    0.85 (tiled ensemble) and 0.88 (MRF) (``benchmarks/results/export_spinning.md``)."""
    module = onnxruntime_module()
    options = module.SessionOptions()
    options.add_session_config_entry(SPINNING_KEY, "1" if spinning else "0")
    source = graph if isinstance(graph, bytes) else str(graph)
    return module.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])


def inference_session(
    onnx_path: Path, sidecar: dict[str, Any], runtime: str, providers: list[str] | None = None, spinning: bool = False
) -> Any:
    """A session with ``run(None, feeds)`` for the export at ``onnx_path``: onnxruntime on the ONNX
    graph (its threads busy-waiting between ops only with ``spinning``: :func:`onnxruntime_session`),
    or OpenVINO on the sidecar's IR (``hrad export --format openvino``), else on the ONNX."""
    if runtime == "onnxruntime":
        return _loaded(onnx_path, lambda: onnxruntime_session(onnx_path, providers, spinning))
    if runtime == "openvino":
        openvino_files = sidecar.get("openvino") or {}
        path = onnx_path.with_name(openvino_files["xml"]) if "xml" in openvino_files else onnx_path
        return _loaded(path, lambda: OpenVINOSession(path))
    raise ConfigError(f"runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")


def graph_session(
    onnx_path: Path, sidecar: dict[str, Any], runtime: str, providers: list[str] | None = None, spinning: bool = False
) -> Any:
    """A session for one more graph of a multi-graph export (HiAD) beside the sidecar: its OpenVINO
    IR when the export converted it (``sidecar['openvino']['graphs']``), else the ONNX file."""
    if runtime == "openvino":
        converted = (sidecar.get("openvino") or {}).get("graphs", {})
        path = onnx_path.with_name(converted[onnx_path.name]) if onnx_path.name in converted else onnx_path
        return _loaded(path, lambda: OpenVINOSession(path))
    return inference_session(onnx_path, sidecar, runtime, providers, spinning)


def resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two dims of a float array to ``size`` (antialiased when
    shrinking, the torch strategies' rule); float32. Unchanged when the size is."""
    if tuple(array.shape[-2:]) == tuple(size):
        return array
    planes = array.reshape(-1, *array.shape[-2:])
    resized = [
        np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        for plane in planes
    ]
    return np.stack(resized).reshape(*array.shape[:-2], *size)


def _pad(array: np.ndarray, top: int, bottom: int, left: int, right: int, zeros: bool) -> np.ndarray:
    """Pad the last two dims: zeros, else by reflection (edge replication where a side is too short)."""
    if not (top or bottom or left or right):
        return array
    height, width = array.shape[-2:]
    widths = [(0, 0)] * (array.ndim - 2) + [(top, bottom), (left, right)]
    if zeros:
        return np.pad(array, widths)
    return np.pad(array, widths, mode="reflect" if max(top, bottom) < height and max(left, right) < width else "edge")


class TileLayout(TileGeometry):
    """:class:`~hrad.tile_geometry.TileGeometry` (the strategies' tile arithmetic) cutting numpy
    arrays: padding and context windows as :class:`hrad.strategies.tiling.TileGrid` cuts tensors
    (``edge`` shift or zeros)."""

    def pad(self, image: np.ndarray) -> np.ndarray:
        """``C x H x W`` padded at the bottom/right to the size the tiles are cut from."""
        return _pad(image, 0, self.padded_height - self.height, 0, self.padded_width - self.width, self.edge == "zeros")

    def windows(self, padded: np.ndarray, positions: list[TilePosition]) -> np.ndarray:
        """``N x C x (tile + 2 margin)^2``: each tile with ``margin`` context pixels of real
        neighbours, reflected only beyond the image (zeros with edge=zeros)."""
        m = self.margin
        height, width = padded.shape[-2:]
        cut = []
        for p in positions:
            top, left, bottom, right = p.y - m, p.x - m, p.y + self.tile_h + m, p.x + self.tile_w + m
            crop = padded[..., max(0, top) : min(height, bottom), max(0, left) : min(width, right)]
            pads = (max(0, -top), max(0, bottom - height), max(0, -left), max(0, right - width))
            cut.append(_pad(crop, *pads, zeros=self.edge == "zeros"))
        return np.stack(cut)

    def batches(self, padded: np.ndarray, batch_size: int) -> Iterator[tuple[list[TilePosition], np.ndarray]]:
        positions = list(self.positions())
        for start in range(0, len(positions), max(1, batch_size)):
            chunk = positions[start : start + batch_size]
            yield chunk, self.windows(padded, chunk)


class _Merger:
    """Overlapping tile maps averaged into one map (float64 sums, like ``TileMerger``)."""

    def __init__(self, layout: TileLayout) -> None:
        self.layout = layout
        self.total = np.zeros((layout.padded_height, layout.padded_width), dtype=np.float64)
        self.count = np.zeros((layout.padded_height, layout.padded_width), dtype=np.float64)

    def add(self, y: int, x: int, tile_map: np.ndarray) -> None:
        self.total[y : y + self.layout.tile_h, x : x + self.layout.tile_w] += tile_map
        self.count[y : y + self.layout.tile_h, x : x + self.layout.tile_w] += 1

    def result(self) -> np.ndarray:
        return (self.total / self.count)[: self.layout.height, : self.layout.width].astype(np.float32)


def _long_side_size(height: int, width: int, long_side: int | None) -> tuple[int, int]:
    """As :func:`hrad.strategies.tiled.long_side_size`."""
    if long_side is None:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class Geometry:
    """How an image becomes network inputs; mirrors :class:`TiledStrategy` for both configs.

    ``downsample``: the (optionally square-padded) image is resized to ``tile`` x ``tile`` and
    is the one tile. ``tiled``: the image is resized to ``long_side`` (if set) and covered by
    tiles (``tile`` at ``stride``, ``edge`` rule); each tile is cut with ``margin`` context
    pixels on every side (reflected past the image border) and the window resized to
    ``input_size + 2 * input_margin`` when that differs (ViTs need multiples of 14). The network
    crops the margin's cells itself.
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
    edge: Edge = "shift"

    @property
    def network_input(self) -> int:
        return self.input_size + 2 * self.input_margin

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        if self.strategy == "downsample":
            return self.tile, self.tile
        return _long_side_size(height, width, self.long_side)

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        """As :meth:`hrad.strategies.tiled.TiledStrategy.input_scale`: square-padded first, then resized."""
        if self.pad_to_square:
            height = width = max(height, width)
        working_height, working_width = self.working_size(height, width)
        return working_height / height, working_width / width

    def layout(self, height: int, width: int) -> TileLayout:
        if self.strategy == "downsample":
            side = max(height, width)
            return TileLayout.square(height, width, side, side)
        return TileLayout.square(height, width, self.tile, self.stride, self.margin, self.edge)


class ExportedPredictor:
    """What every exported model's predictor shares: its sidecar, session, thresholds and
    :meth:`predict` (smoothing, image score and decisions around the subclass's ``predict_raw``)."""

    #: how ``predict_raw``'s score follows from its map, when it does (HiAD; :attr:`hrad.strategies.base.Strategy.map_score`)
    map_score: MapScore | None = None

    def __init__(
        self, onnx_path: str | Path, sidecar: dict[str, Any], runtime: str, providers: list[str] | None, spinning: bool = False
    ) -> None:
        self.onnx_path = Path(onnx_path)
        self.sidecar = sidecar
        self.postprocess = PostprocessConfig.model_validate(sidecar["postprocess"])
        thresholds = sidecar.get("thresholds")
        #: the model's thresholds (older sidecars hold only image/pixel: no sigmas then)
        self.thresholds = Thresholds.from_json(thresholds) if thresholds else None
        self.runtime = runtime
        fitted = sidecar.get("model", {}).get("fitted_size") or sidecar.get("geometry", {}).get("fitted_size")
        #: the size of the images the model was fitted on (far smaller images are refused, as by the model)
        self.fitted_size: tuple[int, int] | None = (int(fitted[0]), int(fitted[1])) if fitted else None
        #: significant bits of the 16-bit training images (:func:`hrad.prediction.model_range`)
        self.bit_depth = stored_bit_depth(sidecar.get("bit_depth"), f"{onnx_path} sidecar")
        #: the region of interest every map is finished with (:mod:`hrad.postprocess.roi`)
        self.roi = RegionOfInterest.from_json(sidecar.get("roi"), f"{onnx_path} sidecar")
        #: what scales an image before its features, in the scale warning's words (None: an older
        #: export, which does not warn)
        self.resizing: str | None = sidecar.get("resizing")
        self._scale_told = False  # told of an image scaled unlike the training images already
        #: whether the training images were gray (None: an older export, which does not warn of a
        #: gray image among colour ones or the reverse)
        self.gray = stored_gray(sidecar.get("gray"), f"{onnx_path} sidecar")
        self._colour_told = False  # told of an image of the other kind (gray, colour) already
        self.session = inference_session(self.onnx_path, sidecar, runtime, providers, spinning)

    def predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        raise NotImplementedError

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        """The factors (rows, columns) a ``height x width`` image is scaled by before its
        features, as the strategy's :meth:`~hrad.strategies.base.Strategy.input_scale`.
        Default: native resolution."""
        return 1.0, 1.0

    def _tell_scale(self, image: np.ndarray, name: str) -> None:
        """As :meth:`hrad.model.AnomalyModel.predict`: one warning, the first time only, when the
        export scales an image unlike the training images (same words: :func:`~hrad.prediction.scale_problem`),
        and a served request the line for each such image of its own (:func:`~hrad.prediction.tell_scale`)."""
        if self.resizing is None or self.fitted_size is None:
            return
        self._scale_told = tell_scale(
            self._scale_told, name, image.shape[:2], self.fitted_size, self.input_scale, self.resizing,
            stacklevel=3,  # the caller of predict
        )

    def decision_thresholds(
        self, threshold: float | None = None, pixel_threshold: float | None = None, sigmas: float | None = None
    ) -> tuple[float | None, float | None]:
        """As :meth:`hrad.model.AnomalyModel.decision_thresholds`, from the sidecar's thresholds."""
        return decision_thresholds(self.thresholds, threshold, pixel_threshold, sigmas)

    def predict(
        self,
        image: np.ndarray | str | Path,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        sigmas: float | None = None,
        name: str | None = None,
    ) -> Prediction:
        """Smoothed full-resolution map, image score and threshold decisions, as the model gives
        them (``name`` as for :meth:`hrad.model.AnomalyModel.predict`, which warns as this does
        of the first image scaled unlike the training images: :meth:`_tell_scale`, and of the first
        gray one when the training images were colour, or the reverse)."""
        pixels, name = model_input(image, self.bit_depth, name)
        array = as_image(pixels)
        check_image_size(array, self.fitted_size, name)
        # as the model's _tell_colour; of the pixels: the float copy no longer tells a gray image
        self._colour_told = tell_colour(self._colour_told, name, is_gray(pixels), self.gray, stacklevel=2)  # the caller of predict
        decisions = self.decision_thresholds(threshold, pixel_threshold, sigmas)
        border = self.thresholds.border_ratios if self.thresholds is not None else None
        try:  # predict_raw's checks (a tiled ensemble's size) see only the array: name the file, as the model does
            raw = self.predict_raw(array)
        except HradError as error:
            raise named(name, error) from None
        self._tell_scale(array, name)  # of an image predicted: one it refuses (another size for a positional pool) is only refused
        smoothed, score = smooth_and_score(*raw, self.postprocess, border, self.roi, self.map_score)
        return finished_prediction(smoothed, score, decisions, self.roi)

    def predict_batch(
        self,
        images: Sequence[np.ndarray | str | Path],
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        sigmas: float | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """:meth:`predict` of each image in order: :class:`~hrad.prediction.Predictor`'s signature,
        as :meth:`hrad.model.AnomalyModel.predict_batch`, so ``hrad evaluate`` and ``hrad predict``
        drive an export as they drive a model (the graph runs one image's tiles at a time)."""
        given = names if names is not None else [None] * len(images)
        return [
            self.predict(image, threshold=threshold, pixel_threshold=pixel_threshold, sigmas=sigmas, name=name)
            for image, name in zip(images, given, strict=True)
        ]


class OnnxPredictor(ExportedPredictor):
    """Runs an exported downsample/tiled model with onnxruntime or OpenVINO, equal to
    :meth:`AnomalyModel.predict` up to float rounding: the executable form of the sidecar's ``steps``."""

    def __init__(
        self,
        onnx_path: str | Path,
        sidecar_path: str | Path | None = None,
        providers: list[str] | None = None,
        runtime: str = "onnxruntime",
        spinning: bool = False,
    ) -> None:
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ArtifactError(f"{onnx_path}: ONNX model not found")
        sidecar = load_sidecar(sidecar_path if sidecar_path is not None else onnx_path)
        self.geometry = Geometry(**sidecar["geometry"])
        super().__init__(onnx_path, sidecar, runtime, providers, spinning)

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        return self.geometry.input_scale(height, width)

    def score_windows(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tile windows ``N x 3 x h x w`` at image scale -> the graph's ``(maps, scores)``."""
        side = self.geometry.network_input
        inputs = np.ascontiguousarray(resize(windows, (side, side)), dtype=np.float32)
        maps, scores = self.session.run(None, {INPUT_NAME: inputs})
        return maps, scores

    def predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Unsmoothed full-resolution map and the strategy score (:func:`predict_tiles`' steps)."""
        geometry = self.geometry
        height, width = image.shape[:2]
        planes = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        if geometry.pad_to_square:
            side = max(height, width)
            planes = np.pad(planes, ((0, 0), (0, side - height), (0, side - width)), mode="edge")
        planes = resize(planes, geometry.working_size(*planes.shape[-2:]))
        layout = geometry.layout(*planes.shape[-2:])
        merger = _Merger(layout)
        scores = []
        for positions, windows in layout.batches(layout.pad(planes), geometry.batch_size):
            maps, tile_scores = self.score_windows(windows)
            for p, tile_map in zip(positions, resize(maps.astype(np.float32), (layout.tile_h, layout.tile_w)), strict=True):
                merger.add(p.y, p.x, tile_map)
            scores.append(tile_scores.astype(np.float32))
        merged = merger.result()
        if geometry.pad_to_square:  # crop the square padding (scaled) before anything is scored
            side = merged.shape[-1]
            merged = merged[: math.ceil(side * height / max(height, width)), : math.ceil(side * width / max(height, width))]
        full = resize(merged, (height, width))
        best = float(np.concatenate(scores).max()) if geometry.score == "detector" else float(full.max())
        return full.astype(np.float32), best


class OnnxEnsemblePredictor(ExportedPredictor):
    """Runs an exported tiled ensemble (one graph, tile positions as input), equal to :meth:`AnomalyModel.predict`."""

    def __init__(
        self, onnx_path: str | Path, sidecar: dict[str, Any], providers: list[str] | None = None, runtime: str = "onnxruntime", spinning: bool = False
    ) -> None:
        super().__init__(onnx_path, sidecar, runtime, providers, spinning)
        geometry = sidecar["geometry"]
        self.config: dict[str, Any] = geometry["config"]
        self.fitted_size: tuple[int, int] = (int(geometry["fitted_size"][0]), int(geometry["fitted_size"][1]))
        self.work_size: tuple[int, int] = (int(geometry["work_size"][0]), int(geometry["work_size"][1]))
        self.margin = int(geometry["margin"])
        self.window: tuple[int, int] = (int(sidecar["input"]["tiles"][-2]), int(sidecar["input"]["tiles"][-1]))
        self.normalization = {key: np.asarray(value, dtype=np.float64) for key, value in sidecar["normalization"].items()}

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        """Every image is resized to the fitted working size (without ``image_size`` it must be of the fitted size)."""
        if self.config["image_size"] is None:
            return 1.0, 1.0
        return self.work_size[0] / height, self.work_size[1] / width

    def _normalize(self, values: np.ndarray, kind: str, index: int) -> np.ndarray:
        return (values - self.normalization[f"{kind}_shift"][index]) / self.normalization[f"{kind}_scale"][index]

    def predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        config = self.config
        height, width = image.shape[:2]
        if config["image_size"] is None:
            check_ensemble_size(image, self.fitted_size)
        stride = config["stride"] or config["tile"]
        layout = TileLayout.square(*self.work_size, config["tile"], stride, self.margin, config["tile_edge"])
        padded = layout.pad(resize(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32), self.work_size))
        merger = _Merger(layout)
        tile_scores = np.zeros(len(layout))
        tile_normalized = config["normalization"] == "tile"
        for positions, windows in layout.batches(padded, config["batch_size"]):
            index = np.asarray([p.index for p in positions], dtype=np.int64)
            inputs = np.ascontiguousarray(resize(windows, self.window), dtype=np.float32)
            maps, scores = self.session.run(None, {INPUT_NAME: inputs, "positions": index})
            upsampled = resize(maps.astype(np.float32), (layout.tile_h, layout.tile_w)).astype(np.float64)
            for p, tile_map, score in zip(positions, upsampled, scores.astype(np.float64), strict=True):
                tile = p.index
                if tile_normalized:
                    tile_map = self._normalize(tile_map, "map", tile)
                    score = self._normalize(np.array(score), "score", tile)
                merger.add(p.y, p.x, tile_map)
                tile_scores[tile] = score
        merged: np.ndarray = merger.result()
        if config["seam_smoothing"]:
            merged = smooth_seams(merged, layout, config["seam_band"], config["seam_sigma"])
        score = float(tile_scores.mean() if config["score_merge"] == "mean" else tile_scores.max())
        if config["normalization"] == "image":
            merged = self._normalize(merged, "map", 0)
            score = float(self._normalize(np.array([score]), "score", 0)[0])
        return resize(merged.astype(np.float32), (height, width)).astype(np.float32), score


def _mrf_working_size(height: int, width: int, pixel_budget: int | None) -> tuple[int, int]:
    """As :func:`hrad.strategies.mrf.working_size`: about ``pixel_budget`` pixels, the input's aspect."""
    if pixel_budget is None:
        return height, width
    factor = math.sqrt(pixel_budget / (height * width))
    return max(1, round(height * factor)), max(1, round(width * factor))


def _mrf_scale_sizes(height: int, width: int, geometry: dict[str, Any]) -> list[tuple[int, int]]:
    """Backbone input size at each scale: :meth:`hrad.strategies.mrf.MRFStrategy.scale_sizes`' arithmetic."""
    multiple = int(geometry["input_multiple"])
    height, width = _mrf_working_size(height, width, geometry["pixel_budget"])

    def rounded(side: float) -> int:
        return max(multiple, int(round(round(side) / multiple)) * multiple)

    return [(rounded(height * scale), rounded(width * scale)) for scale in geometry["scales"]]


class MRFPredictor(ExportedPredictor):
    """Runs an exported MRF-AD model (:mod:`hrad.export_mrf`): the image at every scale into the
    graph, its distance maps upsampled and fused, scored by max or top-fraction mean."""

    def __init__(
        self, onnx_path: str | Path, sidecar: dict[str, Any], providers: list[str] | None = None, runtime: str = "onnxruntime", spinning: bool = False
    ) -> None:
        super().__init__(onnx_path, sidecar, runtime, providers, spinning)
        self.geometry: dict[str, Any] = sidecar["geometry"]
        self.fitted_sizes = [tuple(size) for size in self.geometry["scale_sizes"]]

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        working_height, working_width = _mrf_working_size(height, width, self.geometry["pixel_budget"])
        return working_height / height, working_width / width

    def predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        geometry = self.geometry
        height, width = image.shape[:2]
        sizes = _mrf_scale_sizes(height, width, geometry)
        if sizes != self.fitted_sizes and not geometry["other_sizes_verified"]:
            fitted_h, fitted_w = geometry["fitted_size"]
            raise InputError(
                f"image {width}x{height} gives other backbone input sizes than the {fitted_w}x{fitted_h} images this "
                "export was made for, and its graph is not verified at other sizes"
            )
        planes = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        feeds = {f"scale{index}": np.ascontiguousarray(resize(planes, size)[None]) for index, size in enumerate(sizes)}
        maps = self.session.run(None, feeds)
        upsampled = (resize(np.asarray(grid, dtype=np.float32)[0], (height, width)) for grid in maps)
        if geometry["fusion"] == "max":
            fused = np.maximum.reduce(list(upsampled))
        else:
            fused = np.sum(list(upsampled), axis=0, dtype=np.float32) / len(maps)
        full = fused.astype(np.float32)
        score = float(full.max()) if geometry["score"] == "max" else top_fraction_mean(full, geometry["top_fraction"])
        return full, score


@dataclass
class _Level:
    """A coarser fusion level's feature map (``C x h x w``) and its scale to level 0."""

    features: np.ndarray
    ratio_y: float
    ratio_x: float
    cell: float


class HiADPredictor(ExportedPredictor):
    """Runs an exported HiAD model (:mod:`hrad.export_hiad`): patches and fusion levels through
    the backbone graph, fused features through their pool detector's graph, the low branch, then
    calibration, merging and the branches' max, as :meth:`hrad.strategies.hiad.HiAD.predict` does
    (its torch-free arithmetic is :mod:`hrad.hiad_math` and :class:`~hrad.tile_geometry.TileGeometry`)."""

    def __init__(
        self, onnx_path: str | Path, sidecar: dict[str, Any], providers: list[str] | None = None, runtime: str = "onnxruntime", spinning: bool = False
    ) -> None:
        super().__init__(onnx_path, sidecar, runtime, providers, spinning)
        self.geometry: dict[str, Any] = sidecar["geometry"]
        graphs = sidecar["graphs"]
        self.pool = [graph_session(self.onnx_path.with_name(graph["onnx"]), sidecar, runtime, providers, spinning) for graph in graphs["high"]]
        low = graphs["low"]
        self.low = None if low is None else graph_session(self.onnx_path.with_name(low["onnx"]), sidecar, runtime, providers, spinning)
        # the backbone traced at the low size when the window graph does not run there (older exports: no key)
        low_embedder = graphs.get("low_embedder")
        self.low_session = self.session if low_embedder is None else graph_session(self.onnx_path.with_name(low_embedder["onnx"]), sidecar, runtime, providers, spinning)
        self.window: tuple[int, int] = (int(sidecar["input"]["window"][0]), int(sidecar["input"]["window"][1]))
        assignment = sidecar["assignment"]
        self.kind: str = assignment["kind"]
        self.labels = None if assignment["position_labels"] is None else np.asarray(assignment["position_labels"], dtype=np.int64)
        self.centroids = None if assignment["centroids"] is None else np.asarray(assignment["centroids"], dtype=np.float64)
        self.ranges: dict[str, tuple[float, float]] = {name: (float(v[0]), float(v[1])) for name, v in sidecar["calibration"].items()}
        # exports from before the low branch's border calibration have no key: maps as then
        ratios = sidecar.get("low_border_ratios")  # a list, or with corner ratios a square table
        try:
            self.low_border: np.ndarray | None = None if ratios is None else ratio_table(ratios)
        except (TypeError, ValueError) as error:
            raise ArtifactError(f"{self.onnx_path.with_suffix('.json')}: corrupt ONNX sidecar (low_border_ratios: {error})") from None
        self.weights = dict(zip((int(r) for r in self.geometry["rates"]), (float(w) for w in self.geometry["weights"]), strict=True))
        if float(self.geometry["smoothing_sigma"]) == 0:  # as HiAD.map_score
            self.map_score = MapScore(float(self.geometry["score_sigma"]), int(self.geometry["score_pool"]))

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        """As :meth:`hrad.strategies.hiad.HiAD.input_scale`: the low branch's factors, else native."""
        if self.low is None:
            return 1.0, 1.0
        low_height, low_width = low_branch_size(height, width, int(self.geometry["low_res_size"]), int(self.geometry["multiple"]))
        return low_height / height, low_width / width

    def _embed(self, images: np.ndarray, session: Any = None) -> np.ndarray:
        (embeddings,) = (session or self.session).run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})
        return np.asarray(embeddings, dtype=np.float32)

    def _embed_windows(self, windows: np.ndarray) -> np.ndarray:
        """Windows at image scale -> the patches' own embeddings (context cells cropped)."""
        embeddings = self._embed(resize(windows, self.window))
        c = int(self.geometry["crop_cells"])
        return embeddings[..., c:-c, c:-c] if c else embeddings

    def _layout(self, height: int, width: int, stride: int, edge: Any) -> TileLayout:
        return TileLayout.square(height, width, int(self.geometry["patch"]), stride, int(self.geometry["margin"]), edge)

    def _level(self, planes: np.ndarray, rate: int) -> _Level:
        """The image at ``rate``, tiled on a regular reflect-padded grid, embedded, assembled."""
        height, width = planes.shape[-2:]
        size = level_size(height, width, rate)
        patch = int(self.geometry["patch"])
        layout = self._layout(*size, patch, "reflect")
        batch = int(self.geometry["batch_size"])
        features = np.concatenate([self._embed_windows(w) for _, w in layout.batches(layout.pad(resize(planes, size)), batch)])
        cell = patch / features.shape[-2]
        assembled = layout.assemble(features)
        return _Level(assembled[:, : valid_cells(size[0], cell), : valid_cells(size[1], cell)], size[0] / height, size[1] / width, cell)

    def _fuse(self, base: np.ndarray, levels: dict[int, _Level], corners: list[tuple[int, int]]) -> np.ndarray:
        """``w_0 * base + sum_k w_k * level_k`` sampled at each patch's cell centres."""
        fused = base * np.float32(self.weights[0]) if len(self.weights) > 1 else base
        grid_h, grid_w = base.shape[-2:]
        cell0 = int(self.geometry["patch"]) / grid_h
        for rate, level in levels.items():
            _, map_h, map_w = level.features.shape
            features = level.features.astype(np.float64)
            sampled = np.stack([
                np.einsum("yh,chw,xw->cyx", bilinear_weights(cell_centres(y, grid_h, cell0, level.ratio_y, level.cell), map_h),
                          features, bilinear_weights(cell_centres(x, grid_w, cell0, level.ratio_x, level.cell), map_w))
                for y, x in corners
            ]).astype(np.float32)  # fmt: skip
            fused = fused + np.float32(self.weights[rate]) * sampled
        return fused

    def predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        geometry = self.geometry
        height, width = image.shape[:2]
        fitted_h, fitted_w = geometry["fitted_size"]
        if geometry["positional"]:
            check_pool_size(image, (fitted_h, fitted_w), self.kind)
        planes = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        low_size = low_branch_size(height, width, int(geometry["low_res_size"]), int(geometry["multiple"]))
        if self.low is not None and list(low_size) != list(geometry["low_size"]) and not geometry["other_sizes_verified"]:
            raise InputError(
                f"image {width}x{height} gives another low-branch size than the {fitted_w}x{fitted_h} images this export "
                "was made for, and its graphs are not verified at other sizes"
            )
        levels = {rate: self._level(planes, rate) for rate, weight in self.weights.items() if rate > 0 and weight > 0}
        layout = self._layout(height, width, int(geometry["stride"]), geometry["edge"])
        patch = int(geometry["patch"])
        merger = _Merger(layout)
        for positions, windows in layout.batches(layout.pad(planes), int(geometry["batch_size"])):
            fused = self._fuse(self._embed_windows(windows), levels, [(p.y, p.x) for p in positions])
            index = np.asarray([p.index for p in positions], dtype=np.int64)
            if self.kind == "ra":
                assert self.centroids is not None
                labels = nearest_centroid(fused.mean(axis=(2, 3)).astype(np.float64), self.centroids)
            else:
                labels = np.zeros(len(index), dtype=np.int64) if self.kind == "a2o" else self.labels[index]  # type: ignore[index]
            maps = np.empty((len(index), *fused.shape[-2:]), dtype=np.float32)
            for m in np.unique(labels):
                selected = np.flatnonzero(labels == m)
                raw = self.pool[int(m)].run(None, {"embeddings": np.ascontiguousarray(fused[selected])})[0]
                maps[selected] = normalize_range(np.asarray(raw, dtype=np.float32).reshape(len(selected), *fused.shape[-2:]), *self.ranges[f"high.{int(m)}"])
            for p, tile_map in zip(positions, resize(maps, (patch, patch)), strict=True):
                merger.add(p.y, p.x, tile_map)
        final = merger.result()
        if self.low is not None:
            embeddings = self._embed(resize(planes, low_size)[None], self.low_session)
            low_map = calibrate_border(np.array(self.low.run(None, {"embeddings": embeddings})[0][0], dtype=np.float32), self.low_border)
            final = np.maximum(final, resize(normalize_range(low_map, *self.ranges["low"]), (height, width)))
        final = np.ascontiguousarray(final, dtype=np.float32)
        smoothing, score_sigma = float(geometry["smoothing_sigma"]), float(geometry["score_sigma"])
        returned = gaussian_smooth(final, smoothing)
        scored = returned if score_sigma == smoothing else gaussian_smooth(final, score_sigma)
        return returned, pooled_max(scored, int(geometry["score_pool"]))


def open_predictor(
    model_path: str | Path, runtime: str | None = None, providers: list[str] | None = None, spinning: bool = False
) -> ExportedPredictor:
    """The predictor of any hrad export (tiled/downsample or tiled ensemble), by its sidecar.

    ``model_path`` is the ``.onnx`` or, for an OpenVINO export, the ``.xml`` (whose default
    runtime is then ``openvino``); the sidecar is the ``.json`` next to it. ``spinning`` lets
    onnxruntime's threads busy-wait between ops (faster only on a CPU nothing else uses:
    :func:`onnxruntime_session`); OpenVINO has no such switch here.
    """
    model_path = Path(model_path)
    if runtime is None:
        runtime = "openvino" if model_path.suffix == ".xml" else "onnxruntime"
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")
    if spinning and runtime != "onnxruntime":
        raise ConfigError(f"thread spinning (--ort-spinning) is onnxruntime's; runtime {runtime} has no such switch")
    onnx_path = model_path.with_suffix(".onnx")
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: exported model not found")
    sidecar = load_sidecar(onnx_path)
    strategy = sidecar.get("geometry", {}).get("strategy")
    if strategy == "tiled-ensemble":
        return OnnxEnsemblePredictor(onnx_path, sidecar, providers, runtime=runtime, spinning=spinning)
    if strategy == "mrf":
        return MRFPredictor(onnx_path, sidecar, providers, runtime=runtime, spinning=spinning)
    if strategy == "hiad":
        return HiADPredictor(onnx_path, sidecar, providers, runtime=runtime, spinning=spinning)
    return OnnxPredictor(onnx_path, providers=providers, runtime=runtime, spinning=spinning)
