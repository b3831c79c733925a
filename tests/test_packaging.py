"""Packaging promises: the licence file, optional extras, a torch range, and one-line errors without extras."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hrad.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_license_and_extras_match_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    extras = project["optional-dependencies"]
    assert any(spec.startswith("onnxruntime") for spec in extras["export"])
    assert any(spec.startswith("mlflow") for spec in extras["track"])
    torch = next(spec for spec in project["dependencies"] if spec.startswith("torch"))
    assert ">=" in torch and "==" not in torch


def test_export_without_onnxruntime_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from hrad.export_runtime import onnxruntime_module

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install onnxruntime \(or 'hrad\[export\]' beside torch\)"):
        onnxruntime_module()


def test_tracking_without_mlflow_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from hrad.tracking import tracked_run

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"pip install 'hrad\[track\]'"), tracked_run("fit"):
        pass


@pytest.mark.parametrize("command", [["list"], ["fit", "--data", ".", "--out", "unused_model"]])
def test_commands_of_the_full_install_on_a_runtime_install_are_one_line(command: list[str], tmp_path: Path) -> None:
    """A torch-free box (requirements-runtime.txt) runs exports only; the rest says what is missing
    in one line, status 2, instead of a ModuleNotFoundError traceback."""
    import subprocess

    script = "import sys; sys.modules['torch'] = None; from hrad.cli.main import main; sys.argv[0] = 'hrad'; main()"
    done = subprocess.run([sys.executable, "-c", script, *command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs torch, which is not installed" in lines[0] and "exported models only" in lines[0]
    assert not (tmp_path / "unused_model").exists()


#: a runtime install as the interpreter sees it: importing torch fails (sys.modules['torch'] = None
#: would also do that, but SciPy then takes the None for an imported torch and fails on it)
WITHOUT_TORCH = (
    "import importlib.abc, sys\n"
    "class NoTorch(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name.split('.')[0] == 'torch':\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, NoTorch())\n"
    "from hrad.cli.main import main; sys.argv[0] = 'hrad'; main()\n"
)


@pytest.mark.parametrize(
    ("command", "line"),
    [
        (["info", "no/such/model"], "no/such/model: model not found"),
        (["predict", "--model", "no/such/model", "images", "--out", "out"], "no/such/model: model not found"),
        (["evaluate", "--model", "no/such/model.onnx", "--data", "data", "--out", "out"], "no/such/model.onnx: exported model not found"),
        (["fit", "--data", "no/such/data", "--out", "model"], "no/such/data: dataset folder not found"),
        (["serve", "--model", "no/such/model"], "no/such/model: model not found"),
        (["--max-pixels", "1000", "calibrate", "--model", "no/such/model", "--out", "m", "images"], "no/such/model: model not found"),
        (["predict", "--model", "images", "goood", "--out", "out"], "goood: folder not found"),  # a mistyped input folder
    ],
)
def test_a_missing_input_on_a_runtime_install_is_named_before_the_install(command: list[str], line: str, tmp_path: Path) -> None:
    """On a torch-free box, a command of the full install given a path that does not exist names
    the path, as the full install does, not the missing torch (the user's mistake comes first)."""
    import subprocess

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")  # exists; never read
    (tmp_path / "data" / "test" / "good").mkdir(parents=True)  # a labelled test set, for evaluate
    (tmp_path / "data" / "test" / "good" / "a.png").write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, f"hrad: error: {line}\n")
    assert not (tmp_path / "model").exists()
