"""ONNX / OpenVINO export of the per-tile network, plus the sidecar that says what to do around it.

Only the part that needs a neural-network runtime is exported: one tile (or, for
``downsample``, the whole resized image) ``B x 3 x S x S`` in [0, 1] -> the detector's anomaly
maps at feature resolution ``B x h x w`` and its scores ``B`` (backbone + :class:`Embedder` +
the detector's :meth:`~hrad.detectors.base.Detector.scoring_module`). Resizing, tiling, merging,
smoothing and thresholds are cheap array work; the JSON sidecar records every number they need
and :mod:`hrad.export_runtime`'s predictors are the reference implementation of them around
onnxruntime or OpenVINO, equal to :meth:`AnomalyModel.predict` up to float rounding.

Module layout: the graphs and the verified ONNX writer are :mod:`hrad.export_graph`; running an
export is :mod:`hrad.export_runtime`; ``tiled-ensemble`` (PatchCore) exports through
:mod:`hrad.export_ensemble` (one graph, the tile position as a second input), ``mrf`` through
:mod:`hrad.export_mrf` (one graph, one input per scale), ``hiad`` through :mod:`hrad.export_hiad`
(the backbone once, one scoring graph per pool detector and the low branch). Detectors without a
scoring module are not exportable.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hrad.data.images import list_images
from hrad.errors import ConfigError, ExportCheckError
from hrad.export_ensemble import export_ensemble_onnx
from hrad.export_graph import (
    TileScorer,
    random_tiles,
    scoring_module,
    sidecar_header,
    sidecar_model,
    write_verified_onnx,
)
from hrad.export_hiad import export_hiad_onnx
from hrad.export_mrf import export_mrf_onnx
from hrad.export_runtime import (
    INPUT_NAME,
    RUNTIMES,
    Geometry,
    OnnxPredictor,
    OpenVINOSession,
    max_difference,
    onnxruntime_session,
    open_predictor,
    openvino_module,
    write_sidecar,
)
from hrad.strategies.tiled import DownsampleConfig, TiledConfig, TiledStrategy, round_to_multiple
from hrad.strategies.tiling import ContextEmbedder

if TYPE_CHECKING:
    from hrad.model import AnomalyModel

__all__ = ["RUNTIMES", "OnnxPredictor", "export_geometry", "export_onnx", "export_openvino", "open_predictor"]

EXPORTABLE_STRATEGIES = ("downsample", "tiled", "tiled-ensemble", "mrf", "hiad")

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
    return {
        **sidecar_header(model, onnx_name),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, geometry.network_input, geometry.network_input],
                  "dtype": "float32", "range": [0.0, 1.0], "channels": "RGB", "layout": "NCHW"},
        "outputs": {"maps": ["batch", *map_shape], "scores": ["batch"]},
        "geometry": asdict(geometry),
        "model": sidecar_model(model, fitted_size=list(model.fitted_size) if model.fitted_size else None),
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


def export_onnx(model: AnomalyModel, out_path: str | Path, tile_size: int | None = None, verify: bool = True) -> Path:
    """Write ``out_path`` (ONNX) and its sidecar ``out_path.with_suffix('.json')``; returns the sidecar.

    With ``verify`` the written graph is run by onnxruntime on random tiles (batches of 1 and 2)
    and must match the PyTorch module to :data:`hrad.export_graph.TOLERANCE`.
    """
    if model.config.strategy.name == "tiled-ensemble":
        if tile_size is not None:
            raise ConfigError("a tiled ensemble has one model per position of its fitted grid; --tile-size does not apply")
        return export_ensemble_onnx(model, out_path, verify=verify)
    if model.config.strategy.name == "mrf":
        if tile_size is not None:
            raise ConfigError("mrf has no tiles; --tile-size does not apply")
        return export_mrf_onnx(model, out_path, verify=verify)
    if model.config.strategy.name == "hiad":
        if tile_size is not None:
            raise ConfigError("hiad's patch grid is part of its fitted pool; --tile-size does not apply")
        return export_hiad_onnx(model, out_path, verify=verify)
    out_path = Path(out_path)
    geometry = export_geometry(model, tile_size)
    scoring = _scoring_module(model).to(model.device)
    crop = (geometry.input_margin // model.strategy.embedder.stride) if geometry.strategy == "tiled" else 0  # type: ignore[attr-defined]
    scorer = TileScorer(model.strategy.embedder, scoring, crop).eval()  # type: ignore[attr-defined]
    side = geometry.network_input
    example = random_tiles(2, side, side, model.device)
    with torch.no_grad():
        try:
            expected_maps, expected_scores = scorer(example)
        except RuntimeError as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"{model.config.detector.name} cannot score {geometry.tile}x{geometry.tile} inputs ({first})") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)

    try:
        write_verified_onnx(scorer, {INPUT_NAME: example}, (expected_maps, expected_scores), out_path, verify)
    except (torch.onnx.errors.OnnxExporterError, torch.onnx.errors.UnsupportedOperatorError) as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"{model.config.backbone.name} / {model.config.detector.name} cannot be exported to ONNX ({first})") from None
    content = _sidecar(model, geometry, out_path.name, tuple(expected_maps.shape[-2:]))  # type: ignore[arg-type]
    return write_sidecar(out_path.with_suffix(".json"), content)


PRECISIONS = ("fp32", "fp16", "int8")
#: OpenVINO IR vs onnxruntime on the same inputs, relative to the output's magnitude: FP32 runs
#: other CPU kernels (summation order), FP16 stores the weights in half precision; INT8 (checked
#: on its calibration inputs, not random ones) quantises the backbone's weights and activations,
#: so only a broken quantisation is caught here: its effect on maps and metrics is measured by
#: ``benchmarks/openvino_export.py``
OPENVINO_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.25}
#: graph nodes INT8 leaves in floating point: the detectors' scoring (kNN distances, Gaussians),
#: whose differences of large numbers 8-bit activations would wipe out
SCORING_NODES = r"^/scorings?[./].*"


def _random_feeds(sidecar: dict[str, Any], batch: int = 2) -> dict[str, np.ndarray]:
    """Random inputs in [0, 1] for an export's graph (tile positions 0.. for an ensemble)."""
    generator = np.random.default_rng(0)
    if "images" in sidecar["input"]:  # mrf: one image per scale
        return {name: generator.random(shape, dtype=np.float32) for name, shape in sidecar["input"]["images"].items()}
    shape = sidecar["input"].get("tiles") or sidecar["input"]["shape"]
    feeds: dict[str, np.ndarray] = {INPUT_NAME: generator.random((batch, *shape[1:]), dtype=np.float32)}
    if "positions" in sidecar["input"]:
        feeds["positions"] = np.arange(batch, dtype=np.int64) % int(sidecar["geometry"]["tile_count"])
    return feeds


def _calibration_feeds(onnx_path: Path, images: Sequence[Path], limit: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """The exported graphs' inputs (one sample each: tile windows, scales, backbone images) while
    its onnxruntime predictor predicts ``images``: what INT8 calibrates its activation ranges on.

    Keyed by the predictor's session attribute: ``session`` (the main graph; at most ``limit``
    samples) and, for a HiAD export with a low branch, ``low_session`` (its whole downsampled
    image, one per predicted image), recorded apart even where the window graph runs it (no
    low-size backbone graph), so the low branch is calibrated however many windows come first.
    """
    predictor: Any = open_predictor(onnx_path)
    roles = ["session"]
    if getattr(predictor, "low", None) is not None:  # HiAD's low branch (low_session may be session itself)
        roles.append("low_session")
    recorded: dict[str, list[dict[str, np.ndarray]]] = {role: [] for role in roles}

    class Recorder:
        def __init__(self, session: Any, samples: list[dict[str, np.ndarray]]) -> None:
            self.session, self.samples = session, samples

        def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
            count = len(next(iter(feeds.values())))
            self.samples.extend({name: value[i : i + 1] for name, value in feeds.items()} for i in range(count))
            return self.session.run(names, feeds)

    for role in roles:
        setattr(predictor, role, Recorder(getattr(predictor, role), recorded[role]))
    for path in images:
        predictor.predict(path)
        if len(recorded["session"]) >= limit:
            break
    return {role: samples[:limit] for role, samples in recorded.items()}


def _quantize(converted: Any, feeds: list[dict[str, np.ndarray]]) -> Any:
    """Post-training INT8 quantisation (NNCF, OpenVINO backend) of the backbone, calibrated on ``feeds``."""
    try:
        import nncf
    except ImportError:
        raise ConfigError("OpenVINO INT8 export needs nncf: pip install 'hrad[openvino]'") from None
    nncf.set_log_level(logging.ERROR)  # its per-node INFO lines and progress bars
    scope = nncf.IgnoredScope(patterns=[SCORING_NODES], validate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(converted, nncf.Dataset(feeds), subset_size=len(feeds), ignored_scope=scope)


def export_openvino(
    model: AnomalyModel,
    out_path: str | Path,
    precision: str = "fp32",
    tile_size: int | None = None,
    calibration_images: str | Path | Sequence[str | Path] | None = None,
    calibration_samples: int = 300,
    tolerance: float | None = None,
) -> Path:
    """ONNX export (verified against PyTorch), converted to OpenVINO IR ``out_path`` (.xml + .bin).

    The ``.onnx`` and the sidecar ``.json`` are written next to the IR; the sidecar names the IR
    and records how far it is from onnxruntime on random inputs (must be within
    :data:`OPENVINO_TOLERANCE`). ``precision`` fp16 stores the weights in half precision (OpenVINO
    computes in FP32 on every CPU, :class:`OpenVINOSession`). ``precision`` int8 quantises the
    backbone after training (NNCF), calibrated on the graph's inputs while the export predicts
    ``calibration_images`` (a folder or image paths: training images; at most
    ``calibration_samples`` inputs); the detector's scoring stays in FP32 (HiAD: the backbone
    graph and the low-size backbone graph are quantised, the pool's and low branch's scoring
    graphs stay FP32; the low branch's whole downsampled images, one per calibration image and
    beyond ``calibration_samples``, calibrate the graph that embeds them: the low-size one, else
    the window graph). ``tolerance`` replaces
    :data:`OPENVINO_TOLERANCE` (benchmarks measure what a refused INT8 model would give). Returns
    the sidecar's path.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if (precision == "int8") != (calibration_images is not None):
        raise ConfigError("--calibration-images is for --precision int8, which needs it (a folder of training images)")
    openvino = openvino_module()
    if isinstance(calibration_images, (str, Path)):
        calibration_images = list_images(calibration_images)
    xml_path = Path(out_path).with_suffix(".xml")
    onnx_path = xml_path.with_suffix(".onnx")
    sidecar_path = export_onnx(model, onnx_path, tile_size=tile_size)
    sidecar = json.loads(sidecar_path.read_text())
    # the graph, and a multi-graph export's other graphs (HiAD: pool and low branch) beside it
    extra = sidecar.get("graphs")
    # (graph, IR, check inputs, the predictor's session that runs it when it is a backbone INT8 quantises)
    graphs: list[tuple[Path, Path, dict[str, np.ndarray], str | None]]
    if extra is None:
        graphs = [(onnx_path, xml_path, _random_feeds(sidecar), "session")]
    else:  # HiAD: the backbone graph (onnx_path), one per pool detector, the low branch's, its backbone's
        listed = [extra["embedder"], *extra["high"], *(extra[key] for key in ("low", "low_embedder") if extra.get(key))]
        roles: list[str | None] = ["session", *[None] * (len(listed) - 1)]
        if extra.get("low_embedder"):
            roles[-1] = "low_session"
        graphs = [
            (onnx_path.with_name(graph["onnx"]), xml_path.with_name(Path(graph["onnx"]).with_suffix(".xml").name), _shaped_feeds(graph["inputs"]), role)
            for graph, role in zip(listed, roles, strict=True)
        ]
    difference = 0.0
    samples: dict[str, list[dict[str, np.ndarray]]] = {}
    quantized: dict[str, int] = {}
    low_size_inputs: dict[str, int] = {}  # per backbone role: how many of its samples are the low branch's images
    if precision == "int8":
        assert calibration_images is not None
        samples = _calibration_feeds(onnx_path, [Path(path) for path in calibration_images], calibration_samples)
        low = samples.pop("low_session", [])
        if low:
            # HiAD's low branch runs its whole downsampled image through the low-size backbone graph
            # where there is one, else through the window graph, whose activations on a whole image
            # can exceed the windows' ranges: that graph is calibrated on both (nncf takes inputs of
            # either size, the graph's H and W axes being dynamic)
            low_role = "low_session" if extra is not None and extra.get("low_embedder") else "session"
            samples[low_role] = samples.get(low_role, []) + low
            low_size_inputs[low_role] = len(low)
    low_recorded: dict[str, int] = {}
    for source, target, feeds, role in graphs:
        converted = openvino.convert_model(str(source))
        checks = [feeds]
        # the backbone graphs (HiAD's window graph and its low-size one); the scoring graphs stay FP32
        if role is not None and role in samples:
            calibration = samples[role]
            converted = _quantize(converted, calibration)
            split = len(calibration) - low_size_inputs.get(role, 0)  # windows first, then low-size images
            windows, lows = calibration[:split], calibration[split:]
            checks = windows[:: max(1, len(windows) // 8)] + lows[:: max(1, len(lows) // 4)]
            quantized[target.name] = len(calibration)
            if lows:
                low_recorded[target.name] = len(lows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            openvino.save_model(converted, str(target), compress_to_fp16=precision == "fp16")
        reference_session = onnxruntime_session(source)
        session = OpenVINOSession(target)
        for check in checks:
            pairs = zip(session.run(None, check), reference_session.run(None, check), strict=True)
            difference = max(difference, *(max_difference(a, b) for a, b in pairs))
        limit = OPENVINO_TOLERANCE[precision] if tolerance is None else tolerance
        if not difference <= limit:
            for _, written, _, _ in graphs:
                written.unlink(missing_ok=True)
                written.with_suffix(".bin").unlink(missing_ok=True)
            raise ExportCheckError(
                f"{source.name}: the OpenVINO {precision} graph differs from ONNX by {difference:.2e} of the output's"
                f" magnitude, over the {limit:g} tolerance; no OpenVINO IR written, the verified ONNX export and its"
                " sidecar are kept (check the IR's metrics with benchmarks/openvino_export.py, then pass --tolerance"
                " to accept it)"
            )
    sidecar["openvino"] = {
        "xml": xml_path.name,
        "bin": xml_path.with_suffix(".bin").name,
        "precision": precision,
        "openvino_version": openvino.__version__,
        "max_difference_vs_onnx": difference,
    }
    if precision == "int8":
        sidecar["openvino"]["quantized"] = {
            "graph": xml_path.name,
            "calibration_inputs": quantized[xml_path.name],
            "graphs": quantized,  # every quantised IR (HiAD: the low-size backbone too) and its calibration inputs
            "low_size_inputs": low_recorded,  # of those, HiAD's low-branch images (the window graph's where it runs them)
            "kept_fp32": SCORING_NODES,
        }
    if len(graphs) > 1:
        sidecar["openvino"]["graphs"] = {source.name: target.name for source, target, _, _ in graphs[1:]}
    return write_sidecar(sidecar_path, sidecar)


def _shaped_feeds(shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Random float32 inputs of the given shapes (a multi-graph export's recorded example shapes)."""
    generator = np.random.default_rng(0)
    return {name: generator.random(shape, dtype=np.float32) for name, shape in shapes.items()}
