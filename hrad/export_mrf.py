"""ONNX export of MRF-AD (:class:`~hrad.strategies.mrf.MRFStrategy`): one graph, one input per scale.

The graph takes the image resized to each scale's backbone input size (``scale0``, ``scale1``,
...; ``1 x 3 x h_s x w_s`` in [0, 1]) and returns every (scale, layer) bank's nearest-neighbour
distance map at feature resolution, scale-major as MRF computes them: the backbone runs once per
scale (one copy of its weights in the graph) and each bank scores with exact 1-NN search in
plain torch ops (:class:`~hrad.export_graph.NearestNeighbourScoring`, ``k = 1``; ``cosine``:
unit vectors and ``L2^2 / 2``). Resizing, upsampling, fusion (mean/max) and the image score
(max / top fraction) are array work in :class:`hrad.export_runtime.MRFPredictor`.

What is exported and what is not:

- the banks as saved (float16 rounded), searched exactly; a model whose banks use IVF (``index``
  auto on big banks, or ivf) predicts approximate neighbours in hrad and exact ones in the
  export, so the two differ by IVF's misses; the verification compares against exact search;
- the scale sizes of the model's fitted image size. The graph's spatial axes are dynamic; the
  export also checks the graph at a second image size (0.75 of the fitted sides) and records in
  the sidecar whether other sizes are verified (CNN backbones) or refused at predict (a backbone
  whose traced graph fixes its input size);
- not ``foreground`` masking (the PCA masker): such models are refused with a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrad.errors import ConfigError
from hrad.export_graph import (
    NearestNeighbourScoring,
    graph_matches,
    sidecar_header,
    sidecar_model,
    write_verified_onnx,
)
from hrad.export_runtime import write_sidecar
from hrad.strategies.mrf import MRFStrategy

if TYPE_CHECKING:
    from hrad.model import AnomalyModel

#: the second image size the graph is checked at, as a fraction of the fitted sides
OTHER_SIZE = 0.75


class MultiScaleScorer(nn.Module):
    """``(image at scale 0, image at scale 1, ...)`` -> the distance map of every (scale, layer) bank."""

    def __init__(self, strategy: MRFStrategy) -> None:
        super().__init__()
        self.extractor = strategy.extractor
        self.layers = list(strategy.layers)
        self.scales = list(strategy.config.scales)
        self.cosine = strategy.config.distance == "cosine"
        banks = strategy.banks
        self.scorings = nn.ModuleList(NearestNeighbourScoring(banks[(layer, scale)], k=1) for scale in self.scales for layer in self.layers)

    def forward(self, *images: Tensor) -> tuple[Tensor, ...]:
        outputs = []
        for index, image in enumerate(images):
            features = self.extractor.extract(image, self.layers)
            for offset, layer in enumerate(self.layers):
                feature_map = features[layer].float()
                if self.cosine:
                    feature_map = F.normalize(feature_map, dim=1)
                maps, _ = self.scorings[index * len(self.layers) + offset](feature_map)
                outputs.append(maps.square() / 2 if self.cosine else maps)
        return tuple(outputs)


def _inputs(strategy: MRFStrategy, height: int, width: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        f"scale{index}": torch.rand(1, 3, *size, generator=generator)
        for index, size in enumerate(strategy.scale_sizes(height, width).values())
    }


def export_mrf_onnx(model: AnomalyModel, out_path: str | Path, verify: bool = True) -> Path:
    """Write the MRF graph to ``out_path`` and its sidecar next to it; returns the sidecar.

    With ``verify`` onnxruntime runs the graph at the fitted size's scale sizes and it must equal
    the torch module (backbone + exact 1-NN) to :data:`hrad.export_graph.TOLERANCE`.
    """
    strategy = model.strategy
    if not isinstance(strategy, MRFStrategy):
        raise ConfigError(f"strategy {model.config.strategy.name!r} is not mrf")
    config = strategy.config
    if config.foreground:
        raise ConfigError("mrf export: foreground masking (foreground: true) is not exportable yet")
    if model.fitted_size is None or not strategy.indexes:
        raise ConfigError("mrf export needs a fitted model")
    height, width = model.fitted_size
    scorer = MultiScaleScorer(strategy).eval()
    inputs = _inputs(strategy, height, width)
    with torch.no_grad():
        expected = scorer(*inputs.values())
    names = [f"{layer}@{scale}" for scale in config.scales for layer in strategy.layers]
    axes = {name: {2: f"{name}_height", 3: f"{name}_width"} for name in inputs}
    axes.update({name: {1: f"{name}_height", 2: f"{name}_width"} for name in names})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_verified_onnx(scorer, inputs, expected, out_path, verify, output_names=names, dynamic_axes=axes)
    # the spatial axes are dynamic: the graph must also equal the module at another image size
    other = _inputs(strategy, max(1, round(height * OTHER_SIZE)), max(1, round(width * OTHER_SIZE)))
    other_sizes = verify and graph_matches(out_path, scorer, other)
    sizes = strategy.scale_sizes(height, width)
    sidecar = {
        **sidecar_header(model, out_path.name),
        "input": {
            "images": {name: list(value.shape) for name, value in inputs.items()},
            "dtype": "float32",
            "range": [0.0, 1.0],
            "channels": "RGB",
            "layout": "NCHW",
        },
        "outputs": {name: list(value.shape) for name, value in zip(names, expected, strict=True)},
        "geometry": {
            "strategy": "mrf",
            "fitted_size": [height, width],
            "pixel_budget": config.pixel_budget,
            "scales": list(config.scales),
            "input_multiple": model.extractor.input_multiple,
            "scale_sizes": [list(size) for size in sizes.values()],
            "other_sizes_verified": other_sizes,
            "fusion": config.fusion,
            "score": config.score,
            "top_fraction": config.top_fraction,
            "search": "exact",
            "model_index": config.index,
        },
        "model": sidecar_model(
            model,
            detector="mrf banks",
            strategy="mrf",
            layers=list(strategy.layers),
            distance=config.distance,
            fitted_size=[height, width],
        ),
        "steps": [
            "read the image as float32 RGB in [0, 1], H x W x 3",
            "working size: about pixel_budget pixels with the image's aspect (native when null); each scale's "
            "size: round(side * scale) rounded to input_multiple (at least input_multiple)",
            "resize (bilinear, antialiased when shrinking) the image to each scale's size; feed scale<i>",
            "outputs: nearest-neighbour distance maps, scale-major, one per layer",
            "upsample (bilinear) every map to H x W; fuse by mean or max",
            "score: max of the fused map, or mean of its top_fraction highest pixels",
            "then postprocess (Gaussian sigma, image score) and thresholds as hrad.export's sidecar says",
        ],
    }
    return write_sidecar(out_path.with_suffix(".json"), sidecar)


__all__ = ["MultiScaleScorer", "export_mrf_onnx"]
