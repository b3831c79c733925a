"""MVTec AD 2 protocol: submission export (names, dtype, sizes) and the public-test metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import textured_image, with_spot

from hrad.ad2 import as_submitted, evaluate_ad2, export_submission
from hrad.config import load_config
from hrad.data import ImageList, load_dataset, read_mask, write_image, write_mask
from hrad.errors import ConfigError, InputError
from hrad.metrics import PixelMetrics
from hrad.model import AnomalyModel

SIZE = (84, 112)


@pytest.fixture
def ad2_root(tmp_path: Path) -> Path:
    """A tiny ``<object>/{train, validation, test_public, test_private, test_private_mixed}`` tree."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mvtec_ad_2" / "walnuts"
    for index in range(3):
        write_image(root / "train" / "good" / f"{index:03d}_regular.png", textured_image(rng, *SIZE))
    for index in range(2):
        write_image(root / "validation" / "good" / f"{index:03d}_regular.png", textured_image(rng, *SIZE))
    write_image(root / "test_public" / "good" / "000_regular.png", textured_image(rng, *SIZE))
    for index in range(2):
        image, mask = with_spot(textured_image(rng, *SIZE), 30 + 10 * index, 40, 16)
        write_image(root / "test_public" / "bad" / f"{index:03d}_regular.png", image)
        write_mask(root / "test_public" / "ground_truth" / "bad" / f"{index:03d}_regular_mask.png", mask)
    write_image(root / "test_private" / "000.png", textured_image(rng, *SIZE))
    write_image(root / "test_private" / "001.png", with_spot(textured_image(rng, *SIZE), 10, 10, 12)[0])
    write_image(root / "test_private_mixed" / "000.png", textured_image(rng, 70, 98))  # another size
    return root


def fitted(ad2_root: Path, validation: bool = True) -> AnomalyModel:
    dataset = load_dataset(ad2_root)
    config = load_config(
        None,
        {
            "backbone": {"name": "tiny-vit"},
            "detector": {"name": "test-gaussian"},
            "strategy": {"name": "mrf", "pixel_budget": 12_000, "scales": (0.5, 1.0)},
            "threshold": {"validation_fraction": 0},
            "device": "cpu",
        },
    )
    images = ImageList(dataset.validation) if validation else None
    return AnomalyModel(config).fit(ImageList(dataset.train), validation=images)


def test_export_writes_float16_maps_and_binary_masks_in_the_server_layout(ad2_root: Path, tmp_path: Path) -> None:
    dataset = load_dataset(ad2_root)
    model = fitted(ad2_root)
    out = tmp_path / "submission"
    counts = export_submission(model, dataset, out)
    assert counts == {"test_private": 2, "test_private_mixed": 1}
    expected = {
        "anomaly_images/walnuts/test_private/000.tiff": SIZE,
        "anomaly_images/walnuts/test_private/001.tiff": SIZE,
        "anomaly_images/walnuts/test_private_mixed/000.tiff": (70, 98),
    }
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert written == sorted([*expected, *(name.replace("anomaly_images/", "anomaly_images_thresholded/").replace(".tiff", ".png") for name in expected)])
    threshold = model.thresholds.pixel
    for name, shape in expected.items():
        tiff = tifffile.imread(out / name)
        assert tiff.dtype == np.float16 and tiff.shape == shape
        prediction = model.predict(dataset.root / name.split("walnuts/")[1].replace(".tiff", ".png"))
        np.testing.assert_array_equal(tiff, prediction.anomaly_map.astype(np.float16))
        png = out / name.replace("anomaly_images/", "anomaly_images_thresholded/").replace(".tiff", ".png")
        np.testing.assert_array_equal(read_mask(png, shape), tiff.astype(np.float32) >= threshold)
    spotted = tifffile.imread(out / "anomaly_images/walnuts/test_private/001.tiff").astype(np.float32)
    assert spotted[10:22, 10:22].mean() > spotted[50:, 60:].mean()


def test_export_needs_a_threshold_for_binary_maps_and_the_private_splits(ad2_root: Path, tmp_path: Path) -> None:
    dataset = load_dataset(ad2_root)
    model = fitted(ad2_root, validation=False)
    assert model.thresholds is None
    with pytest.raises(ConfigError, match="validation"):
        export_submission(model, dataset, tmp_path / "a")
    counts = export_submission(model, dataset, tmp_path / "b", splits=("test_public",), thresholded=False)
    assert counts == {"test_public": 3}
    assert (tmp_path / "b" / "anomaly_images" / "walnuts" / "test_public" / "bad" / "001_regular.tiff").is_file()
    assert not (tmp_path / "b" / "anomaly_images_thresholded").exists()
    dataset.extra.pop("test_private_mixed")
    with pytest.raises(InputError, match="test_private_mixed"):
        export_submission(model, dataset, tmp_path / "c", thresholded=False)


def test_evaluate_ad2_matches_the_metrics_on_submitted_maps(ad2_root: Path) -> None:
    dataset = load_dataset(ad2_root)
    model = fitted(ad2_root)
    result = evaluate_ad2(model, dataset)
    assert {"aupro_05", "pixel_auroc_05", "seg_f1", "seg_threshold", "image_auroc", "images"} <= set(result)
    assert result["images"] == 3 and result["seg_threshold"] == model.thresholds.pixel
    reference = PixelMetrics()
    predicted = true = 0
    overlap = 0
    for sample in dataset.test:
        anomaly_map = as_submitted(model.predict(sample.path).anomaly_map)
        mask = sample.load_mask(anomaly_map.shape)
        reference.add(anomaly_map, mask)
        binary = anomaly_map >= result["seg_threshold"]
        predicted, true, overlap = predicted + binary.sum(), true + mask.sum(), overlap + (binary & mask).sum()
    assert result["aupro_05"] == pytest.approx(reference.aupro(0.05))
    assert result["pixel_auroc_05"] == pytest.approx(reference.auroc(0.05))
    assert result["seg_f1"] == pytest.approx(2 * overlap / (predicted + true))
    assert 0 <= result["aupro_05"] <= 1 and result["pixel_auroc_05"] > 0.5


def test_as_submitted_rounds_to_float16_and_clips_its_range() -> None:
    values = np.array([[1e6, -1e6, 0.1]], dtype=np.float32)
    rounded = as_submitted(values)
    assert rounded.dtype == np.float32 and np.isfinite(rounded).all()
    assert rounded[0, 2] == np.float32(np.float16(0.1))


def test_cli_fits_on_validation_split_and_exports(ad2_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys

    from hrad.cli.main import main

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["hrad", *args])
        try:
            main()
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 0

    model = tmp_path / "model"
    assert run("fit", "--data", str(ad2_root), "--out", str(model), "--backbone", "tiny-vit", "--detector", "test-gaussian",
               "--strategy", "mrf", "--set", "strategy.pixel_budget=12000", "--set", "strategy.scales=[0.5, 1.0]") == 0
    assert run("ad2-evaluate", "--model", str(model), "--data", str(ad2_root), "--out", str(tmp_path / "m")) == 0
    assert "aupro_05" in json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert run("ad2-export", "--model", str(model), "--data", str(ad2_root), "--out", str(tmp_path / "sub")) == 0
    maps = sorted((tmp_path / "sub").rglob("*.tiff"))
    assert len(maps) == 3 and tifffile.imread(maps[0]).dtype == np.float16
