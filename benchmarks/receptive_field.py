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
from hrad.reports.markdown import table
from hrad.strategies.tiling import ContextEmbedder, round_to_multiple

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


def tiling_residual(backbone: str, images: list[np.ndarray], tile: int, margins: list[int]) -> list[dict[str, Any]]:
    """How far tile embeddings (2 x 2 tiles, each with a context margin) are from the embedding
    of the same ``2 tile x 2 tile`` crop computed at once: relative mean absolute difference at
    the cells next to the inner tile seams and at the tiles' centre cells (>= 1/4 tile from
    every tile border)."""
    extractor = build_backbone(BackboneConfig(name=backbone))
    spec = detector_class("patchcore").embedding_spec(detector_config({"name": "patchcore"}), extractor)
    embedder = Embedder(extractor, spec)
    rows = []
    for margin in margins:
        tiles = ContextEmbedder(embedder, tile, tile, margin)
        seam_error = centre_error = 0.0
        for image in images:
            height, width = image.shape[:2]
            y0, x0 = (height - 2 * tile) // 2, (width - 2 * tile) // 2
            crop = torch.from_numpy(np.ascontiguousarray(image[y0 : y0 + 2 * tile, x0 : x0 + 2 * tile].transpose(2, 0, 1)))
            whole = embedder(tiles.resize_windows(crop[None]) if tiles.input_size[0] != tile else crop[None])[0]
            grid = tiles.grid(2 * tile, 2 * tile, tile, tile)
            assembled = grid.assemble(torch.cat([tiles(w) for _, w in grid.batches(grid.pad(crop), 4)]))
            error = (assembled - whole).abs().mean(0) / whole.abs().mean()
            cells = error.shape[-1] // 2
            quarter = max(1, cells // 4)
            seam = torch.zeros_like(error, dtype=torch.bool)
            seam[cells - 1 : cells + 1, quarter:-quarter] = True
            seam[quarter:-quarter, cells - 1 : cells + 1] = True
            centre = torch.zeros_like(seam)
            for cy in (cells // 2, cells + cells // 2):
                for cx in (cells // 2, cells + cells // 2):
                    centre[cy - quarter // 2 : cy + quarter // 2 + 1, cx - quarter // 2 : cx + quarter // 2 + 1] = True
            seam_error += float(error[seam].mean()) / len(images)
            centre_error += float(error[centre].mean()) / len(images)
        rows.append({"backbone": backbone, "tile": tile, "context": margin, "context_used": tiles.margin,
                     "seam_residual": seam_error, "centre_residual": centre_error,
                     "seam_over_centre": seam_error / max(centre_error, 1e-12),
                     "window_pixel_share": ((tile + 2 * tiles.margin) / tile) ** 2})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet-lite0", "efficientnet-lite2", "dinov2-vits14"])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default="receptive_field")
    parser.add_argument("--residual-margins", type=int, nargs="+", default=[0, 14, 28, 56, 112, 224])
    args = parser.parse_args()
    dataset = capsules()
    paths = sorted(dataset.train)[: args.images]
    images = [read_image(path) for path in paths]
    rows = []
    for backbone in args.backbones:
        mass, info = erf_mass(backbone, images, args.size)
        measured = radii(mass, info["centre"])
        vit = build_backbone(BackboneConfig(name=backbone)).is_vit
        row = {"backbone": backbone, **info, **measured, "default_context": "see residuals" if vit else 16 * math.ceil(measured["r95"] / 16)}
        print(row, flush=True)
        rows.append(row)
    notes = (
        f"Effective receptive field of PatchCore's default embedding per backbone, from the gradient of the centre "
        f"cell on the central {args.size}x{args.size} crop of {len(images)} training images of {CAPSULES.name}. "
        "r50..r99: half-width in pixels of the centred square holding that share of |gradient|; extent: where "
        "the gradient is non-zero. CNNs: default_context = r95 rounded up to 16 px, the value each backbone's "
        "`default_context` is set to. ViTs attend globally, so their gradient fills whatever window they get "
        "(r95 grows with the crop) and the rule does not apply: their default is the smallest margin of the "
        "residual table below whose seam cells come within 6% of the tiles' centre cells (DINOv2 ViT-S/14: 56 px, "
        "4 tokens)."
    )
    columns = ["backbone", "layers", "aggregation", "cell_px", "r50", "r90", "r95", "r99", "extent", "default_context"]
    residual_rows = []
    for backbone in args.backbones:
        tile = 224 if backbone.startswith("dinov2") else 256
        residual_rows += tiling_residual(backbone, images, tile, args.residual_margins)
    path = write_results(args.out, rows, notes, columns=columns)
    text = path.read_text() + (
        "\n## Tile embeddings vs the whole crop, by context margin\n\n"
        "2 x 2 tiles over the central 2-tile crop of each image; relative mean |tiles - whole| at the cells "
        "beside the inner seams and at the tiles' centres. A CNN's centre cells are exact (0); with enough "
        "context so are its seam cells. A ViT never is (global attention): there the question is whether the "
        "seam cells are as close as the centre cells (seam_over_centre near 1).\n\n"
    )
    text += table(residual_rows, ["backbone", "tile", "context", "context_used", "seam_residual", "centre_residual", "seam_over_centre", "window_pixel_share"])
    path.write_text(text)
    print(path)


if __name__ == "__main__":
    main()
