"""A torch-free install of hrad runs an exported model: a fresh virtualenv with only
``requirements-runtime.txt`` (no torch) and hrad itself (``pip install --no-deps``) predicts
what the torch model predicts.

1. With this (development) interpreter: fit a small tiled PatchCore (tiny-cnn) on a few capsules
   training images, ``hrad export`` it to ONNX, and ``hrad predict`` the test images with the
   torch model (maps as float32 TIFF).
2. ``python -m venv`` a new environment, ``pip install -r requirements-runtime.txt`` and
   ``pip install --no-deps <repo>`` into it, and check that ``import torch`` fails there.
3. The new environment's ``hrad predict --model m.onnx`` on the same images: maps and scores must
   equal the torch model's to 1e-4 of the map's magnitude (as tests/test_export_runtime.py).

Too slow for the test suite (it downloads and installs packages); run it after changing what the
exported predictors import:

    PYTHONPATH=. python benchmarks/torch_free_install.py --n-train 3 --n-test 2
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from benchmarks.common import capsules, subset, write_results

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def run(command: Sequence[str | Path], **options: object) -> tuple[float, str]:
    """Run ``command``; its seconds and output (an error with the output when it fails)."""
    start = time.perf_counter()
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, check=False, **options)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start, result.stdout + result.stderr


def outputs(folder: Path) -> dict[str, tuple[np.ndarray, float]]:
    rows = list(csv.DictReader((folder / "scores.csv").open()))
    assert all(row["status"] == "ok" for row in rows), rows
    return {Path(row["path"]).name: (tifffile.imread(folder / row["map"]), float(row["score"])) for row in rows}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=2)
    parser.add_argument("--name", default="torch_free_install")
    args = parser.parse_args(argv)
    train, test = subset(capsules(), args.n_train, args.n_test)
    work = Path(tempfile.mkdtemp(prefix="hrad-torch-free-"))
    try:
        data = work / "data"
        data.mkdir()
        for path in train:
            shutil.copy(path, data / path.name)
        (work / "images").mkdir()
        for sample in test:
            shutil.copy(sample.path, work / "images" / f"{sample.path.parent.name}_{sample.path.name}")
        hrad = [sys.executable, "-m", "hrad.cli.main"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        fit_s, _ = run([*hrad, "fit", "--data", data, "--out", work / "model", "--backbone", "tiny-cnn", "--detector", "patchcore",
                        "--strategy", "tiled", "--tile", "256"], env=env)  # fmt: skip
        export_s, _ = run([*hrad, "export", "--model", work / "model", "--out", work / "export" / "m.onnx"], env=env)
        run([*hrad, "predict", "--model", work / "model", work / "images", "--format", "tiff", "--out", work / "with_torch"], env=env)

        venv = work / "venv"
        clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        venv_s, _ = run([sys.executable, "-m", "venv", venv], env=clean)
        python = venv / "bin" / "python"
        requirements_s, _ = run([python, "-m", "pip", "install", "--quiet", "-r", ROOT / "requirements-runtime.txt"], env=clean)
        package_s, _ = run([python, "-m", "pip", "install", "--quiet", "--no-deps", ROOT], env=clean, cwd=work)
        _, frozen = run([python, "-m", "pip", "freeze"], env=clean, cwd=work)
        probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=clean, cwd=work, check=False)
        if probe.returncode == 0:
            raise SystemExit("torch is importable in the new environment: the check would prove nothing")
        predict_s, _ = run([venv / "bin" / "hrad", "predict", "--model", work / "export" / "m.onnx", work / "images",
                            "--format", "tiff", "--out", work / "exported"], env=clean, cwd=work)  # fmt: skip
        reference, ours = outputs(work / "with_torch"), outputs(work / "exported")
        assert sorted(reference) == sorted(ours)
        map_difference = max(
            float(np.abs(ours[name][0] - reference[name][0]).max() / np.abs(reference[name][0]).max()) for name in reference
        )
        score_difference = max(abs(ours[name][1] - reference[name][1]) / abs(reference[name][1]) for name in reference)
        passed = map_difference <= TOLERANCE and score_difference <= TOLERANCE
    finally:
        shutil.rmtree(work, ignore_errors=True)
    packages = sorted(line.split("==")[0] for line in frozen.split() if "==" in line)
    row = {
        "images": len(test),
        "venv_s": round(venv_s, 1),
        "install_requirements_s": round(requirements_s, 1),
        "install_hrad_s": round(package_s, 1),
        "predict_s": round(predict_s, 1),
        "packages": len(packages),
        "torch_importable": False,
        "max_map_difference": f"{map_difference:.1e}",
        "max_score_difference": f"{score_difference:.1e}",
        "passed": passed,
    }
    notes = (
        f"A fresh virtualenv (python {sys.version.split()[0]}) with `pip install -r requirements-runtime.txt` and "
        f"`pip install --no-deps .` (no torch: `import torch` fails there) runs `hrad predict --model m.onnx` on {len(test)} "
        f"capsules test images; the export is of a tiled PatchCore (tiny-cnn, 256 tiles) fitted on {len(train)} training "
        f"images by the development environment (fit {fit_s:.0f} s, export {export_s:.0f} s), whose torch `hrad predict` "
        f"gives the reference maps and scores (differences relative to the map's magnitude / the score; pass: within "
        f"{TOLERANCE:g}). Install times depend on pip's cache and the network. Packages installed: {', '.join(packages)}."
    )
    path = write_results(args.name, [row], notes, columns=list(row))
    print(path.read_text())
    if not passed:
        raise SystemExit("the torch-free predict differs from the torch model")


if __name__ == "__main__":
    main()
