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


def fake_dataset(root: Path, n_train: int, n_good: int, n_bad: int) -> Dataset:
    """Paths only: subset() reads nothing."""
    test = [Sample(path=root / f"good_{i:02d}.png", label=0, defect_type="good") for i in range(n_good)]
    test += [Sample(path=root / f"bad_{i:02d}.png", label=1, defect_type="scratch") for i in range(n_bad)]
    train = [root / f"{i:03d}.png" for i in reversed(range(n_train))]
    return Dataset(root=root, layout="mvtec", category="x", train=train, validation=[], test=test)


def test_seed_zero_keeps_the_first_training_images_and_another_seed_draws_them(common: ModuleType, tmp_path: Path) -> None:
    """Seed 0 is every committed results file's subset; --seed 1 left the training images as they were."""
    dataset = fake_dataset(tmp_path, 20, 12, 8)
    train0, test0 = common.subset(dataset, 5, 10)
    assert train0 == [tmp_path / f"{i:03d}.png" for i in range(5)]
    train1, test1 = common.subset(dataset, 5, 10, seed=1)
    assert len(train1) == 5 and train1 == sorted(train1) and set(train1) <= set(dataset.train)
    assert train1 != train0 and train1 == common.subset(dataset, 5, 10, seed=1)[0]
    assert train1 != common.subset(dataset, 5, 10, seed=2)[0]
    assert [s.label for s in test1].count(1) == 4  # label-stratified: 8 of 20 anomalous
    assert common.subset(dataset, None, None, seed=1)[0] == sorted(dataset.train)  # None: all, any seed


def test_texture_and_capsules_seeds_the_demo_textures(common: ModuleType, tmp_path: Path) -> None:
    from hrad.data.images import read_image

    args = argparse.Namespace(textures=["gravel"], size=64, demo_train=1, demo_test=1, capsules_train=0, capsules_test=0)
    images = {}
    for seed in (0, 1):
        ((name, train, test),) = common.texture_and_capsules(args, tmp_path / str(seed), seed=seed)
        assert name == "demo gravel" and len(train) == 1 and len(test) == 2
        images[seed] = read_image(train[0])
    assert (images[0] != images[1]).any()


def test_results_notes_describe_only_the_datasets_that_ran(common: ModuleType) -> None:
    args = argparse.Namespace(textures=["brick"], size=512, demo_train=4, demo_test=3, capsules_train=0, capsules_test=30)
    notes = common.texture_and_capsules_notes(args, 1)
    assert notes == (
        "Synthetic textures (brick): make_demo_dataset at 512x512, seed 1, 4 training images, 3 good + 3 anomalous test images."
    )
    args.textures, args.capsules_train = [], 30
    assert common.texture_and_capsules_notes(args, 0) == (
        "VisA capsules: 30 training images (the first by name), 30 test images (label-stratified subset, seed 0)."
    )
    assert "drawn with seed 2" in common.texture_and_capsules_notes(args, 2)
