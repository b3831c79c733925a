"""The demo dataset and the MVTec-HD-style builder: layout, exact masks, determinism, sizes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from hrad.data import build_hd_dataset, load_dataset, make_demo_dataset, read_image, read_mask
from hrad.data.hd_builder import _upscale_image, upscaled_size
from hrad.data.synthetic import DEFECT_KINDS, MIN_CHANGE, add_defects, normal_image
from hrad.errors import ConfigError, InputError


def _digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------- demo dataset


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defects_change_the_image_exactly_on_the_mask(kind: str) -> None:
    rng = np.random.default_rng(5)
    clean = normal_image(rng, 256, texture="brick", color=kind == "stain")
    defective, mask = add_defects(clean, rng, kind, count=2)
    assert mask.dtype == np.bool_ and mask.any()
    # after 8-bit quantisation, as written to disk
    changed = np.abs(np.round(defective * 255) - np.round(clean * 255)).max(axis=2) > 0
    np.testing.assert_array_equal(changed, mask)
    assert np.abs(defective - clean).max(axis=2)[mask].min() >= MIN_CHANGE - 1e-6


def test_defect_sizes_span_tiny_to_large() -> None:
    rng = np.random.default_rng(0)
    clean = normal_image(rng, 1024)
    boxes = {}
    for kind in DEFECT_KINDS:
        _, mask = add_defects(clean, rng, kind)
        ys, xs = np.nonzero(mask)
        boxes[kind] = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    assert 14 <= boxes["spot"] <= 42
    assert boxes["scratch"] >= 14
    assert boxes["crack"] >= 100 and boxes["stain"] >= 100


def test_demo_dataset_layout_and_determinism(tmp_path: Path) -> None:
    first = make_demo_dataset(tmp_path / "a", image_size=128, n_train=2, n_test_good=1, n_test_bad=4, seed=3)
    second = make_demo_dataset(tmp_path / "b", image_size=128, n_train=2, n_test_good=1, n_test_bad=4, seed=3)
    other = make_demo_dataset(tmp_path / "c", image_size=128, n_train=2, n_test_good=1, n_test_bad=4, seed=4)
    assert _digest(first) == _digest(second)
    assert _digest(first) != _digest(other)
    dataset = load_dataset(first)
    assert dataset.layout == "mvtec" and len(dataset.train) == 2
    assert sorted(s.defect_type for s in dataset.test) == sorted(["good", *DEFECT_KINDS])
    for sample in dataset.test:
        image = read_image(sample.path)
        assert image.shape == (128, 128, 3)
        mask = sample.load_mask(image.shape[:2])
        assert mask.any() == (sample.label == 1)
        if sample.mask_path is not None:
            stored = np.asarray(cv2.imread(str(sample.mask_path), cv2.IMREAD_UNCHANGED))
            assert set(np.unique(stored)) == {0, 255}
    # train images differ from one another (varied crops), but look alike (same texture)
    train = [read_image(path) for path in dataset.train]
    assert not np.array_equal(train[0], train[1])
    assert abs(train[0].mean() - train[1].mean()) < 0.15


def test_demo_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="texture"):
        make_demo_dataset(tmp_path, image_size=128, texture="marble")
    with pytest.raises(ConfigError, match="image_size"):
        make_demo_dataset(tmp_path, image_size=8)


# ---------------------------------------------------------------- MVTec-HD-style builder


def _small_mvtec(root: Path, n_good: int = 6) -> Path:
    """64x48 images: noise backgrounds; anomalous ones with a dark disc and a dark box."""
    rng = np.random.default_rng(0)

    def noise() -> np.ndarray:
        return rng.integers(90, 160, (48, 64, 3), dtype=np.uint8)

    for folder in ["train/good", "test/good", "test/hole", "ground_truth/hole"]:
        (root / folder).mkdir(parents=True)
    for index in range(3):
        cv2.imwrite(str(root / "train/good" / f"{index:03d}.png"), noise())
    for index in range(n_good):
        cv2.imwrite(str(root / "test/good" / f"{index:03d}.png"), noise())
    for index in range(3):
        image, mask = noise(), np.zeros((48, 64), np.uint8)
        cv2.circle(mask, (18 + 4 * index, 20), 7, 255, -1)
        cv2.rectangle(mask, (44, 28), (60, 44), 255, -1)
        cv2.line(mask, (2, 45), (40, 45), 255, 1)  # a 1 px scratch: cannot reach 16 px sides
        image[mask > 0] = 20
        cv2.imwrite(str(root / "test/hole" / f"{index:03d}.png"), image)
        cv2.imwrite(str(root / "ground_truth/hole" / f"{index:03d}_mask.png"), mask)
    return root


def _only_thin_scratches(source: Path) -> None:
    """Every defect mask of ``source`` becomes a 1 px scratch, which cannot reach 16 px sides."""
    for mask_path in (source / "ground_truth/hole").iterdir():
        mask = np.zeros((48, 64), np.uint8)
        cv2.line(mask, (2, 45), (40, 45), 255, 1)
        cv2.imwrite(str(mask_path), mask)


def test_hd_builder_layout_sizes_masks_and_no_duplicates(tmp_path: Path) -> None:
    source = _small_mvtec(tmp_path / "src")
    out = build_hd_dataset(source, tmp_path / "hd", target_size=256, seed=1, tiny_per_image=(1, 3))
    dataset = load_dataset(out)
    assert sorted(dataset.defect_types) == ["good", "large", "tiny"]
    assert len(dataset.train) == 3
    goods = [s for s in dataset.test if s.label == 0]
    tiny = [s for s in dataset.test if s.defect_type == "tiny"]
    large = [s for s in dataset.test if s.defect_type == "large"]
    assert len(goods) + len(tiny) == 6 and len(tiny) == 3  # default: half the good images are hosts
    assert {s.path.stem for s in goods}.isdisjoint({s.path.stem for s in tiny})
    assert len(large) == 3
    assert upscaled_size(64, 48, 256) == (256, 192)
    for sample in dataset.test:
        image = read_image(sample.path)
        assert image.shape == (192, 256, 3)
        mask = sample.load_mask(image.shape[:2])
        if sample.defect_type == "large":
            source_mask = read_mask(source / "ground_truth/hole" / f"{sample.path.stem[5:]}_mask.png")
            # upscaled x4: area scales by ~16
            assert abs(mask.sum() / (16 * source_mask.sum()) - 1) < 0.1
        if sample.defect_type == "tiny":
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            assert 1 <= count - 1 <= 3
            assert np.minimum(stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]).min() >= 16
            # the host changed around the defects only (Poisson seam within a few pixels)
            host = _upscale_image(read_image(source / "test/good" / sample.path.name), 256)
            changed = np.abs(image - host).max(axis=2) > 2 / 255
            near = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
            assert changed[mask].mean() > 0.5 and not (changed & ~near).any()
    manifest = json.loads((out / "hd_manifest.json").read_text())
    assert len(manifest["tiny"]) >= 3
    assert all(min(p["placed_box_xywh"][2:]) >= 16 for p in manifest["tiny"])


def test_hd_builder_is_deterministic(tmp_path: Path) -> None:
    source = _small_mvtec(tmp_path / "src", n_good=4)
    a = build_hd_dataset(source, tmp_path / "a", target_size=192, seed=7)
    b = build_hd_dataset(source, tmp_path / "b", target_size=192, seed=7)
    c = build_hd_dataset(source, tmp_path / "c", target_size=192, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_hd_builder_errors(tmp_path: Path) -> None:
    source = _small_mvtec(tmp_path / "src", n_good=2)
    with pytest.raises(ConfigError, match="n_tiny=5"):
        build_hd_dataset(source, tmp_path / "x", target_size=128, n_tiny=5)
    with pytest.raises(ConfigError, match="tiny_per_image"):
        build_hd_dataset(source, tmp_path / "x", target_size=128, tiny_per_image=(3, 1))
    _only_thin_scratches(source)
    with pytest.raises(InputError, match="no defect region can be shrunk to a box with sides >= 16 px"):
        build_hd_dataset(source, tmp_path / "x", target_size=128)
    normal_only = _small_mvtec(tmp_path / "normal_only", n_good=2)
    shutil.rmtree(normal_only / "test/hole")
    with pytest.raises(InputError, match="normal_only: no anomalous test images"):
        build_hd_dataset(normal_only, tmp_path / "y", target_size=128)


def test_hd_builder_replaces_its_own_dataset_whole_and_leaves_nothing_half_built(tmp_path: Path) -> None:
    """A second build into one folder mixed the two: seed 1's host images in test/good beside seed
    0's in test/tiny (one image, two labels); a build that failed midway (here: no defect can be
    shrunk, found after the good images were written) left a dataset that loads; an unwritable or
    foreign --out was a traceback or files written among the user's."""
    source = _small_mvtec(tmp_path / "src")
    out = tmp_path / "hd"
    build_hd_dataset(source, out, target_size=192, seed=0)
    build_hd_dataset(source, out, target_size=192, seed=1)
    fresh = build_hd_dataset(source, tmp_path / "fresh", target_size=192, seed=1)
    assert _digest(out) == _digest(fresh)
    stems = {label: {path.stem for path in (out / "test" / label).glob("*.png")} for label in ("good", "tiny")}
    assert stems["tiny"] and stems["good"].isdisjoint(stems["tiny"])
    _only_thin_scratches(source)
    with pytest.raises(InputError, match="no defect region can be shrunk"):
        build_hd_dataset(source, tmp_path / "failed", target_size=192)
    with pytest.raises(InputError, match="no defect region can be shrunk"):
        build_hd_dataset(source, out, target_size=192)
    assert _digest(out) == _digest(fresh)  # the earlier dataset stays
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fresh", "hd", "src"]  # no staging folder left
    with pytest.raises(InputError, match=r"src: not empty and not a dataset of hrad make-hd \(it has no hd_manifest.json\)"):
        build_hd_dataset(tmp_path / "fresh", source, target_size=192)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="file: exists and is a file"):
        build_hd_dataset(tmp_path / "fresh", tmp_path / "file", target_size=192)
    with pytest.raises(InputError, match=r"file/hd: cannot write the dataset there \(\S+/file is a file\)"):
        build_hd_dataset(tmp_path / "fresh", tmp_path / "file" / "hd", target_size=192)


def test_make_hd_refuses_a_negative_seed_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--seed -1 was numpy's 'ValueError: expected non-negative integer' traceback, exit 1."""
    from cli_helpers import run

    source = _small_mvtec(tmp_path / "src", n_good=2)
    assert run(["make-hd", "--source", str(source), "--out", str(tmp_path / "hd"), "--seed", "-1"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--seed'" in err and "Traceback" not in err and not (tmp_path / "hd").exists()
