"""What a deployed threshold decides, measured by ``hrad evaluate``: false alarms, defective
images flagged (per defect type), pixel precision / recall / F1 at the pixel threshold, and the
oracle operating points."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image, with_spot

from hrad.config import load_config
from hrad.data.datasets import load_dataset
from hrad.data.images import ImageList
from hrad.evaluation import evaluate
from hrad.metrics import PixelMetrics, operating_points, threshold_decisions
from hrad.model import AnomalyModel, load

pytestmark = pytest.mark.usefixtures("one_thread")


def test_threshold_decisions_and_operating_points_on_small_arrays() -> None:
    scores = [0.1, 0.5, 0.3, 0.9, 0.4, 0.2]
    labels = [0, 0, 0, 1, 1, 1]
    assert threshold_decisions(scores, labels, 0.35) == {
        "good_flagged": 1 / 3, "defective_flagged": 2 / 3, "good_images_flagged": 1, "defective_images_missed": 1,
    }  # fmt: skip
    assert threshold_decisions(scores, labels, 0.9)["defective_flagged"] == 0.0  # flags score > threshold, not >=
    points = operating_points(scores, labels)
    assert points[0] == {"point": "no good image flagged", "threshold": 0.5, **threshold_decisions(scores, labels, 0.5)}
    assert points[0]["good_flagged"] == 0.0 and points[0]["defective_flagged"] == 1 / 3
    assert points[1]["threshold"] == np.nextafter(0.2, -np.inf) and points[1]["defective_flagged"] == 1.0
    assert points[1]["good_flagged"] == 2 / 3
    assert operating_points([0.1, 0.2], [0, 0]) == [] and np.isnan(threshold_decisions([0.1], [0], 0.0)["defective_flagged"])


def test_pixel_decisions_at_a_threshold_equal_counting_every_pixel(rng: np.random.Generator) -> None:
    maps = [rng.random((12, 17)).astype(np.float32) for _ in range(4)]
    masks = [rng.random((12, 17)) > 0.8 for _ in range(3)] + [None]
    threshold = 0.6
    for exact in ((threshold,), ()):  # counted image by image, or answered from the bins
        metrics = PixelMetrics(score_bits=32, seg_thresholds=exact)
        for anomaly_map, mask in zip(maps, masks, strict=True):
            metrics.add(anomaly_map, mask)
        predicted = np.concatenate([m.ravel() >= threshold for m in maps])
        truth = np.concatenate([(np.zeros(m.shape, bool) if t is None else t).ravel() for m, t in zip(maps, masks, strict=True)])
        tp, fp, fn = int((predicted & truth).sum()), int((predicted & ~truth).sum()), int((~predicted & truth).sum())
        assert metrics.counts_at(threshold) == (tp, fp, fn)
        decided = metrics.decisions_at(threshold)
        assert decided["precision"] == pytest.approx(tp / (tp + fp)) and decided["recall"] == pytest.approx(tp / (tp + fn))
        assert decided["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("decisions") / "part"
    rng = np.random.default_rng(7)
    for index in range(8):
        write(root / "train" / "good" / f"{index:03d}.png", textured_image(rng, 64, 64))
    for index in range(4):
        write(root / "test" / "good" / f"{index:03d}.png", textured_image(rng, 64, 64))
    for kind, size in (("spot", 10), ("speck", 2)):
        for index in range(3):
            image, mask = with_spot(textured_image(rng, 64, 64), 12 + 9 * index, 14 + 7 * index, size)
            write(root / "test" / kind / f"{index:03d}.png", image)
            (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{index:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root


@pytest.fixture(scope="module")
def model(dataset: Path) -> AnomalyModel:
    config = load_config(None, {"backbone": {"name": "tiny-cnn"}, "detector": {"name": "test-gaussian"}, "strategy": {"name": "downsample", "image_size": 64}})
    return AnomalyModel(config).fit(load_dataset(dataset).train)


def test_evaluate_measures_what_the_thresholds_decide_as_predict_decides_it(model: AnomalyModel, dataset: Path, tmp_path: Path) -> None:
    samples = [sample for sample in load_dataset(dataset).test if sample.label >= 0]
    assert model.thresholds is not None
    for decision in (None, (model.thresholds.image * 0.9, model.thresholds.pixel * 1.1)):
        metrics = evaluate(model, samples, tmp_path / "report", decision_thresholds=decision)
        image_threshold, pixel_threshold = decision or (model.thresholds.image, model.thresholds.pixel)
        # the brute-force reference: hrad predict's own decisions at the same thresholds
        predictions = [model.predict(sample.path, threshold=image_threshold, pixel_threshold=pixel_threshold) for sample in samples]
        flagged = np.array([bool(p.is_anomalous) for p in predictions])
        labels = np.array([sample.label for sample in samples])
        assert metrics["thresholds_from"] == ("model" if decision is None else "given")
        assert metrics["image_threshold"] == image_threshold and metrics["pixel_threshold"] == pixel_threshold
        assert metrics["good_flagged"] == pytest.approx(flagged[labels == 0].mean())
        assert metrics["defective_flagged"] == pytest.approx(flagged[labels == 1].mean())
        assert metrics["defective_images_missed"] == int((~flagged[labels == 1]).sum())
        by_type = {row["defect_type"]: row for row in metrics["decisions_by_defect_type"]}
        assert list(by_type) == ["good", "speck", "spot"]
        for kind, row in by_type.items():
            chosen = [bool(p.is_anomalous) for p, s in zip(predictions, samples, strict=True) if s.defect_type == kind]
            assert (row["images"], row["flagged"]) == (len(chosen), sum(chosen))
        truth = [sample.load_mask(p.anomaly_map.shape) for p, sample in zip(predictions, samples, strict=True)]
        tp = sum(int((p.anomaly_map >= pixel_threshold)[t].sum()) for p, t in zip(predictions, truth, strict=True))
        predicted = sum(int((p.anomaly_map >= pixel_threshold).sum()) for p in predictions)
        assert metrics["pixel_precision_at_threshold"] == pytest.approx(tp / predicted)
        assert metrics["pixel_recall_at_threshold"] == pytest.approx(tp / sum(int(t.sum()) for t in truth))
    report = (tmp_path / "report" / "metrics.md").read_text()
    assert "## Decisions at the thresholds" in report and "(given on the command line)" in report
    assert "| speck |" in report and "### Operating points" in report and "oracle" in report
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Decisions at the thresholds</h2>" in html and "Operating points" in html
    assert "were given on the command line" in html
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert [point["point"] for point in saved["operating_points"]] == ["no good image flagged", "every defective image flagged"]


def test_hrad_evaluate_takes_thresholds_and_refuses_bad_ones(
    model: AnomalyModel, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = model.save(tmp_path / "model")
    assert run(["evaluate", "--model", str(saved), "--data", str(dataset), "--out", str(tmp_path / "r"), "--sigmas", "1"], monkeypatch) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["thresholds_from"] == "given"
    assert metrics["image_threshold"] == pytest.approx(model.decision_thresholds(sigmas=1)[0])
    assert '"good_flagged"' in out and '"pixel_f1_at_threshold"' in out  # the flat numbers are printed, the result on stdout
    assert run(["evaluate", "--model", str(saved), "--data", str(dataset), "--out", str(tmp_path / "r2"), "--threshold", "nan"], monkeypatch) == 2
    assert "threshold must be a finite number" in capsys.readouterr().err


def test_reports_say_a_calibrated_model_s_thresholds_and_a_test_set_without_good_images(
    model: AnomalyModel, dataset: Path, tmp_path: Path
) -> None:
    """A model calibrated again is said to be (not 'from held-out normal images'), and a test set
    of defective images only says it has no good ones (not 'nan% of the good ones')."""
    calibrated = load(model.save(tmp_path / "model"))
    calibrated.calibrate(ImageList([sample.path for sample in load_dataset(dataset).test if sample.label == 0]))
    defective = [sample for sample in load_dataset(dataset).test if sample.label == 1]
    metrics = evaluate(calibrated, defective, tmp_path / "report")
    assert metrics["thresholds_from"] == "calibrated"
    report = (tmp_path / "report" / "metrics.md").read_text()
    assert "(the model's, from the good images given to hrad calibrate): no good test images, " in report
    assert "nan" not in report.split("## Decisions at the thresholds")[1].split("###")[0]
    assert "come from the good images given to hrad calibrate" in (tmp_path / "report" / "report.html").read_text()
