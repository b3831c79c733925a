"""A/B check that a refactor leaves fitted pool strategies unchanged, bit for bit.

``fit`` mode (run with ``PYTHONPATH`` at a checkout or ``git archive`` snapshot of the revision to
test): HiAD (patch 256, SCA with 2 detectors) and the tiled ensemble (tile 256) are fitted with
PatchCore and with RD++ (1 epoch; the ensemble at batch 3, so batches span chunks) on the first 4
training images of a dataset resized to 512 x 512, calibrated on the 5th, and 2 test images (the
first bad, the first good) are predicted; every state tensor, map and score goes to an ``.npz``.
``compare`` mode writes the largest absolute difference per setup and kind between two such files
as a Markdown table. Single-threaded, so the same code gives the same bits.

    PYTHONPATH=/tmp/before python benchmarks/ab_states.py fit --data DATA --out before.npz
    PYTHONPATH=/tmp/after python benchmarks/ab_states.py fit --data DATA --out after.npz
    PYTHONPATH=. python benchmarks/ab_states.py compare before.npz after.npz --md result.md --note "..."
"""

from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

SETUPS = [
    ("hiad_patchcore", {"name": "hiad", "patch_size": 256, "low_res_size": 256, "num_detectors": 2, "assignment": "sca"}, {"name": "patchcore"}),
    ("ensemble_patchcore", {"name": "tiled-ensemble", "tile": 256}, {"name": "patchcore"}),
    ("ensemble_rdpp", {"name": "tiled-ensemble", "tile": 256, "batch_size": 3}, {"name": "rdpp", "epochs": 1}),
    ("hiad_rdpp", {"name": "hiad", "patch_size": 256, "low_res_size": 256, "num_detectors": 2, "assignment": "sca"}, {"name": "rdpp", "epochs": 1}),
]


def fit(data: Path, out: Path) -> None:
    import torch
    from PIL import Image

    import hrad
    import hrad.detectors  # noqa: F401 (registers the detectors)
    import hrad.strategies  # noqa: F401
    from hrad.data.images import read_image
    from hrad.detectors.base import detector_config
    from hrad.features.base import BackboneConfig, build_backbone
    from hrad.strategies.base import build_strategy, strategy_config

    torch.set_num_threads(1)

    def small(path: Path) -> np.ndarray:
        image = read_image(path)
        pil = Image.fromarray((image * 255).round().astype(np.uint8)).resize((512, 512), Image.BILINEAR)
        return np.asarray(pil, dtype=np.float32) / 255

    images = [small(path) for path in sorted((data / "train" / "good").iterdir())[:5]]
    test_paths = sorted((data / "test" / "bad").iterdir())[:1] + sorted((data / "test" / "good").iterdir())[:1]
    test = [small(path) for path in test_paths]
    extractor = build_backbone(BackboneConfig(name="efficientnet-lite0"))
    arrays: dict[str, np.ndarray] = {}
    for label, strategy, detector in SETUPS:
        model = build_strategy(strategy_config(strategy), detector_config(detector), extractor)
        model.fit(images[:4])
        model.calibrate(images[4:])
        for key, value in model.state_dict().items():
            arrays[f"{label}/state/{key}"] = value.detach().cpu().numpy()
        for index, image in enumerate(test):
            result = model.predict(image)
            arrays[f"{label}/map/{index}"] = result.anomaly_map
            arrays[f"{label}/score/{index}"] = np.array([result.score])
        print(label, "fitted", flush=True)
    arrays["hrad_path"] = np.array(str(Path(hrad.__file__).parent))
    np.savez(out, **arrays)


def compare(first: Path, second: Path, md: Path | None, note: str) -> None:
    a, b = np.load(first), np.load(second)
    keys = set(a.files) - {"hrad_path"}
    assert keys == set(b.files) - {"hrad_path"}, sorted(keys ^ (set(b.files) - {"hrad_path"}))[:5]
    worst: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}
    for key in sorted(keys):
        setup, kind = key.split("/")[:2]
        u, v = a[key].astype(np.float64), b[key].astype(np.float64)
        difference = float(np.abs(u - v).max()) if u.shape == v.shape and u.size else (0.0 if u.shape == v.shape else np.inf)
        worst[setup, kind] = max(worst.get((setup, kind), 0.0), difference)
        counts[setup, kind] = counts.get((setup, kind), 0) + 1
    rows = [f"| {setup} | {kind} | {counts[setup, kind]} | {worst[setup, kind]:.3g} |" for setup, kind in worst]
    text = "\n".join(
        [
            f"# A/B: {first.name} vs {second.name}",
            "",
            note,
            "",
            f"Code: {a['hrad_path']} vs {b['hrad_path']}.",
            "",
            f"Machine: {platform.machine()}, 2-core CPU, no GPU, 1 torch thread; date {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
            "",
            "| setup | kind | arrays | max abs difference |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if md is not None:
        with md.open("a") as file:
            file.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fit_parser = commands.add_parser("fit")
    fit_parser.add_argument("--data", type=Path, required=True)
    fit_parser.add_argument("--out", type=Path, required=True)
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("first", type=Path)
    compare_parser.add_argument("second", type=Path)
    compare_parser.add_argument("--md", type=Path, default=None)
    compare_parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.command == "fit":
        fit(args.data, args.out)
    else:
        compare(args.first, args.second, args.md, args.note)


if __name__ == "__main__":
    main()
