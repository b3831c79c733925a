"""``hrad evaluate --model m.onnx`` (or ``.xml``) runs without torch, on what
requirements-runtime.txt installs, so an inspection engineer can measure the deployed model on
the line PC; its metrics are those of the same export evaluated by a full install."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run
from export_helpers import PATCHCORE, make_model, training_images
from test_export import labelled_folder
from test_export_runtime import LOADED_MODULES, NO_TORCH, requirement_closure, third_party_imports

from hrad.export import export_onnx, export_openvino

ROOT = Path(__file__).resolve().parents[1]
#: what differs between two runs of one evaluation: timings, memory, the date and what computed it
RUN_DEPENDENT = {"seconds_per_image", "peak_rss_mb", "peak_gpu_mb", "environment"}


def evaluate_without_torch(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``hrad evaluate ARGS`` in a process where ``import torch`` fails; its stdout ends with the
    JSON list of the modules it loaded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # openvino may be there
    return subprocess.run(
        [sys.executable, "-c", LOADED_MODULES + NO_TORCH, "evaluate", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_cli_evaluate_on_an_export_without_torch_equals_the_full_install(runtime: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It imported torch (hrad.model for a type check, torch for the peak GPU memory and the
    report's environment), and the runtime requirements lacked scikit-learn (the image metrics):
    on a runtime install it stopped with 'this command needs sklearn'. Behind a torch blocker it now writes the same report, with the
    same metrics to the last bit, as the full install's evaluation of the same export; and every
    third-party package the hrad modules that ran import is installed by requirements-runtime.txt."""
    if runtime == "openvino":
        pytest.importorskip("openvino")
    model = make_model({"name": "tiled", "tile": 48, "stride": 32}, {**PATCHCORE, "num_neighbors": 3})
    model.fit(training_images(5, 3), training_images(9, 2))
    model.save(tmp_path / "model")
    exported = tmp_path / "export" / ("m.xml" if runtime == "openvino" else "m.onnx")
    (export_openvino if runtime == "openvino" else export_onnx)(model, exported)
    data = labelled_folder(tmp_path / "data")

    common = ["--data", str(data)]
    assert run(["evaluate", "--model", str(exported), *common, "--out", str(tmp_path / "full")], monkeypatch) == 0
    result = evaluate_without_torch(["--model", str(exported), *common, "--out", str(tmp_path / "torch_free")])
    assert result.returncode == 0, result.stderr

    full, torch_free = (json.loads((tmp_path / report / "metrics.json").read_text()) for report in ("full", "torch_free"))
    assert set(torch_free) == set(full) and torch_free["images"] == 6 and 0.5 < torch_free["image_auroc"] <= 1
    for key in sorted(set(full) - RUN_DEPENDENT):
        assert json.dumps(torch_free[key]) == json.dumps(full[key]), key  # NaN-safe exact equality, nested values too
    assert torch_free["environment"]["runtime"].startswith(f"{runtime} ") and "torch" not in torch_free["environment"]
    assert sorted(p.name for p in (tmp_path / "torch_free").iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())

    modules = json.loads(result.stdout.strip().splitlines()[-1])
    loaded = {name.split(".")[0] for name in modules}
    assert "torch" not in loaded and {"skimage", "faiss", "safetensors"}.isdisjoint(loaded)
    ran = [ROOT / Path(*name.split(".")).with_suffix(".py") for name in modules if name == "hrad" or name.startswith("hrad.")]
    ran += [path.with_suffix("") / "__init__.py" for path in ran]
    used = set().union(*(third_party_imports(path) for path in ran if path.is_file())) & loaded
    assert {"numpy", "sklearn", "matplotlib", "psutil"} <= used
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    needed = {re.sub(r"[-_.]+", "-", d).lower() for name in used for d in distributions.get(name, [name])}
    lines = [line.strip() for line in (ROOT / "requirements-runtime.txt").read_text().splitlines()]
    installed = requirement_closure([line for line in lines if line and not line.startswith("#")])
    assert "torch" not in installed
    assert needed - installed - {"openvino"} == set()  # OpenVINO: installed beside the list for an .xml, as README says


def test_the_blocker_stops_evaluate_of_a_model_directory(tmp_path: Path) -> None:
    """The check can fail: a model directory's evaluation needs torch, and behind the blocker it stops."""
    make_model({"name": "downsample", "image_size": 64}).fit(training_images(1, 2)).save(tmp_path / "model")
    data = labelled_folder(tmp_path / "data")
    result = evaluate_without_torch(["--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "out")])
    assert result.returncode != 0 and "this command needs torch" in result.stderr
