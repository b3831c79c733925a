"""The HTML evaluation report, loss histories in the artifact, curves, and MLflow tracking."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image, with_spot
from export_helpers import make_model
from PIL import Image

import hrad
from hrad.data.images import thumbnail
from hrad.metrics import PixelMetrics
from hrad.metrics.pixel import normalised_area
from hrad.reports.figures import Case, case_grid


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report") / "part"
    rng = np.random.default_rng(3)
    for index in range(6):
        write(root / "train" / "good" / f"{index:03d}.png", textured_image(rng, 64, 64))
    for index in range(3):
        write(root / "test" / "good" / f"{index:03d}.png", textured_image(rng, 64, 64))
        image, mask = with_spot(textured_image(rng, 64, 64), 16 + 8 * index, 20 + 6 * index, 4 + 4 * index)
        write(root / "test" / "spot" / f"{index:03d}.png", image)
        (root / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "ground_truth" / "spot" / f"{index:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root


def test_curves_integrate_to_the_metrics(rng: np.random.Generator) -> None:
    metrics = PixelMetrics(score_bits=32)
    for index in range(4):
        scores = rng.random((20, 30)).astype(np.float32)
        mask = np.zeros((20, 30), bool)
        if index % 2:
            mask[5 : 9 + index, 3:12] = True
            scores[mask] += 0.4
        metrics.add(scores, mask)
    fpr, tpr = metrics.roc_curve()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(metrics.auroc(), abs=1e-12)
    fpr, pro = metrics.pro_curve()
    assert normalised_area(fpr, pro, 0.3) == pytest.approx(metrics.aupro(0.3), abs=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)


def test_fit_keeps_loss_history_and_evaluate_writes_html(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hrad-test")
    model_dir = tmp_path / "model"
    fit = ["fit", "--data", str(dataset), "--out", str(model_dir), "--backbone", "tiny-cnn", "--detector", "fastflow",
           "--strategy", "downsample", "--image-size", "64", "--set", "detector.epochs=3", "--set", "detector.flow_steps=2"]
    assert run(fit, monkeypatch) == 0, capsys.readouterr().err
    model = hrad.load(model_dir)
    assert list(model.training_history) and all(len(v) == 3 for v in model.training_history.values())
    assert json.loads((model_dir / "hrad.json").read_text())["training_history"] == model.training_history

    report = tmp_path / "report"
    args = ["evaluate", "--model", str(model_dir), "--data", str(dataset), "--out", str(report), "--score-bits", "32", "--track"]
    assert run(args, monkeypatch) == 0, capsys.readouterr().err
    page = (report / "report.html").read_text()
    for heading in ("Metrics", "ROC curves", "PRO curve", "AUPRO per defect size", "Image scores", "Training",
                    "Best and worst cases", "Config", "Environment"):
        assert f"<h2>{heading}</h2>" in page, heading
    assert not re.search(r"""(src|href)=["']?(https?:|file:|//)""", page)  # self-contained
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 8
    for data in images:
        assert cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR) is not None
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["score_bits"] == 32 and "scores binned" not in page and "exact (every float32 score its own bin)" in page
    assert f"{metrics['pixel_auroc']:.3f}" in page

    client = mlflow.MlflowClient(tracking_uri=f"file:{store}")
    experiment = client.get_experiment_by_name("hrad-test")
    runs = {r.data.tags["hrad.command"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"fit", "evaluate"}
    fitted, evaluated = runs["fit"], runs["evaluate"]
    assert fitted.data.params["detector.name"] == "fastflow" and fitted.data.params["detector.epochs"] == "3"
    stage = next(iter(model.training_history))
    history = client.get_metric_history(fitted.info.run_id, f"loss.{stage}")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(model.training_history[stage])
    assert "hrad.json" in {Path(a.path).name for a in client.list_artifacts(fitted.info.run_id, "model")}
    assert evaluated.data.metrics["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"])
    assert "report.html" in {Path(a.path).name for a in client.list_artifacts(evaluated.info.run_id, "report")}


def test_metrics_json_and_report_html_record_one_environment(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment (its date above all) is taken once per evaluation: a clock that moves an hour
    at each reading gave metrics.json and report.html two dates when each took its own."""
    from datetime import datetime, timedelta, timezone

    from export_helpers import make_model

    import hrad.evaluation

    class Clock(datetime):
        readings = 0

        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            cls.readings += 1
            return datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(hours=cls.readings)

    rng = np.random.default_rng(0)
    model = make_model({"name": "downsample", "image_size": 64}, "test-gaussian").fit([textured_image(rng, 64, 64) for _ in range(4)])
    saved = model.save(tmp_path / "model")
    monkeypatch.setattr(hrad.evaluation, "datetime", Clock)
    report = tmp_path / "report"
    assert run(["evaluate", "--model", str(saved), "--data", str(dataset), "--out", str(report)], monkeypatch) == 0
    recorded = json.loads((report / "metrics.json").read_text())["environment"]
    page = (report / "report.html").read_text()
    shown = dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", page.split("<h2>Environment</h2>")[1]))
    assert shown == recorded
    assert Clock.readings == 1 and recorded["date"] == "2026-01-01T01:00:00+00:00"


def test_report_renders_in_headless_chromium(tmp_path: Path, rng: np.random.Generator) -> None:
    """The page as a browser shows it: benchmarks/report_screenshot.py's screenshot of a rendered report."""
    import shutil

    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no headless Chromium here (apt-get install -y chromium)")
    from benchmarks.report_screenshot import screenshot
    from hrad.reports.figures import Case
    from hrad.reports.html import ReportData, render_html

    scores = rng.random(8)
    labels = np.array([0, 1] * 4)
    mask = np.zeros((24, 32), bool)
    mask[8:14, 10:20] = True
    case = Case("part.png", 1, 0.9, rng.random((24, 32, 3)), rng.random((24, 32)).astype(np.float32), mask)
    data = ReportData(
        title="report in a browser", metrics={"image_auroc": 0.5, "pixel_auroc": 0.75}, image_scores=scores, image_labels=labels,
        pixel_roc=(np.linspace(0, 1, 50), np.sqrt(np.linspace(0, 1, 50))), pro=(np.linspace(0, 1, 50), np.linspace(0, 1, 50)),
        quartile_aupro={"AUPRO to FPR 0.3": [0.1, 0.2, 0.3, 0.4]}, quartile_limits=[10.0, 20.0, 30.0],
        training_history={"train": [1.0, 0.5, 0.25]}, image_threshold=0.5, cases={"best": [case]},
    )
    page = tmp_path / "report.html"
    page.write_text(render_html(data))
    shot = screenshot(page, tmp_path / "shot.png")
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[1] == 1200 and picture.shape[0] > 2000  # every section laid out
    assert (picture < 200).any(axis=2).mean() > 0.02  # drawn content, not a blank page


def test_thumbnails_bound_the_area_so_strips_stay_legible() -> None:
    assert thumbnail(np.zeros((1000, 1000), np.float32)).shape == (320, 320)
    assert thumbnail(np.zeros((512, 4096), np.float32)).shape == (113, 905)  # not 40 x 320
    assert thumbnail(np.zeros((64, 65536), bool)).shape == (1, 1280)  # the long side is bounded too
    small = np.ones((30, 50), np.float32)
    assert thumbnail(small).shape == (30, 50)


@pytest.mark.parametrize(("image_shape", "figure_width", "stacked"), [((100, 100), 990, False), ((40, 320), 1320, True)])
def test_case_grid_stacks_the_panels_of_wide_images(
    tmp_path: Path, image_shape: tuple[int, int], figure_width: int, stacked: bool
) -> None:
    height, width = image_shape
    case = Case("strip.png", 1, 0.5, np.zeros((height, width, 3), np.float32), np.zeros(image_shape, np.float32), None)
    path = case_grid({"cases": [case, case, case]}, tmp_path / "cases.png")
    with Image.open(path) as figure:
        size = figure.size
    assert size[0] == figure_width  # 9 inches side by side, 12 stacked, at 110 dpi
    if stacked:
        assert size[1] > size[0]  # nine full-width panels, one under the other
    else:
        assert size[1] < 2 * size[0]  # three rows of three square panels


def test_case_grid_shows_its_shared_scale_with_the_pixel_threshold_on_it(tmp_path: Path) -> None:
    """cases.png's maps share one scale, but nothing said which: no colour bar, so a colour meant
    nothing and the rows' maps could not be compared in numbers. All maps are 0 here (black), the
    images black: the bar's bright end (inferno's yellow) and the threshold's cyan mark are all
    that can be bright, under the panels."""
    case = Case("part.png", 1, 0.5, np.zeros((60, 80, 3), np.float32), np.zeros((60, 80), np.float32), None)

    def bright(path: Path, colour: tuple[int, int, int]) -> np.ndarray:
        with Image.open(path) as figure:
            pixels = np.asarray(figure.convert("RGB")).astype(int)
        near = (np.abs(pixels - np.array(colour)).sum(axis=2) < 40).nonzero()[0]
        return near / pixels.shape[0]  # the heights where it is, as a share of the figure's

    plain = case_grid({"cases": [case, case]}, tmp_path / "plain.png", vmin=0.0, vmax=2.0)
    marked = case_grid({"cases": [case, case]}, tmp_path / "marked.png", vmin=0.0, vmax=2.0, pixel_threshold=1.0)
    yellow, cyan = (252, 255, 164), (0, 255, 255)
    assert len(bright(plain, yellow)) > 0 and bright(plain, yellow).min() > 0.75  # the bar, under the panels
    assert len(bright(plain, cyan)) == 0 and len(bright(marked, cyan)) > 0 and bright(marked, cyan).min() > 0.75


def test_the_html_case_figure_stacks_a_strip() -> None:
    from hrad.reports.html import case_figure

    def size(shape: tuple[int, int]) -> tuple[int, int]:
        case = Case("x.png", 0, 0.1, np.zeros((*shape, 3), np.float32), np.random.default_rng(0).random(shape).astype(np.float32), None)
        with Image.open(io.BytesIO(base64.b64decode(case_figure(case, None, None)))) as figure:
            return figure.size

    strip_width, strip_height = size((40, 320))
    square_width, square_height = size((100, 100))
    assert strip_width > 750 and strip_height > strip_width / 4  # two full-width panels, one above the other
    assert square_width < 700 and square_height < square_width / 2  # two panels side by side


def _case(name: str, label: int, score: float) -> Case:
    return Case(name, label, score, np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), None)


def test_cases_show_each_image_once_and_say_what_the_threshold_decided(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 4 anomalous test images, 3 of them were shown twice in cases.png (worst and best), and
    each map was titled 'score 2.21 (label 1)': neither the threshold nor the decision."""
    from hrad.data import load_dataset
    from hrad.evaluation import evaluate
    from hrad.reports import figures

    groups = figures.select_cases([_case(f"d{index}", 1, 2.0 + index) for index in range(4)] + [_case("g", 0, 0.5)], 3)
    names = [case.name for members in groups.values() for case in members]
    assert sorted(names) == ["d0", "d1", "d2", "d3", "g"] and [case.name for case in groups["best: highest-scored anomalous"]] == ["d3"]
    # a group that takes its whole class is not titled 'worst': the one normal image here is every normal one
    assert [name for name, members in groups.items() if members] == [
        "worst: lowest-scored anomalous", "every normal, highest score first", "best: highest-scored anomalous"
    ]
    small = figures.select_cases([_case("d", 1, 2.0)] + [_case(f"g{index}", 0, index) for index in range(4)], 3)
    assert [case.name for case in small["every anomalous, lowest score first"]] == ["d"]
    assert [case.name for case in small["worst: highest-scored normal"]] == ["g3", "g2", "g1"]
    assert figures.case_caption(_case("d", 1, 2.2123), 1.15) == "anomalous, score 2.212, above the threshold 1.15: flagged"
    assert figures.case_caption(_case("g", 0, 1.15), 1.15) == "normal, score 1.15, at or below the threshold 1.15: passed"
    assert figures.case_caption(_case("g", 0, 0.7), None) == "normal, score 0.7"

    rng = np.random.default_rng(4)
    root = tmp_path / "part"
    for index in range(2):
        write(root / "test" / "good" / f"{index}.png", textured_image(rng, 48, 64))
        image, mask = with_spot(textured_image(rng, 48, 64), 20, 30, 6)
        write(root / "test" / "spot" / f"{index}.png", image)
        write(root / "ground_truth" / "spot" / f"{index}_mask.png", np.repeat(mask[..., None], 3, axis=2).astype(np.float32))
    model = make_model({"name": "downsample", "image_size": 32}).fit([textured_image(rng, 48, 64) for _ in range(6)])
    drawn: dict[str, object] = {}
    monkeypatch.setattr("hrad.evaluation.case_grid", lambda cases, path, **options: drawn.update(options) or path)
    metrics = evaluate(model, load_dataset(root, training=False).test, tmp_path / "report")
    assert drawn["threshold"] == metrics["image_threshold"] == model.thresholds.image  # type: ignore[union-attr]
