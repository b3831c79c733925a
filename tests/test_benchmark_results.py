"""benchmarks/common.py's results files: the VisA capsules attribution (CC BY 4.0) is written
when a run read capsules, and not on runs of synthetic textures alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType

import pytest

from hrad.data.datasets import Dataset, Sample


@pytest.fixture
def common(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "DATA_READ", set(), raising=False)  # fails by its asserts on code without it
    monkeypatch.setattr("sys.argv", ["benchmarks/hiad_low_border.py", "--capsules-train", "0"])
    monkeypatch.setattr(common, "environment", lambda: {"machine": "test", "cpus": 1, "torch": "-", "device": "cpu", "date": "-"})
    return common


def header(common: ModuleType, name: str) -> str:
    return common.write_results(name, [{"setup": "a"}], "notes", columns=["setup"]).read_text()


def test_textures_alone_are_not_attributed_to_visa(common: ModuleType, tmp_path: Path) -> None:
    """hiad_low_border.py --capsules-train 0 wrote 'Data: VisA capsules ... CC BY 4.0' all the same."""
    args = argparse.Namespace(textures=[], capsules_train=0)
    assert list(common.texture_and_capsules(args, tmp_path)) == []
    assert "VisA" not in header(common, "textures") and "CC BY" not in header(common, "textures")


def test_a_run_that_read_capsules_is_attributed(common: ModuleType, tmp_path: Path) -> None:
    inside = common.CAPSULES / "train" / "good" / "000.JPG"  # paths only: nothing is read
    dataset = Dataset(root=common.CAPSULES, layout="mvtec", category="capsules", train=[inside], validation=[], test=[])
    common.subset(dataset, 1, None)
    assert common.ATTRIBUTION in header(common, "subset")
    common.DATA_READ.clear()
    common.subset_test([Sample(path=tmp_path / "x.png", label=0, defect_type="good")], 1)  # elsewhere: no attribution
    assert common.ATTRIBUTION not in header(common, "elsewhere")
    common.subset_test([Sample(path=inside, label=0, defect_type="good")], 1)
    assert common.ATTRIBUTION in header(common, "test_subset")
