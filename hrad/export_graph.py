"""The exported graphs (torch side): per-tile scorers, the detectors' scoring in plain torch ops,
and the one writer of a verified ONNX file, shared by :mod:`hrad.export` (downsample, tiled) and
:mod:`hrad.export_ensemble` (tiled ensemble).

What runs an export (sessions, sidecar reading, predictors) is :mod:`hrad.export_runtime`,
which imports no torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from hrad.data.images import atomic_write
from hrad.detectors.base import Detector
from hrad.export_runtime import (
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    max_difference,
    onnxruntime_session,
)
from hrad.features.efficientnet import same_pads
from hrad.version import __version__

if TYPE_CHECKING:
    from hrad.features.base import Embedder
    from hrad.model import AnomalyModel

#: ONNX opset: 17 has everything a CNN/ViT backbone and the kNN/Gaussian scorers need
OPSET = 17
#: exported graph vs the PyTorch module, relative to the map's magnitude
TOLERANCE = 1e-4
OUTPUT_NAMES = ("maps", "scores")


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

    def forward(self, tiles: Tensor, *extra: Tensor) -> tuple[Tensor, Tensor]:
        """``extra`` inputs (the tiled ensemble's tile positions) go to the scoring after the embeddings."""
        embeddings = self.embedder(tiles)
        c = self.crop_cells
        if c:
            embeddings = embeddings[..., c:-c, c:-c]
        maps, scores = self.scoring(embeddings, *extra)
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


def _bank_offsets(queries: Tensor, bank: Tensor, bank_norms: Tensor) -> Tensor:
    """``|b|^2 - 2 q.b`` for ``Q x C`` queries against an ``N x C`` bank, ``Q x N``: the squared L2
    distance less ``|q|^2``, which is the same for all of a query's bank vectors, so the nearest are
    found on this and ``|q|^2`` is added to the ``k`` kept. One ``Gemm`` with the norms as its bias
    (``alpha`` -2): the full ``|q|^2 - 2 q.b + |b|^2``, its clamp and a ``TopK`` were four more
    passes over the ``Q x N`` matrix, which together took longer than the matmul in onnxruntime."""
    return torch.addmm(bank_norms[None], queries, bank.transpose(0, 1), alpha=-2)


def _nearest_distances(offsets: Tensor, queries: Tensor, k: int) -> Tensor:
    """L2 distances (ascending, ``... x k``) to the ``k`` nearest from :func:`_bank_offsets`'
    ``offsets``: the min for ``k`` = 1 (``ReduceMin``, one pass, no indices), else ``TopK``; the
    query norm, clamp at 0 and sqrt run on the ``k`` kept only."""
    low = offsets.amin(-1, keepdim=True) if k == 1 else torch.topk(offsets, k, dim=-1, largest=False).values
    return ((queries * queries).sum(-1, keepdim=True) + low).clamp_min(0).sqrt()


def _reweighted(best: Tensor, nearest: Tensor, worst_query: Tensor, support_vectors: Tensor) -> Tensor:
    """PatchCore eq. 7 on the worst patch's nearest distance ``nearest`` (``B``) and the ``B x b x C``
    bank vectors nearest its nearest bank vector (see :class:`NearestNeighbourScoring`)."""
    distances = (worst_query[:, None, :] - support_vectors).pow(2).sum(-1).sqrt()  # B x b
    return (1 - torch.exp(nearest - logsumexp_last(distances))) * best


class NearestNeighbourScoring(nn.Module):
    """Exact kNN scoring against a memory bank in plain torch (PatchCore): no faiss in the graph.

    Patch score = mean L2 distance to the ``k`` nearest bank vectors. Image score = the largest
    patch score ``s*``; with ``reweight_neighbours`` = b it is reweighted by PatchCore eq. 7,
    ``(1 - exp(|m_test* - m*|) / sum_{m in N_b(m*)} exp(|m_test* - m|)) * s*``, where ``m*`` is
    the bank vector nearest the worst patch ``m_test*`` and ``N_b(m*)`` its b nearest bank
    vectors, ``m*`` included (as :class:`~hrad.detectors.patchcore.PatchCore` computes it).
    Only the worst patch needs its nearest bank vector's index, so it alone is searched again for
    it (one row) instead of every patch's index being kept.
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
        batch, channels, height, width = embeddings.shape
        queries = _vectors(embeddings)  # B x P x C
        flat = queries.reshape(-1, channels)  # BP x C: one Gemm for the batch
        nearest = _nearest_distances(_bank_offsets(flat, self.bank, self.bank_norms), flat, self.k)  # BP x k
        patch_scores = nearest.mean(-1).reshape(batch, height * width)  # B x P
        maps = patch_scores.reshape(batch, height, width)
        best, best_patch = patch_scores.max(dim=1)  # B
        if self.reweight_neighbours is None:
            return maps, best
        rows = torch.arange(batch, device=embeddings.device)
        worst_query = queries[rows, best_patch]  # B x C
        anchor = self.bank[_bank_offsets(worst_query, self.bank, self.bank_norms).argmin(-1)]  # B x C
        _, support = torch.topk(_bank_offsets(anchor, self.bank, self.bank_norms), self.reweight_neighbours, dim=-1, largest=False)  # B x b
        return maps, _reweighted(best, nearest.reshape(batch, height * width, -1)[rows, best_patch, 0], worst_query, self.bank[support])


class PositionedNearestNeighbourScoring(nn.Module):
    """PatchCore kNN scoring with one memory bank per tile position, picked by ``positions``.

    Same formulas as :class:`NearestNeighbourScoring` (mean distance to the ``k`` nearest bank
    vectors; image score = max patch score, reweighted by PatchCore eq. 7), with the bank of each
    sample's position: ``banks`` is ``positions x N x C``.
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
        queries = _vectors(embeddings)  # B x P x C
        bank = self.banks[positions]  # B x N x C
        norms = self.bank_norms[positions][:, None, :]  # B x 1 x N

        def offsets(vectors: Tensor) -> Tensor:  # B x Q x C -> B x Q x N, as _bank_offsets per sample's bank
            return torch.baddbmm(norms, vectors, bank.transpose(1, 2), alpha=-2)

        nearest = _nearest_distances(offsets(queries), queries, self.k)  # B x P x k
        patch_scores = nearest.mean(-1)  # B x P
        maps = patch_scores.reshape(batch, height, width)
        best, best_patch = patch_scores.max(dim=1)
        if self.reweight_neighbours is None:
            return maps, best
        rows = torch.arange(batch, device=embeddings.device)
        worst_query = queries[rows, best_patch]  # B x C
        anchor = bank[rows, offsets(worst_query[:, None, :])[:, 0].argmin(-1)]  # B x C
        _, support = torch.topk(offsets(anchor[:, None, :])[:, 0], self.reweight_neighbours, dim=-1, largest=False)  # B x b
        return maps, _reweighted(best, nearest[rows, best_patch, 0], worst_query, bank[rows[:, None], support])


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


def _prune(graph: onnx.GraphProto) -> None:
    """Drop every node and initializer that no graph output needs (what a rewrite left unused;
    onnxruntime warns about each unused initializer)."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [value for value in graph.initializer if value.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _shape_dependent(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether the value ``name`` is computed from some tensor's shape (a ``Shape`` among its producers)."""
    seen: set[int] = set()
    pending = [name]
    while pending:
        node = producers.get(pending.pop())
        if node is None or id(node) in seen:
            continue
        if node.op_type in ("Shape", "Size"):
            return True
        seen.add(id(node))
        pending.extend(value for value in node.input if value)
    return False


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == name), default)


def fold_pads_into_convs(graph: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Move every zero, spatial-only ``Pad`` whose one consumer is a ``Conv`` into that
    convolution; return how many. Why: SAME padding (EfficientNet-Lite's
    :class:`~hrad.features.efficientnet.SameConv2d`) traces to a ``Pad`` whose amounts come from
    the input's shape, which onnxruntime cannot fuse: that ``Pad`` and the NCHWc reorders around it
    were a third of the EfficientNet-Lite0 window graph's time.

    The amounts are read on ``feeds`` (the traced size). A ``Pad`` computed from a shape whose
    amounts there are ``SAME_UPPER``'s becomes the convolution's ``auto_pad=SAME_UPPER``, right at
    every input size (the traced amounts were not: constants crept into their arithmetic); one of
    constant amounts becomes the convolution's own ``pads``; another shape-computed one does too
    where the graph's inputs have fixed spatial sizes, and is left alone where they are dynamic.
    The caller verifies the graph where it will run.
    """
    nodes = graph.graph.node
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers = {name: node for node in nodes for name in node.output}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pads = [
        node for node in nodes
        if node.op_type == "Pad" and [c.op_type for c in consumers.get(node.output[0], [])] == ["Conv"]
        and (len(node.input) < 3 or not node.input[2]) and len(node.input) < 4  # no constant value (zeros), no axes
        and all(a.name != "mode" or a.s == b"constant" for a in node.attribute)
        and not any(node.output[0] == output.name for output in graph.graph.output)
    ]  # fmt: skip
    if not pads:
        return 0
    # the amounts and the padded tensor's shape at the traced size, by a graph of only what computes them
    probe = onnx.ModelProto()
    probe.CopyFrom(graph)
    del probe.graph.output[:]
    for index, node in enumerate(pads):
        probe.graph.node.append(onnx.helper.make_node("Shape", [node.input[0]], [f"fold_pads_shape_{index}"]))
    names = list(dict.fromkeys(name for index, node in enumerate(pads) for name in (node.input[1], f"fold_pads_shape_{index}")))
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in names)
    _prune(probe.graph)
    session = onnxruntime_session(probe.SerializeToString())
    used = {value.name for value in session.get_inputs()}
    values = dict(zip(names, session.run(names, {name: value for name, value in feeds.items() if name in used}), strict=True))
    dynamic = any(
        dim.dim_param or not dim.HasField("dim_value")
        for value in graph.graph.input for dim in value.type.tensor_type.shape.dim[1:]
    )  # fmt: skip
    folded = 0
    for index, node in enumerate(pads):
        amounts = [int(v) for v in np.asarray(values[node.input[1]]).ravel()]
        shape = [int(v) for v in np.asarray(values[f"fold_pads_shape_{index}"]).ravel()]
        rank = len(amounts) // 2
        spatial = rank - 2
        conv = consumers[node.output[0]][0]
        attributes = {a.name: a for a in conv.attribute}
        auto_pad = attributes.get("auto_pad")
        if min(amounts) < 0 or any(amounts[:2] + amounts[rank : rank + 2]) or (auto_pad is not None and auto_pad.s not in (b"", b"NOTSET")):
            continue
        own = [amounts[2 + i] for i in range(spatial)] + [amounts[rank + 2 + i] for i in range(spatial)]
        old = _ints(conv, "pads", [0] * (2 * spatial))
        computed = _shape_dependent(node.input[1], producers)
        kernel = _ints(conv, "kernel_shape", [])
        same = computed and not any(old) and len(kernel) == spatial
        if same:  # SAME_UPPER's amounts at the traced size, in ONNX's order (every begin, then every end)
            pairs = same_pads(shape[2:], kernel, _ints(conv, "strides", [1] * spatial), _ints(conv, "dilations", [1] * spatial))
            same = own == [pad for side in zip(*pairs, strict=True) for pad in side]
        if computed and dynamic and not same:
            continue
        for name in ("pads", "auto_pad"):
            if name in attributes:
                conv.attribute.remove(attributes[name])
        if same:
            conv.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
        else:
            conv.attribute.append(onnx.helper.make_attribute("pads", [a + b for a, b in zip(old, own, strict=True)]))
        conv.input[0] = node.input[0]
        folded += 1
    _prune(graph.graph)  # the Pads and the shape arithmetic that fed them
    return folded


def write_verified_onnx(
    module: nn.Module,
    inputs: dict[str, Tensor],
    expected: Sequence[Tensor],
    path: Path,
    verify: bool = True,
    output_names: Sequence[str] = OUTPUT_NAMES,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> None:
    """Export ``module`` (inputs named as ``inputs``' keys; ``dynamic_axes``, default: the batch
    dim of every input and output) to ``path`` atomically.

    With ``verify`` each zero ``Pad`` before a ``Conv`` (SAME padding) first moves into the
    convolution (:func:`fold_pads_into_convs`, amounts read on ``inputs``' first sample).

    With ``verify`` onnxruntime runs the written graph on ``inputs`` (the first sample, then all)
    and must match ``expected`` (the module's own outputs on them) to :data:`TOLERANCE`, else
    nothing is written.
    """
    names = list(inputs)
    axes = dynamic_axes if dynamic_axes is not None else {name: {0: "batch"} for name in (*names, *output_names)}
    feeds = {name: value.cpu().numpy() for name, value in inputs.items()}
    references = [value.cpu().numpy() for value in expected]

    def write(temporary: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                module, tuple(value[:1] for value in inputs.values()), temporary, dynamo=False, opset_version=OPSET,
                input_names=names, output_names=list(output_names), dynamic_axes=axes,
            )  # fmt: skip
        if not verify:
            return
        graph = onnx.load(temporary)
        if fold_pads_into_convs(graph, {name: value[:1] for name, value in feeds.items()}):
            onnx.save(graph, temporary)
        session = onnxruntime_session(temporary)
        batch = len(next(iter(feeds.values())))
        for count in sorted({1, batch}):
            outputs = session.run(None, {name: value[:count] for name, value in feeds.items()})
            difference = max(max_difference(ours, reference[:count]) for ours, reference in zip(outputs, references, strict=True))
            if not difference <= TOLERANCE:
                raise RuntimeError(f"ONNX export differs from PyTorch by {difference:.2e} (relative); not written")

    atomic_write(path, write)


def graph_matches(path: Path, module: nn.Module, inputs: dict[str, Tensor]) -> bool:
    """Whether the written graph at ``path`` equals ``module`` on ``inputs`` (by name) to
    :data:`TOLERANCE`: an export's check at sizes other than the traced one (a graph traced with
    fixed sizes fails to run there, or differs)."""
    with torch.no_grad():
        expected = module(*inputs.values())
    references = expected if isinstance(expected, tuple) else (expected,)
    session = onnxruntime_session(path)
    try:
        outputs = session.run(None, {name: value.cpu().numpy() for name, value in inputs.items()})
    except Exception:  # noqa: BLE001 - onnxruntime raises its own error types for shape mismatches
        return False
    return all(
        ours.shape == tuple(reference.shape) and max_difference(ours, reference.cpu().numpy()) <= TOLERANCE
        for ours, reference in zip(outputs, references, strict=True)
    )


def sidecar_header(model: AnomalyModel, onnx_name: str) -> dict[str, Any]:
    """What every export's sidecar starts with: format, versions, the graph's file name,
    postprocess, the 16-bit images' significant bits, the training images' pixel type and kind (gray or colour), what resizes images (the scale warning's words), the region of interest and the model's thresholds (all of :class:`~hrad.model.Thresholds`, so a
    predictor can move them by sigmas and scale maps as ``hrad predict`` does)."""
    thresholds = model.thresholds
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "hrad_version": __version__,
        "onnx": onnx_name,
        "postprocess": model.config.postprocess.model_dump(mode="json"),
        "thresholds": thresholds.to_json() if thresholds else None,
        # 16-bit images of this many significant bits are scaled to the full 16-bit range first
        # (x 65535 / (2**bits - 1), rounded, saturating); null: as stored (hrad.data.bit_depth)
        "bit_depth": model.bit_depth,
        # the training images' pixel type (8-bit, 16-bit or float: hrad info); older sidecars have none
        "pixel_type": model.pixel_type,
        # whether the training images were gray (hrad.data.images.is_gray): the predictor warns of an
        # image of the other kind; older sidecars have none: no warning
        "gray": model.gray,
        # what scales an image before its features, as the predictor's warning of an image scaled
        # unlike the training images says it (Strategy.resizing); older sidecars have none: no warning
        "resizing": model.strategy.resizing(),
        # the region of interest (hrad.postprocess.roi): a PNG mask, stretched to each image
        "roi": model.roi.to_json() if model.roi is not None else None,
    }


def sidecar_model(model: AnomalyModel, **fields: Any) -> dict[str, Any]:
    """Every export's ``model`` section: its backbone, the backbone's weights (what
    ``saved_model_facts`` shows: ``hrad info``, ``/health``), detector and strategy names, then
    the export's own ``fields`` (which may name the detector or strategy as the export sees them)."""
    return {
        "backbone": model.config.backbone.name,
        "backbone_weights": model.extractor.weights_source,
        "detector": model.config.detector.name,
        "strategy": model.config.strategy.name,
        **fields,
    }


def random_tiles(count: int, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Seeded random tiles in [0, 1] that exports trace and verify their graph with."""
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)

