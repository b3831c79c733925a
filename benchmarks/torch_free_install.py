"""A torch-free install of hrad runs an exported model: a fresh virtualenv with only
``requirements-runtime.txt`` (no torch) and hrad itself (``pip install --no-deps``) predicts
what the torch model predicts, and measures the export on a labelled test set as the full
install measures it.

1. With this (development) interpreter: fit a small tiled PatchCore (tiny-cnn) on a few capsules
   training images, ``hrad export`` it to ONNX, and ``hrad predict`` the test images with the
   torch model (maps as float32 TIFF).
2. ``python -m venv`` a new environment, ``pip install -r requirements-runtime.txt`` and
   ``pip install --no-deps <repo>`` into it, and check that ``import torch`` fails there.
3. The new environment's ``hrad predict --model m.onnx`` on the same images: maps and scores must
   equal the torch model's to 1e-4 of the map's magnitude (as tests/test_export_runtime.py).
4. The new environment's ``hrad evaluate --model m.onnx`` on those test images with their masks
   (a copy in the MVTec layout): its metrics (every number of metrics.json but time and memory)
   must equal, to 1e-4, those of the development environment's ``hrad evaluate`` of the same
   export and of the model directory it came from (torch), and it writes the same report files.

Too slow for the test suite (it downloads and installs packages); run it after changing what the
exported predictors or ``hrad evaluate`` import, from a clean clone (it installs the checkout it
runs from, uncommitted changes included):

    PYTHONPATH=. python benchmarks/torch_free_install.py --n-train 3 --n-test 10
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from benchmarks.common import capsules, subset, write_results

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
#: what differs between two runs of one evaluation: not compared
RUN_DEPENDENT = {"seconds_per_image", "peak_rss_mb", "peak_gpu_mb"}


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


def metrics(report: Path) -> dict[str, Any]:
    """The numbers of an ``hrad evaluate`` report's metrics.json (top level), time and memory aside."""
    payload = json.loads((report / "metrics.json").read_text())
    return {key: value for key, value in payload.items() if isinstance(value, (int, float)) and key not in RUN_DEPENDENT}


def metric_difference(got: dict[str, Any], reference: dict[str, Any]) -> float:
    """Largest difference over the reference's numbers, relative where a number exceeds 1 in size
    (thresholds); both undefined (null) counts as equal, one of them as infinitely apart."""
    if set(got) != set(reference):
        return math.inf
    worst = 0.0
    for key, expected in reference.items():
        value = got[key]
        if value is None or expected is None:
            worst = max(worst, 0.0 if value is expected else math.inf)
        else:
            worst = max(worst, abs(float(value) - float(expected)) / max(1.0, abs(float(expected))))
    return worst


def labelled_copy(samples: Sequence[Any], root: Path) -> Path:
    """The test samples and their masks in the MVTec layout (test/<type>/, ground_truth/<type>/), for ``hrad evaluate --data``."""
    for sample in samples:
        (root / "test" / sample.defect_type).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, root / "test" / sample.defect_type / sample.path.name)
        if sample.mask_path is not None:
            (root / "ground_truth" / sample.defect_type).mkdir(parents=True, exist_ok=True)
            shutil.copy(sample.mask_path, root / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png")
    return root


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
        labelled = labelled_copy(test, work / "labelled")
        for model, report in ((work / "model", "evaluate_model"), (work / "export" / "m.onnx", "evaluate_export")):
            run([*hrad, "evaluate", "--model", model, "--data", labelled, "--out", work / report], env=env)

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
        evaluate_s, _ = run([venv / "bin" / "hrad", "evaluate", "--model", work / "export" / "m.onnx", "--data", labelled,
                             "--out", work / "evaluate_exported"], env=clean, cwd=work)  # fmt: skip
        evaluated = metrics(work / "evaluate_exported")
        vs_full_install = metric_difference(evaluated, metrics(work / "evaluate_export"))
        vs_model = metric_difference(evaluated, metrics(work / "evaluate_model"))
        same_files = sorted(p.name for p in (work / "evaluate_exported").iterdir()) == sorted(p.name for p in (work / "evaluate_export").iterdir())
        reference, ours = outputs(work / "with_torch"), outputs(work / "exported")
        assert sorted(reference) == sorted(ours)
        map_difference = max(
            float(np.abs(ours[name][0] - reference[name][0]).max() / np.abs(reference[name][0]).max()) for name in reference
        )
        score_difference = max(abs(ours[name][1] - reference[name][1]) / abs(reference[name][1]) for name in reference)
        predict_passed = map_difference <= TOLERANCE and score_difference <= TOLERANCE
        evaluate_passed = vs_full_install <= TOLERANCE and vs_model <= TOLERANCE and same_files
        passed = predict_passed and evaluate_passed
        site_packages_mb = sum(path.stat().st_size for path in (venv / "lib").rglob("*") if path.is_file()) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    packages = sorted(line.split("==")[0] for line in frozen.split() if "==" in line)
    row = {
        "images": len(test),
        "venv_s": round(venv_s, 1),
        "install_requirements_s": round(requirements_s, 1),
        "install_hrad_s": round(package_s, 1),
        "predict_s": round(predict_s, 1),
        "evaluate_s": round(evaluate_s, 1),
        "packages": len(packages),
        "site_packages_mb": round(site_packages_mb),
        "torch_importable": False,
        "max_map_difference": f"{map_difference:.1e}",
        "max_score_difference": f"{score_difference:.1e}",
        "image_auroc": round(evaluated["image_auroc"], 4) if evaluated["image_auroc"] is not None else None,
        "pixel_auroc": round(evaluated["pixel_auroc"], 4),
        "aupro_30": round(evaluated["aupro_30"], 4),
        "metrics_vs_full_install": f"{vs_full_install:.1e}",
        "metrics_vs_torch_model": f"{vs_model:.1e}",
        "passed": passed,
    }
    notes = (
        f"A fresh virtualenv (python {sys.version.split()[0]}) with `pip install -r requirements-runtime.txt` and "
        f"`pip install --no-deps .` (no torch: `import torch` fails there) runs `hrad predict --model m.onnx` and "
        f"`hrad evaluate --model m.onnx` on {len(test)} capsules test images ({sum(s.label == 1 for s in test)} defective, "
        f"with their masks); the export is of a tiled PatchCore (tiny-cnn, 256 tiles) fitted on {len(train)} training "
        f"images by the development environment (fit {fit_s:.0f} s, export {export_s:.0f} s), whose torch `hrad predict` "
        f"gives the reference maps and scores (differences relative to the map's magnitude / the score). The torch-free "
        f"evaluation's metrics (image_auroc, pixel_auroc, aupro_30 shown; every number of metrics.json but time and memory "
        f"compared) against the development environment's `hrad evaluate` of the same export (metrics_vs_full_install) "
        f"and of the model directory (metrics_vs_torch_model): largest difference, relative above 1 (thresholds). Pass: "
        f"every difference within {TOLERANCE:g} and the same report files. site_packages_mb: the venv's lib folder. "
        f"Install times depend on pip's cache and the network. Packages installed: {', '.join(packages)}."
    )
    path = write_results(args.name, [row], notes, columns=list(row))
    print(path.read_text())
    if not predict_passed:
        raise SystemExit("the torch-free predict differs from the torch model")
    if not evaluate_passed:
        raise SystemExit("the torch-free evaluate differs from the development environment's")


if __name__ == "__main__":
    main()
