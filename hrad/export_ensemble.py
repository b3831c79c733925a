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
array work done by :class:`hrad.export_runtime.OnnxEnsemblePredictor` with the numbers in the
sidecar. Detectors: PatchCore (exact kNN, PatchCore's reweighting included).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hrad.errors import ConfigError
from hrad.export_graph import (
    TOLERANCE,
    PositionedNearestNeighbourScoring,
    TileScorer,
    random_tiles,
    scoring_module,
    sidecar_header,
    sidecar_model,
    write_verified_onnx,
)
from hrad.export_runtime import max_difference, write_sidecar
from hrad.strategies.ensemble import TiledEnsemble

if TYPE_CHECKING:
    from hrad.model import AnomalyModel


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
    must match the per-position PyTorch scoring to :data:`hrad.export_graph.TOLERANCE`.
    """
    strategy = model.strategy
    if not isinstance(strategy, TiledEnsemble):
        raise ConfigError(f"strategy {model.config.strategy.name!r} is not a tiled ensemble")
    config = strategy.config
    grid = strategy.grid
    tiles = strategy.tiles
    scorer = TileScorer(tiles.embedder, _positioned_scoring(strategy, model.config.detector.name), tiles.crop_cells).eval()
    side_h, side_w = strategy.tiles.window_input_size
    count = len(grid)
    example = random_tiles(count, side_h, side_w)
    positions = torch.arange(count, dtype=torch.int64)
    with torch.no_grad():
        expected_maps, expected_scores = scorer(example, positions)
        # the stacked graph equals each position's own detector
        for index in range(count):
            detector = strategy.detector_type(strategy.detector_config)
            detector.load_state_dict(strategy._tile_state(index))
            own = detector.predict(strategy.tiles.crop(strategy.embedder(example[index : index + 1])))
            difference = max_difference(expected_maps[index : index + 1].numpy(), own.maps.float().numpy())
            if not difference <= TOLERANCE:
                raise RuntimeError(f"stacked scoring differs from tile model {index} by {difference:.2e}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    inputs = {"tiles": example, "positions": positions}
    write_verified_onnx(scorer, inputs, (expected_maps, expected_scores), out_path, verify)
    geometry = strategy._require_fitted()
    normalization = {key: value.double().reshape(-1).tolist() for key, value in strategy._normalization.items()}
    sidecar = {
        **sidecar_header(model, out_path.name),
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
        "model": sidecar_model(model, strategy="tiled-ensemble"),
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
    return write_sidecar(out_path.with_suffix(".json"), sidecar)
