"""16-bit files from 10/12/14-bit cameras: quality as stored vs scaled to the full range.

Machine-vision cameras write Mono10/12/14 data into 16-bit files with the low bits aligned.
This benchmark makes such files from a VisA capsules subset (each 8-bit value ``v`` stored as
``round(v * (2**bits - 1) / 255)`` in a 16-bit PNG, masks unchanged), then fits and evaluates
the same tiled PatchCore three ways: on the 8-bit originals, on the 16-bit copies with
``bit_depth=16`` (as stored: uint16 / 65535, hrad's rule before ``hrad.data.bit_depth``) and with
``bit_depth=auto`` (the depth learned from the training images, each image scaled to the full
16-bit range first). The copies live in a temporary folder, removed afterwards.

    PYTHONPATH=. python benchmarks/bit_depth.py --depths 12 10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.common import MAIN_COLUMNS, capsules, run_setup, subset, write_results
from hrad.data.datasets import Sample
from hrad.data.images import read_pixels


def stored_at(path: Path, out: Path, bits: int) -> Path:
    """``path``'s 8-bit pixels as a 16-bit PNG of ``bits`` significant bits, low bits aligned."""
    pixels = read_pixels(path)
    stored = np.rint(pixels.astype(np.float64) * (2**bits - 1) / 255).astype(np.uint16)
    target = out / f"{path.parent.name}_{path.stem}.png"
    cv2.imwrite(str(target), cv2.cvtColor(stored, cv2.COLOR_RGB2BGR))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[12], help="camera bit depths to store the images at")
    parser.add_argument("--n-train", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=1024, help="long side before tiling")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--out", default="bit_depth")
    args = parser.parse_args()

    train, test = subset(capsules(), args.n_train, args.n_test)
    strategy = {"name": "tiled", "image_size": args.image_size, "tile": args.tile}

    def learned(model: Any) -> dict[str, Any]:
        return {"learned_bit_depth": model.bit_depth}

    rows = [run_setup("8-bit originals", {"strategy": strategy}, train, test, learned, stored="uint8")]
    for bits in args.depths:
        with tempfile.TemporaryDirectory(prefix=f"hrad-bits{bits}-") as work:
            folder = Path(work)
            train16 = [stored_at(path, folder, bits) for path in train]
            test16 = [
                Sample(stored_at(sample.path, folder, bits), sample.label, sample.defect_type, sample.mask_path)
                for sample in test
            ]
            for setting in (16, "auto"):
                rows.append(
                    run_setup(
                        f"{bits}-bit in 16-bit files, bit_depth={setting}",
                        {"strategy": strategy, "bit_depth": setting},
                        train16,
                        test16,
                        learned,
                        stored=f"uint16, {bits} bits",
                    )
                )
    notes = (
        f"Tiled PatchCore (efficientnet-lite0, image_size {args.image_size}, tile {args.tile}, hrad's defaults "
        f"otherwise), {len(train)} training images, {len(test)} test images (seeded subset), one run per row. "
        "The 16-bit rows store the same pixels at the given camera depth (low bits aligned); "
        "bit_depth=16 reads them as stored (uint16 / 65535, hrad's rule before bit_depth), bit_depth=auto "
        "learns the depth from the training images and scales every image to the full 16-bit range first."
    )
    columns = ["setup", "stored", "learned_bit_depth", *MAIN_COLUMNS[1:]]
    print(write_results(args.out, rows, notes, columns))


if __name__ == "__main__":
    main()
