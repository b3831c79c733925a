"""Render ``hrad evaluate``'s HTML report in headless Chromium and save a full-page screenshot.

Without ``--report`` it first builds one on VisA capsules: FastFlow (trainable, so the report has
a loss curve) on efficientnet-lite0 with downsampling, fitted on a few training images and
evaluated on a label-stratified test subset; then it screenshots the page. Needs Debian's
Chromium (``apt-get install -y chromium``).

    PYTHONPATH=. python benchmarks/report_screenshot.py --n-train 10 --n-test 12 --epochs 5
    PYTHONPATH=. python benchmarks/report_screenshot.py --report some/report.html --out shot.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "report_screenshot"
#: the report itself stays out of the repository (it embeds thumbnails of the data)
WORK = Path(__file__).resolve().parent.parent / "runs" / "report_screenshot"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium found: apt-get update && apt-get install -y chromium")


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 12000) -> Path:
    """A screenshot of ``page`` in a ``width`` x ``height`` window, blank rows at the bottom cut off."""
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hrad-chromium-") as profile:
        command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={out}", page.resolve().as_uri()]
        subprocess.run(command, check=True, capture_output=True, timeout=180)
    with Image.open(out) as shot:
        pixels = np.asarray(shot.convert("L"))
        used = np.flatnonzero((pixels < 250).any(axis=1))
        bottom = min(pixels.shape[0], int(used[-1]) + 24) if used.size else pixels.shape[0]
        shot.crop((0, 0, pixels.shape[1], bottom)).save(out, optimize=True)
    return out


def build_report(n_train: int, n_test: int, epochs: int, image_size: int, work: Path) -> Path:
    from benchmarks.common import capsules, subset
    from hrad.config import load_config
    from hrad.data.images import ImageList
    from hrad.evaluation import evaluate
    from hrad.model import AnomalyModel

    train, test = subset(capsules(), n_train, n_test)
    config = load_config(None, {
        "backbone": {"name": "efficientnet-lite0"},
        "detector": {"name": "fastflow", "epochs": epochs},
        "strategy": {"name": "downsample", "image_size": image_size},
    })
    model = AnomalyModel(config).fit(ImageList(train))
    evaluate(model, test, work)
    return work / "report.html"


def write_provenance(report: Path, shot: Path, args: argparse.Namespace) -> Path:
    """README.md beside the screenshot: command, machine, date, data and the report's own numbers."""
    import json
    import shlex

    from benchmarks.common import ATTRIBUTION
    from hrad.evaluation import environment

    metrics = json.loads((report.parent / "metrics.json").read_text())
    env = environment()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/report_screenshot.py", *sys.argv[1:]])
    keys = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro_30", "aupro_05", "score_bits", "images")
    lines = [
        "# report_screenshot",
        "",
        f"`{shot.name}`: `report.html` of `hrad evaluate` rendered by headless Chromium (full page). The report: FastFlow "
        f"on efficientnet-lite0, downsampling to {args.image_size}, {args.epochs} epochs, fitted on the first {args.n_train} "
        f"training images, evaluated on {args.n_test} label-stratified test images. Its numbers (metrics.json):",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {metrics[key]:.4f} |" if isinstance(metrics[key], float) else f"| {key} | {'n/a' if metrics[key] is None else metrics[key]} |"
          for key in keys),  # null: undefined on the test set
        "",
        ATTRIBUTION,
        "",
        f"Command: `PYTHONPATH=. {command}`",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']} on {env['device']}; date {env['date']}.",
        "",
    ]
    path = shot.parent / "README.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="An existing report.html (default: build one on capsules)")
    parser.add_argument("--out", type=Path, default=OUT / "report.png")
    parser.add_argument("--n-train", type=int, default=10)
    parser.add_argument("--n-test", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    report = args.report
    if report is None:
        report = build_report(args.n_train, args.n_test, args.epochs, args.image_size, WORK)
    print(screenshot(report, args.out))
    if args.report is None:
        print(write_provenance(report, args.out, args))


if __name__ == "__main__":
    main()
