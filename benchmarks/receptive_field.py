"""Effective receptive field of each backbone's embedding: how much context a tile needs.

For the embedding a detector sees (PatchCore's default layers, with its 3x3 aggregation on
CNNs), the gradient of the centre cell's features with respect to the input pixels is taken
on real images (Luo et al., "Understanding the Effective Receptive Field", NeurIPS 2016). Its
absolute value, summed over channels and images, is the effective receptive field (ERF). The
table gives the half-width of the square around the cell's centre that holds 50 / 90 / 95 / 99 %
of that mass, and the theoretical extent (where the gradient is non-zero at all).

A tiling strategy's default context margin (``FeatureExtractor.default_context``) is the 95 %
radius rounded up to 16 pixels: the features at a tile border then see the pixels that carry
95 % of their input sensitivity, at (tile + 2 margin)^2 / tile^2 of the backbone cost. The
theoretical extent is what exactness needs (``tests/test_context_tiling.py``) and is far
larger for the deeper CNN layers; ViTs attend globally, so their extent is the whole window.

    PYTHONPATH=. python benchmarks/receptive_field.py --images 4 --size 512
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch

from benchmarks.common import CAPSULES, capsules, write_results
from hrad.data.images import read_image
from hrad.detectors.base import detector_class, detector_config
from hrad.features.base import BackboneConfig, Embedder, build_backbone
from hrad.strategies.tiling import round_to_multiple

FRACTIONS = (0.5, 0.9, 0.95, 0.99)


def erf_mass(backbone: str, images: list[np.ndarray], size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``size x size`` map of |d centre-cell features / d input| summed over images and channels."""
    extractor = build_backbone(BackboneConfig(name=backbone))
    spec = detector_class("patchcore").embedding_spec(detector_config({"name": "patchcore"}), extractor)
    embedder = Embedder(extractor, spec)
    size = round_to_multiple(size, math.lcm(extractor.input_multiple, 32))
    total = np.zeros((size, size))
    forward = Embedder.forward.__wrapped__  # type: ignore[attr-defined]  # the un-decorated (grad-enabled) forward
    for image in images:
        height, width = image.shape[:2]
        y0, x0 = (height - size) // 2, (width - size) // 2
        crop = torch.from_numpy(np.ascontiguousarray(image[y0 : y0 + size, x0 : x0 + size].transpose(2, 0, 1)))[None]
        crop.requires_grad_(True)
        with torch.enable_grad():
            embedding = forward(embedder, crop)
            cy, cx = embedding.shape[-2] // 2, embedding.shape[-1] // 2
            embedding[0, :, cy, cx].abs().sum().backward()
        assert crop.grad is not None
        total += crop.grad[0].abs().sum(0).double().numpy()
    cell = size / embedding.shape[-1]
    centre = ((cy + 0.5) * cell, (cx + 0.5) * cell)
    return total, {"layers": "+".join(spec.layers), "aggregation": spec.aggregation, "cell_px": cell, "centre": centre, "size": size}


def radii(mass: np.ndarray, centre: tuple[float, float]) -> dict[str, float]:
    """Half-width (pixels) of the centred square holding each fraction of the mass."""
    ys, xs = np.indices(mass.shape)
    chebyshev = np.maximum(np.abs(ys + 0.5 - centre[0]), np.abs(xs + 0.5 - centre[1]))
    order = np.argsort(chebyshev, axis=None)
    cumulative = np.cumsum(mass.ravel()[order]) / mass.sum()
    distances = chebyshev.ravel()[order]
    out = {f"r{int(f * 100)}": float(distances[np.searchsorted(cumulative, f)]) for f in FRACTIONS}
    nonzero = mass > mass.max() * 1e-6
    out["extent"] = float(chebyshev[nonzero].max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet-lite0", "efficientnet-lite2", "dinov2-vits14"])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default="receptive_field")
    args = parser.parse_args()
    dataset = capsules()
    paths = sorted(dataset.train)[: args.images]
    images = [read_image(path) for path in paths]
    rows = []
    for backbone in args.backbones:
        mass, info = erf_mass(backbone, images, args.size)
        measured = radii(mass, info["centre"])
        row = {"backbone": backbone, **info, **measured, "default_context": 16 * math.ceil(measured["r95"] / 16)}
        print(row, flush=True)
        rows.append(row)
    notes = (
        f"Effective receptive field of PatchCore's default embedding per backbone, from the gradient of the centre "
        f"cell on the central {args.size}x{args.size} crop of {len(images)} training images of {CAPSULES.name}. "
        "r50..r99: half-width in pixels of the centred square holding that share of |gradient|; extent: where "
        "the gradient is non-zero. default_context = r95 rounded up to 16 px, the value each backbone's "
        "`default_context` is set to."
    )
    columns = ["backbone", "layers", "aggregation", "cell_px", "r50", "r90", "r95", "r99", "extent", "default_context"]
    print(write_results(args.out, rows, notes, columns=columns))


if __name__ == "__main__":
    main()
