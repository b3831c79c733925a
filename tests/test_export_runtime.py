"""Exported models predict without torch: ``hrad predict --model m.onnx`` (or ``.xml``) in a
process where ``import torch`` fails gives the torch model's maps and scores."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cli_helpers import run, write
from export_helpers import PATCHCORE, make_model, recorded_sessions, spinning, spotted_image, training_images

from hrad.data.images import read_image
from hrad.errors import ArtifactError, ConfigError, InputError
from hrad.export import export_onnx, export_openvino
from hrad.export_runtime import graph_session, onnxruntime_module, open_predictor, openvino_module, resize

ROOT = Path(__file__).resolve().parents[1]
#: relative to the map's magnitude; numpy/Pillow resizing vs torch's is within ~1e-6 of it
TOLERANCE = 1e-4
#: hrad's CLI with torch hidden, as on a machine without it: any `import torch` (hrad's or a
#: dependency's) raises ModuleNotFoundError, and torch is not in sys.modules (scikit-learn looks
#: there for array types; a None entry is not what a missing torch looks like)
NO_TORCH = (
    "import sys\n"
    "class NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == 'torch':\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, NoTorch())\n"
    "from hrad.cli.main import main\n"
    "sys.argv = ['hrad', *sys.argv[1:]]\n"
    "try:\n    main()\n"
    "finally:\n    assert not [m for m in sys.modules if m.startswith('torch.')], 'torch was imported'\n"
)


def predict_without_torch(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", NO_TORCH, "predict", *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def outputs(out: Path) -> tuple[np.ndarray, float]:
    row = next(csv.DictReader((out / "scores.csv").open()))
    assert row["status"] == "ok", row
    return tifffile.imread(next(out.glob("*_map.tiff"))), float(row["score"])


def test_the_blocker_blocks_torch(tmp_path: Path) -> None:
    """The shim really hides torch: the torch model cannot be loaded behind it."""
    make_model({"name": "downsample", "image_size": 64}).fit(training_images(1, 2)).save(tmp_path / "model")
    write(tmp_path / "a.png", spotted_image(2))
    result = predict_without_torch(["--model", str(tmp_path / "model"), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")])
    assert result.returncode != 0 and "torch" in result.stderr


@pytest.mark.parametrize(
    ("strategy", "openvino"),
    [({"name": "tiled", "tile": 48, "stride": 32, "image_size": 120}, False),
     ({"name": "tiled-ensemble", "tile": 48}, False),
     ({"name": "mrf", "pixel_budget": 20_000, "scales": [0.5, 1.0]}, False),
     ({"name": "tiled", "tile": 48, "stride": 40}, True),
     ({"name": "hiad", "patch_size": 32, "low_res_size": 48, "assignment": "sca", "num_detectors": 2, "fusion_rates": [0, 1]}, False)],
    ids=["tiled-onnxruntime", "tiled-ensemble-onnxruntime", "mrf-onnxruntime", "tiled-openvino", "hiad-onnxruntime"],
)  # fmt: skip
def test_cli_predict_on_an_export_without_torch_equals_torch_predict(
    strategy: dict, openvino: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if openvino:
        pytest.importorskip("openvino")
    model = make_model(strategy, {**PATCHCORE, "num_neighbors": 3}).fit(training_images(5, 3))
    model.save(tmp_path / "model")
    exported = tmp_path / "export" / ("m.xml" if openvino else "m.onnx")
    (export_openvino if openvino else export_onnx)(model, exported)
    write(tmp_path / "images" / "spot.png", spotted_image(6))

    common = [str(tmp_path / "images"), "--format", "tiff"]
    assert run(["predict", "--model", str(tmp_path / "model"), *common, "--out", str(tmp_path / "torch")], monkeypatch) == 0
    result = predict_without_torch(["--model", str(exported), *common, "--out", str(tmp_path / "exported")])
    assert result.returncode == 0, result.stderr

    torch_map, torch_score = outputs(tmp_path / "torch")
    exported_map, exported_score = outputs(tmp_path / "exported")
    expected = model.predict(read_image(tmp_path / "images" / "spot.png"))
    np.testing.assert_array_equal(torch_map, expected.anomaly_map)  # the torch CLI is the model
    scale = float(np.abs(expected.anomaly_map).max())
    assert exported_map.shape == expected.anomaly_map.shape
    assert np.abs(exported_map - expected.anomaly_map).max() <= TOLERANCE * scale
    assert exported_score == pytest.approx(torch_score, rel=TOLERANCE)
    assert (tmp_path / "exported" / "spot_mask.png").is_file() == (tmp_path / "torch" / "spot_mask.png").is_file()


#: the modules a torch-free predict loaded (printed as JSON when the process exits)
LOADED_MODULES = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: print(json.dumps(sorted(m for m, module in list(sys.modules.items()) if module is not None))))\n"
)


def third_party_imports(module_file: Path) -> set[str]:
    """Top-level names of every non-hrad import statement in a module (function-level ones too)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name != "hrad" and name not in sys.stdlib_module_names and name != "__future__"}


def requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install: themselves and what they require (no extras)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: set[str] = set()
    todo = [re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0] for line in requirements]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            needed = requires(name) or []
        except PackageNotFoundError:
            continue
        todo.extend(re.split(r"[<>=!~;\[ (]", line, maxsplit=1)[0] for line in needed if "extra ==" not in line)
    return seen


def test_torch_free_predict_needs_only_the_runtime_requirements(tmp_path: Path) -> None:
    """What hrad's code imports during ``hrad predict --model m.onnx`` is installed by
    ``requirements-runtime.txt`` (the torch-free install that README documents;
    benchmarks/torch_free_install.py installs it in a fresh virtualenv): every third-party
    package an hrad module that ran imports, and that was loaded, is a listed requirement or one
    of theirs (optional imports inside other packages, such as numpy's of charset_normalizer,
    are those packages' business)."""
    import re
    from importlib.metadata import packages_distributions

    model = make_model({"name": "tiled", "tile": 48}).fit(training_images(5, 2))
    export_onnx(model, tmp_path / "m.onnx")
    write(tmp_path / "images" / "a.png", spotted_image(6))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["predict", "--model", str(tmp_path / "m.onnx"), str(tmp_path / "images"), "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-c", LOADED_MODULES + NO_TORCH, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    loaded = {name.split(".")[0] for name in modules}
    ran = [ROOT / Path(*name.split(".")).with_suffix(".py") for name in modules if name == "hrad" or name.startswith("hrad.")]
    ran += [path.with_suffix("") / "__init__.py" for path in ran]
    used = set().union(*(third_party_imports(path) for path in ran if path.is_file())) & loaded
    assert {"numpy", "onnxruntime"} <= used and "torch" not in used
    distributions = packages_distributions()
    needed = {re.sub(r"[-_.]+", "-", d).lower() for name in used for d in distributions.get(name, [name])}
    lines = [line.strip() for line in (ROOT / "requirements-runtime.txt").read_text().splitlines()]
    installed = requirement_closure([line for line in lines if line and not line.startswith("#")])
    assert "torch" not in installed
    assert needed - installed == set()


def test_predictor_decisions_follow_the_model(tmp_path: Path) -> None:
    model = make_model({"name": "tiled", "tile": 48}).fit(training_images(5, 3), training_images(9, 2))
    export_onnx(model, tmp_path / "m.onnx")
    predictor = open_predictor(tmp_path / "m.onnx")
    image = spotted_image(6)
    for overrides in ({}, {"sigmas": 1.5}, {"threshold": 0.5, "pixel_threshold": 0.25}):
        expected, got = model.predict(image, **overrides), predictor.predict(image, **overrides)
        assert (got.image_threshold, got.pixel_threshold) == pytest.approx((expected.image_threshold, expected.pixel_threshold))
        assert got.is_anomalous == expected.is_anomalous


def test_runtime_option_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model({"name": "downsample", "image_size": 64}).fit(training_images(1, 2))
    model.save(tmp_path / "model")
    export_onnx(model, tmp_path / "m.onnx")
    write(tmp_path / "a.png", spotted_image(2))
    cases = [
        (["--model", str(tmp_path / "model"), "--runtime", "openvino"], "--runtime openvino: only for an exported model"),
        (["--model", str(tmp_path / "m.onnx"), "--runtime", "tensorrt"], "runtime 'tensorrt' is unknown"),
        (["--model", str(tmp_path / "m.onnx"), "--device", "cuda"], "--device cuda: an exported model runs on the CPU"),
        (["--model", str(tmp_path / "missing.onnx")], "missing.onnx: exported model not found"),
        (["--model", str(tmp_path / "model"), "--ort-spinning"], "--ort-spinning: only for an exported model run by onnxruntime"),
        (["--model", str(tmp_path / "m.onnx"), "--runtime", "openvino", "--ort-spinning"], "runtime openvino has no such switch"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert run(["predict", *args, str(tmp_path / "a.png"), "--out", str(tmp_path / "out")], monkeypatch) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError):
        open_predictor(tmp_path / "m.onnx", runtime="tensorrt")


def test_ort_spinning_lets_predicts_onnxruntime_threads_spin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hrad predict`` on an export: onnxruntime's threads sleep between ops, and with
    ``--ort-spinning`` busy-wait (onnxruntime's own default), same scores."""
    model = make_model({"name": "downsample", "image_size": 64}).fit(training_images(1, 2))
    export_onnx(model, tmp_path / "m.onnx")
    write(tmp_path / "a.png", spotted_image(2))
    sessions = recorded_sessions(monkeypatch)
    scores = []
    for flag, expected in (([], "0"), (["--ort-spinning"], "1")):
        del sessions[:]
        out = tmp_path / f"out{expected}"
        assert run(["predict", "--model", str(tmp_path / "m.onnx"), *flag, str(tmp_path / "a.png"), "--out", str(out)], monkeypatch) == 0
        assert [spinning(session) for session in sessions] == [expected]
        scores.append(next(csv.DictReader((out / "scores.csv").open()))["score"])
    assert scores[0] == scores[1]


def test_a_cut_short_or_missing_graph_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An export copied in part (an interrupted scp, a HiAD export without its pool's graphs) gave
    onnxruntime's InvalidProtobuf / NoSuchFile traceback, exit 1, from hrad predict and hrad serve."""
    model = make_model({"name": "downsample", "image_size": 64}).fit(training_images(1, 2))
    export_onnx(model, tmp_path / "m.onnx")
    write(tmp_path / "a.png", spotted_image(2))
    graph = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(graph[: len(graph) // 2])
    capsys.readouterr()
    assert run(["predict", "--model", str(tmp_path / "m.onnx"), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hrad: error: {tmp_path / 'm.onnx'}: the runtime cannot load this graph (cut short or damaged? copy or export it again): Protobuf parsing failed."
    assert len(err.splitlines()) == 1
    sidecar = json.loads((tmp_path / "m.json").read_text())
    with pytest.raises(ArtifactError, match=r"m\.high0\.onnx: graph of the export not found \(.*copy all of the export's files\)$"):
        graph_session(tmp_path / "m.high0.onnx", sidecar, "onnxruntime")


@pytest.mark.parametrize(("source", "target"), [((37, 53), (256, 256)), ((512, 700), (128, 97)), ((300, 300), (300, 150))])
def test_resize_is_torchs_antialiased_bilinear(source: tuple[int, int], target: tuple[int, int]) -> None:
    import torch
    import torch.nn.functional as F

    planes = np.random.default_rng(0).random((2, 3, *source), dtype=np.float32)
    shrinking = target[0] < source[0] or target[1] < source[1]
    expected = F.interpolate(torch.from_numpy(planes), target, mode="bilinear", align_corners=False, antialias=shrinking).numpy()
    got = resize(planes, target)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


SERVE_WITHOUT_TORCH = (
    "import json, sys; sys.modules['torch'] = None\n"
    "from fastapi.testclient import TestClient\n"
    "from hrad.service import create_app\n"
    "client = TestClient(create_app(sys.argv[1]))\n"
    "health = client.get('/health').json()\n"
    "response = client.post('/predict', files={'image': ('spot.png', open(sys.argv[2], 'rb').read(), 'image/png')})\n"
    "assert not [m for m in sys.modules if m.startswith('torch.')], 'torch was imported'\n"
    "print(json.dumps({'health': health, 'status': response.status_code, 'body': response.json()}))\n"
)


def test_serve_an_export_without_torch(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    model = make_model({"name": "tiled", "tile": 48, "stride": 32}).fit(training_images(5, 3), training_images(9, 2))
    export_onnx(model, tmp_path / "m.onnx")
    write(tmp_path / "spot.png", spotted_image(6))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TORCH, str(tmp_path / "m.onnx"), str(tmp_path / "spot.png")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["health"]["strategy"] == "tiled" and served["health"]["device"] == "cpu (onnxruntime)"
    assert served["health"]["fitted_size"] == [90, 130]
    assert served["status"] == 200, served["body"]
    expected = model.predict(read_image(tmp_path / "spot.png"))
    assert served["body"]["score"] == pytest.approx(expected.score, rel=TOLERANCE)
    assert served["body"]["is_anomalous"] is expected.is_anomalous


def test_serve_runtime_option_is_for_exports_only(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from hrad.service import create_app

    make_model({"name": "downsample", "image_size": 64}).fit(training_images(1, 2)).save(tmp_path / "model")
    with pytest.raises(ConfigError, match="--runtime openvino: only for an exported model"):
        create_app(tmp_path / "model", runtime="openvino")
    with pytest.raises(ConfigError, match="--ort-spinning: only for an exported model"):
        create_app(tmp_path / "model", ort_spinning=True)


def test_exported_predictor_refuses_far_smaller_images_as_the_model_does(tmp_path: Path) -> None:
    model = make_model({"name": "tiled", "tile": 48}).fit(training_images(5, 2))
    export_onnx(model, tmp_path / "m.onnx")
    tiny = np.full((8, 12, 3), 0.5, dtype=np.float32)  # short side under 1/8 of the fitted 90
    with pytest.raises(InputError) as from_model:
        model.predict(tiny)
    with pytest.raises(InputError) as from_export:
        open_predictor(tmp_path / "m.onnx").predict(tiny)
    assert str(from_export.value) == str(from_model.value)


def test_a_missing_runtime_names_the_package_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a torch-free box (pip install --no-deps .) the extras would pull torch: the line said
    pip install 'hrad[openvino]', which installs torch, scikit-learn and the rest."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"pip install openvino \(or 'hrad\[openvino\]' beside torch\)$"):
        openvino_module()
    with pytest.raises(ConfigError, match=r"pip install onnxruntime \(or 'hrad\[export\]' beside torch\)$"):
        onnxruntime_module()
