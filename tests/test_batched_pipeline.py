"""hrad predict and hrad evaluate on the batched pipeline: the same outputs as one image at a time."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image, with_spot

from hrad.data.datasets import load_dataset
from hrad.data.images import read_image
from hrad.evaluation import evaluate
from hrad.metrics import PixelMetrics, image_metrics
from hrad.model import AnomalyModel, load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A labelled dataset of images of two sizes and a tiled PatchCore model fitted on it."""
    root = tmp_path_factory.mktemp("batched") / "part"
    rng = np.random.default_rng(3)
    for index in range(4):
        write(root / "train" / "good" / f"{index:03d}.png", textured_image(rng, 96, 128))
    for index in range(4):
        height, width = (96, 128) if index % 2 else (80, 112)
        write(root / "test" / "good" / f"{index:03d}.png", textured_image(rng, height, width))
        image, mask = with_spot(textured_image(rng, height, width), 20 + 8 * index, 30 + 12 * index, 9)
        write(root / "test" / "spot" / f"{index:03d}.png", image)
        (root / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "ground_truth" / "spot" / f"{index:03d}_mask.png"), mask.astype(np.uint8) * 255)
    model = root.parent / "model"
    overrides = {
        "backbone": {"name": "tiny-cnn"},
        "detector": {"name": "patchcore", "coreset_ratio": 1.0},
        "strategy": {"name": "tiled", "tile": 48, "batch_size": 3},
        "threshold": {"validation_fraction": 0.25},
    }
    from hrad.config import load_config

    AnomalyModel(load_config(None, overrides)).fit([read_image(p) for p in sorted((root / "train" / "good").glob("*.png"))]).save(model)
    return root, model


def test_evaluate_on_the_pipeline_equals_image_by_image(fitted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics of evaluate (batches of 3, decoding and metrics in threads) equal those of the
    plain loop of old: read, predict, add to the metrics, one image after another."""
    root, model_dir = fitted
    model = load(model_dir)
    samples = [s for s in load_dataset(root).test if s.label >= 0]
    pixel = PixelMetrics(protocol="full", score_bits=24)
    scores, labels = [], []
    for sample in samples:
        image = read_image(sample.path)
        prediction = model.predict(image)
        pixel.add(prediction.anomaly_map, sample.load_mask(image.shape[:2]))
        scores.append(prediction.score)
        labels.append(sample.label)
    reference = {**image_metrics(np.asarray(scores), np.asarray(labels)), **pixel.result()}

    batches: list[int] = []
    predict_batch = model.predict_batch

    def counting(images: list[np.ndarray], **options: Any) -> list:
        batches.append(len(images))
        return predict_batch(images, **options)

    monkeypatch.setattr(model, "predict_batch", counting)
    metrics = evaluate(model, samples, batch_images=3)
    assert batches == [3, 3, 2]
    assert metrics["images"] == len(samples)
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_predict_and_evaluate_cli_batched_equal_one_at_a_time(
    fitted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, model = fitted
    folder = tmp_path / "images"
    shutil.copytree(root / "test" / "spot", folder)
    (folder / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 8)  # fails alone, mid-batch
    outputs = {}
    for batch in (1, 3):
        out = tmp_path / f"pred{batch}"
        assert run(["predict", "--model", str(model), str(folder), "--out", str(out), "--batch-images", str(batch)], monkeypatch) == 3
        outputs[batch] = out
    assert "Traceback" not in capsys.readouterr().err
    one, three = (list(csv.DictReader((outputs[b] / "scores.csv").open())) for b in (1, 3))
    assert len(one) == 4 and sum(row["status"] == "failed" for row in three) == 1
    for row_one, row_three in zip(one, three, strict=True):
        score, score3 = row_one.pop("score"), row_three.pop("score")
        map_one, map_three = Path(row_one.pop("map")).name, Path(row_three.pop("map")).name  # each in its own out dir
        assert (row_one, map_one) == (row_three, map_three)
        if score:
            assert float(score3) == pytest.approx(float(score), rel=1e-5)
    for name in ("000", "001", "003"):
        maps = [cv2.imread(str(outputs[b] / f"{name}_map.png"), cv2.IMREAD_UNCHANGED).astype(np.int64) for b in (1, 3)]
        assert np.abs(maps[0] - maps[1]).max() <= 1  # 16-bit map on the model's fixed scale

    reports = {}
    for batch in (1, 4):
        report = tmp_path / f"report{batch}"
        assert run(["evaluate", "--model", str(model), "--data", str(root), "--out", str(report), "--batch-images", str(batch)], monkeypatch) == 0
        reports[batch] = json.loads((report / "metrics.json").read_text())
        assert (report / "cases.png").is_file() and (report / "report.html").is_file()
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro_30"):
        assert reports[4][key] == pytest.approx(reports[1][key], abs=1e-6)
