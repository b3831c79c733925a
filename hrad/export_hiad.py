"""ONNX export of HiAD (:class:`~hrad.strategies.hiad.HiAD`): the backbone once, one scoring graph
per detector of the pool and one for the low branch, plus the sidecar.

HiAD runs its backbone on four kinds of input: the level-0 patch windows, the tiles of every
coarser fusion level, and the low branch's whole (downsized) image. All are the same
:class:`~hrad.features.base.Embedder`, so the export holds it once, as ``<name>.onnx``
(``images B x 3 x h x w`` -> ``embeddings``, spatial axes dynamic; verified at the window size
and at the low branch's size). Each detector of the pool and the low-branch detector is its
own small graph ``<name>.high<m>.onnx`` / ``<name>.low.onnx`` (``embeddings`` -> ``maps``,
``scores``): their memory banks differ in size, and a detector that has its own
:meth:`~hrad.detectors.base.Detector.scoring_module` (the neural ones) exports the same way as
PatchCore and PaDiM.

Everything between the graphs is array work done by :class:`hrad.export_runtime.HiADPredictor`
with the numbers in the sidecar and the strategy's own torch-free arithmetic
(:mod:`hrad.hiad_math`, :mod:`hrad.tile_geometry`): the patch grid and the level tiles, the
fusion (each level map sampled bilinearly at the patch's cell centres, weighted), the pool's
assignment (position labels, or nearest centroid for ``ra``), min-max calibration of every
detector and of the low branch, merging, the max of the branches and the pooled image score.

Not exported (a one-line :class:`~hrad.errors.ConfigError`): an uncalibrated model, detectors
without a scoring module, ``--tile-size``. With an assignment that accepts any image size
(``a2o``, ``ra``) the low branch's size follows the image; the graphs are checked at a second
size too, and the sidecar says whether other sizes are verified (else the predictor refuses
images whose low-branch size differs from the fitted one).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hrad.errors import ConfigError
from hrad.export_graph import (
    graph_matches,
    random_tiles,
    scoring_module,
    sidecar_header,
    sidecar_model,
    write_verified_onnx,
)
from hrad.export_runtime import write_sidecar
from hrad.hiad_math import low_branch_size
from hrad.strategies.hiad import HiAD

if TYPE_CHECKING:
    from hrad.model import AnomalyModel

#: the second image size the low branch's graphs are checked at, as a fraction of the fitted sides
OTHER_SIZE = 0.75
EMBEDDINGS = "embeddings"


class EmbedderGraph(nn.Module):
    """``images B x 3 x h x w`` in [0, 1] -> the embedding ``B x C x h' x w'`` (no context crop)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, images: Tensor) -> Tensor:
        return self.embedder(images).float()


def _graph_name(out_path: Path, role: str) -> Path:
    return out_path.with_name(f"{out_path.stem}.{role}.onnx")


def _scoring(detector: Any, name: str) -> nn.Module:
    module = scoring_module(detector, name)
    if module is None:
        raise ConfigError(f"hiad export: detector {name!r} has no exportable scoring; exportable: patchcore, padim and the neural detectors")
    return module.eval()


def _other_sizes_reason(strategy: HiAD, verified: bool, verify: bool, other_low: tuple[int, int]) -> str:
    """Why the sidecar's ``other_sizes_verified`` is what it is, in words (the sidecar's ``other_sizes``):
    a positional pool never feeds the graphs another low size, so it is not checked there."""
    height, width = other_low
    if strategy.positional:
        assert strategy._assignment is not None and strategy._image_size is not None
        fitted_h, fitted_w = strategy._image_size
        return (
            f"not needed: the {strategy._assignment.kind} pool binds detectors to patch positions, so only {fitted_w}x{fitted_h} "
            "images are predicted: one patch grid, one low size"
        )
    if not verify:
        return "not checked: exported without verification"
    if verified:
        return f"verified: the graphs that embed and score the low branch equal torch at a low size of {width}x{height} too"
    return (
        f"not verified: the graph that embeds or scores the low branch differs from torch at a low size of {width}x{height} "
        "(a backbone traced with constant pads there); images whose low size differs from low_size are refused"
    )


def export_hiad_onnx(model: AnomalyModel, out_path: str | Path, verify: bool = True) -> Path:
    """Write HiAD's graphs (``out_path`` = the backbone, ``.high<m>.onnx`` per pool detector,
    ``.low.onnx``) and the sidecar ``out_path.with_suffix('.json')``; returns the sidecar.

    With ``verify`` every graph is run by onnxruntime and must equal its torch module to
    :data:`hrad.export_graph.TOLERANCE` (else nothing of it is written).
    """
    strategy = model.strategy
    if not isinstance(strategy, HiAD):
        raise ConfigError(f"strategy {model.config.strategy.name!r} is not hiad")
    calibration = strategy.calibration
    if not strategy.fitted or calibration is None or strategy._image_size is None:
        raise ConfigError("hiad export needs a fitted and calibrated model (hrad fit holds out images to calibrate it)")
    config = strategy.config
    assignment = strategy._assignment
    assert assignment is not None and strategy._rates is not None and strategy._weights is not None
    detector_name = model.config.detector.name
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    height, width = strategy._image_size
    tiles = strategy.tiles
    embedder = EmbedderGraph(strategy.embedder).eval()
    window = tiles.window_input_size
    low_size = low_branch_size(height, width, config.low_res_size, strategy.multiple)
    other_low = low_branch_size(
        max(1, round(height * OTHER_SIZE)), max(1, round(width * OTHER_SIZE)), config.low_res_size, strategy.multiple
    )
    if other_low == low_size:  # a size the low branch does not shrink: any other multiple will do
        other_low = (low_size[0] + strategy.multiple, low_size[1])
    # positional pools bind the fitted size (other sizes are refused anyway); a2o and ra take any
    check_other = not strategy.positional
    # every detector's scoring first, so an unexportable one stops the export before anything is written
    pool_scorers = [_scoring(strategy._detector(index), detector_name) for index in range(assignment.count)]
    low_scorer = _scoring(strategy._low_detector(), detector_name) if config.low_branch else None

    # the backbone: batch and spatial axes dynamic; verified at the window size, then at the low size
    examples = random_tiles(2, *window)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        window_embeddings = embedder(examples)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, EMBEDDINGS: {0: "batch", 2: "cells_h", 3: "cells_w"}}
    write_verified_onnx(embedder, {"images": examples}, (window_embeddings,), out_path, verify, output_names=(EMBEDDINGS,), dynamic_axes=axes)
    low_image = torch.rand(1, 3, *low_size, generator=generator)
    other_image = torch.rand(1, 3, *other_low, generator=generator)
    # the low branch's backbone: the window graph where it runs at the low size, else its own graph
    # traced there (a backbone whose graph holds the traced size's constants; EfficientNet-Lite's
    # SAME padding no longer does: it becomes auto_pad=SAME_UPPER, right at every size)
    low_embedder_path = out_path
    low_embedder_graph = None
    if config.low_branch and verify and not graph_matches(out_path, embedder, {"images": low_image}):
        low_embedder_path = _graph_name(out_path, "low_embedder")
        with torch.no_grad():
            expected_low = embedder(low_image)
        write_verified_onnx(embedder, {"images": low_image}, (expected_low,), low_embedder_path, verify, output_names=(EMBEDDINGS,), dynamic_axes=axes)
        low_embedder_graph = {"onnx": low_embedder_path.name, "inputs": {"images": list(low_image.shape)}}
    # another image size's low branch, on the graph that embeds it
    other_sizes = check_other and (not verify or graph_matches(low_embedder_path, embedder, {"images": other_image}))

    # the pool: one scoring graph per detector, on the patches' (fused) embeddings
    c = tiles.crop_cells
    patch_embeddings = window_embeddings[..., c:-c, c:-c] if c else window_embeddings
    pool_files = []
    for index, scorer in enumerate(pool_scorers):
        with torch.no_grad():
            expected = scorer(patch_embeddings)
        path = _graph_name(out_path, f"high{index}")
        write_verified_onnx(scorer, {EMBEDDINGS: patch_embeddings}, expected, path, verify)
        pool_files.append(path.name)
    low_graph = None
    if low_scorer is not None:
        with torch.no_grad():
            low_embeddings = embedder(low_image)
            expected = low_scorer(low_embeddings)
        path = _graph_name(out_path, "low")
        axes = {EMBEDDINGS: {0: "batch", 2: "cells_h", 3: "cells_w"}, "maps": {0: "batch", 1: "cells_h", 2: "cells_w"}, "scores": {0: "batch"}}
        write_verified_onnx(low_scorer, {EMBEDDINGS: low_embeddings}, expected, path, verify, dynamic_axes=axes)
        low_graph = {"onnx": path.name, "inputs": {EMBEDDINGS: list(low_embeddings.shape)}}
        if check_other and other_sizes and verify:
            with torch.no_grad():
                other_embeddings = embedder(other_image)
            other_sizes = graph_matches(path, low_scorer, {EMBEDDINGS: other_embeddings})
    other_sizes_reason = _other_sizes_reason(strategy, other_sizes, verify, other_low)

    ranges = {name: list(calibration.range(name)) for name in calibration.names()}
    sidecar = {
        **sidecar_header(model, out_path.name),
        "input": {
            "name": "images",
            "shape": ["batch", 3, "height", "width"],
            "window": list(window),
            "dtype": "float32",
            "range": [0.0, 1.0],
            "channels": "RGB",
            "layout": "NCHW",
        },
        "outputs": {EMBEDDINGS: ["batch", "channels", "cells_h", "cells_w"]},
        "graphs": {
            "embedder": {"onnx": out_path.name, "inputs": {"images": [2, 3, *window]}},
            "high": [{"onnx": name, "inputs": {EMBEDDINGS: list(patch_embeddings.shape)}} for name in pool_files],
            "low": low_graph,
            "low_embedder": low_embedder_graph,
        },
        "geometry": {
            "strategy": "hiad",
            "fitted_size": [height, width],
            "patch": config.patch_size,
            "stride": config.patch_stride,
            "margin": tiles.margin,
            "edge": config.tile_edge,
            "crop_cells": c,
            "multiple": strategy.multiple,
            "rates": list(strategy._rates),
            "weights": list(strategy._weights),
            "batch_size": config.batch_size,
            "positional": strategy.positional,
            "low_branch": config.low_branch,
            "low_res_size": config.low_res_size,
            "low_size": list(low_size),
            "other_sizes_verified": other_sizes,
            "other_sizes": other_sizes_reason,
            "smoothing_sigma": config.smoothing_sigma,
            "score_sigma": config.score_sigma,
            "score_pool": config.score_pool,
        },
        "assignment": {
            "kind": assignment.kind,
            "count": assignment.count,
            "position_labels": None if assignment.position_labels is None else assignment.position_labels.tolist(),
            "centroids": None if assignment.centroids is None else assignment.centroids.tolist(),
        },
        "calibration": ranges,
        "low_border_ratios": strategy.low_border_ratios,
        "model": sidecar_model(model, detector=detector_name, strategy="hiad", fitted_size=[height, width]),
        "steps": [
            "read the image as float32 RGB in [0, 1], H x W x 3 (positional assignments: the fitted size only)",
            "level 0: patch grid (patch, stride, edge) over the image; each patch cut with margin context pixels "
            "(reflected past the image border), resized to the window size, embedded, crop_cells cut off each side",
            "each rate k > 0 with a weight: the image resized (bilinear, antialiased) to round(side / 2^k), cut into "
            "patch tiles (regular grid, reflect-padded, same margin), embedded, cropped, assembled into one map and "
            "cut to the cells not wholly in the padding",
            "fused patch feature = w_0 * its embedding + sum_k w_k * the level-k map sampled bilinearly (border "
            "clamped) at the centres of the patch's cells (hrad.hiad_math.cell_centres)",
            "detector of each patch: assignment.position_labels[position] (a2o: 0), or for ra the nearest centroid "
            "to the patch's mean-pooled fused feature; run graphs.high[detector] on the fused features",
            "calibrate each patch map with its detector's range (calibration['high.<m>']: clip((x - min) / (max - min), 0, 1)), "
            "resize (bilinear) to patch x patch, average overlapping patches",
            "low branch: the image resized to low_size (long side ~low_res_size, multiples of multiple), embedded "
            "(by graphs.low_embedder when not null: the backbone traced at low_size, else graphs.embedder), "
            "run graphs.low, divided by low_border_ratios (when not null; hrad.postprocess.border.calibrate_border): "
            "a list r: r[d] at d cells from the low map's nearest side; a square table T (k + 1 rows): T[i][j] at i "
            "cells from the nearer of top / bottom and j from the nearer of left / right, each clipped to k; then "
            "calibrated with calibration['low'], resized to H x W; final = max(high, low)",
            "map = Gaussian(smoothing_sigma) of final; strategy score = max of the score_pool x score_pool mean of "
            "Gaussian(score_sigma) of final; then postprocess and thresholds as hrad.export's sidecar says",
        ],
    }
    return write_sidecar(out_path.with_suffix(".json"), sidecar)


__all__ = ["EmbedderGraph", "export_hiad_onnx"]
