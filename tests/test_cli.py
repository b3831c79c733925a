"""The command line as a user runs it: fit, predict, evaluate, and one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image, with_spot

#: a seconds-long fit: tiny backbone, Gaussian test detector, images downsampled to 64
TINY_DOWNSAMPLE = ["--backbone", "tiny-cnn", "--detector", "test-gaussian", "--strategy", "downsample", "--image-size", "64"]
REQUIRED_METRICS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro_30", "aupro_05", "seconds_per_image", "peak_rss_mb"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec") / "part"
    rng = np.random.default_rng(0)
    for index in range(6):
        write(root / "train" / "good" / f"{index:03d}.png", textured_image(rng, 96, 128))
    for index in range(3):
        write(root / "test" / "good" / f"{index:03d}.png", textured_image(rng, 96, 128))
        image, mask = with_spot(textured_image(rng, 96, 128), 20 + 10 * index, 40 + 15 * index, 10)
        write(root / "test" / "spot" / f"{index:03d}.png", image)
        (root / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "ground_truth" / "spot" / f"{index:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root


def test_fit_predict_evaluate(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    code = run(["fit", "--data", str(dataset), "--out", str(model), "--backbone", "tiny-cnn", "--detector", "test-gaussian",
                "--strategy", "tiled", "--tile", "64", "--stride", "32"], monkeypatch)
    assert code == 0 and (model / "hrad.json").is_file()
    # stderr is not a terminal here (as in `hrad fit ... 2> fit.log`): progress comes as plain lines, not bars
    err = capsys.readouterr().err
    assert "embedding training images: 1/5, " in err and "embedding training images: 5/5, " in err
    assert "thresholds from held-out normal images: 1/1, " in err and "\u2501" not in err  # no bar characters
    assert f"on 6 images of {dataset}\n" in err  # whole lines in a log file, not broken at 80 columns
    out = tmp_path / "pred"
    assert run(["predict", "--model", str(model), str(dataset / "test" / "spot"), "--out", str(out)], monkeypatch) == 0
    assert (out / "000_map.png").is_file() and (out / "000_overlay.png").is_file()
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0] == "path,score,is_anomalous,threshold,status,error,map,regions" and len(lines) == 4
    # the spot is a defect region: box, area and peak over the pixel threshold; its count in scores.csv
    regions = json.loads((out / "000_regions.json").read_text())
    first = next(row for row in csv.DictReader(lines) if row["path"].endswith("000.png"))
    assert int(first["regions"]) == regions["count"] >= 1 and regions["regions"][0]["peak"] > regions["pixel_threshold"]
    assert cv2.imread(str(out / "000_map.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    report = tmp_path / "report"
    assert run(["evaluate", "--model", str(model), "--data", str(dataset), "--out", str(report)], monkeypatch) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    for key in REQUIRED_METRICS:
        assert key in metrics
    assert metrics["image_auroc"] > 0.8 and metrics["pixel_auroc"] > 0.8
    assert (report / "metrics.md").is_file() and (report / "cases.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--data", "/no/such/folder", "--out", "m"], "/no/such/folder"),
        (["predict", "--model", "/no/model", "x.png", "--out", "o"], "x.png: file not found"),
        # an input that may be an image or a folder: a missing folder is not 'file not found'
        (["predict", "--model", "/no/model", "goood", "--out", "o"], "goood: folder not found"),
        (["predict", "--model", "/no/model", "parts.v2", "--out", "o"], "parts.v2: file or folder not found"),
        (["calibrate", "--model", "/no/model", "new_good", "--out", "o"], "new_good: folder not found"),
        (["evaluate", "--model", "/no/model", "--data", "/no/data", "--out", "o"], "/no/data"),
        (["schema", "--out", "/no/such/folder/schema.json"], "/no/such/folder/schema.json: cannot write the schema (No such file or directory)"),
        (["evaluate", "--model", "m", "--data", "d", "--out", "o", "--limit", "-1"], "--limit"),  # [:-1] dropped the last image
    ],
)
def test_user_mistakes_are_one_line(args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(args, monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_messages_print_paths_and_hints_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # brackets in a path are text, not rich markup: "[/x]" once raised MarkupError (a traceback)
    # and "[bold]" vanished from the message
    for name in ("[/x]gone.png", "[bold]gone.png"):
        assert run(["predict", "--model", str(tmp_path / "m"), str(tmp_path / name), "--out", str(tmp_path / "o")], monkeypatch) == 2
        err = capsys.readouterr().err
        assert f"hrad: error: {tmp_path / name}: file not found" in err and "Traceback" not in err
    assert run(["fit", "--help"], monkeypatch) == 0
    assert "'hrad[track]'" in capsys.readouterr().out  # was printed as 'hrad'


def test_help_reflows_docstring_paragraphs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # a docstring's source line breaks are not the terminal's: kept, they broke each paragraph
    # into ragged lines ("... is skipped with" / "one warning line ...")
    monkeypatch.setenv("COLUMNS", "200")
    assert run(["evaluate", "--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert any("is skipped with one warning line naming the file" in line for line in out.splitlines())


def test_list_writes_to_stdout(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["list"], monkeypatch) == 0  # `hrad list | grep ...` and `hrad list > file` see it (it went to stderr)
    out = capsys.readouterr().out
    assert "detectors:" in out and "patchcore" in out and "strategies:" in out and "[NAME]" in out


def test_sigterm_during_fit_cleans_up_like_ctrl_c(tmp_path: Path) -> None:
    folder = tmp_path / "good"
    rng = np.random.default_rng(0)
    for index in range(3):
        write(folder / f"{index}.png", textured_image(rng, 84, 112))
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "model"
    # FastFlow with every frozen feature spilled to disk, and epochs enough to be stopped in the middle
    settings = ["detector.epochs=100000", "detector.flow_steps=2", "detector.layers=[layer2]", "strategy.feature_cache_mb=0",
                f"strategy.work_dir={work}", "threshold.validation_fraction=0"]
    args = ["fit", "--data", str(folder), "--out", str(out), "--backbone", "tiny-cnn", "--detector", "fastflow", "--strategy", "tiled",
            "--tile", "56", "--device", "cpu", *[part for setting in settings for part in ("--set", setting)]]
    process = subprocess.Popen([sys.executable, "-c", "from hrad.cli.main import main; main()", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(work.glob("hrad-cache-*/chunk*.npy")):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no feature chunk was spilled"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == 143, err  # 128 + SIGTERM, after the clean-up (it died at once before, leaving the spill)
    assert err.splitlines()[-1] == "terminated" and "Traceback" not in err
    assert list(work.iterdir()) == [] and not out.exists() and not list(tmp_path.glob(".model*"))


def test_fit_without_held_out_images_warns_that_there_are_no_thresholds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "good"
    rng = np.random.default_rng(1)
    for index in range(2):  # 20% of 2 rounds to none held out
        write(folder / f"{index}.png", textured_image(rng, 64, 64))
    model = tmp_path / "m"
    args = ["fit", "--data", str(folder), "--out", str(model), "--backbone", "tiny-cnn", "--detector", "test-gaussian"]
    assert run(args, monkeypatch) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hrad: warning:")]
    assert len(warnings) == 1 and "no held-out normal images (2 training images" in warnings[0] and "no thresholds" in warnings[0]
    assert json.loads((model / "hrad.json").read_text())["thresholds"] is None


def test_predict_with_missing_model_names_it(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    image = dataset / "test" / "good" / "000.png"
    assert run(["predict", "--model", str(tmp_path / "missing"), str(image), "--out", str(tmp_path / "o")], monkeypatch) == 2
    assert "missing: model not found" in capsys.readouterr().err


def test_predict_refuses_to_write_into_an_input_folder(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    shutil.copytree(dataset / "test" / "good", folder)
    before = sorted(folder.iterdir())
    for out in (folder, tmp_path / "images" / "."):  # the same folder, however it is spelt
        assert run(["predict", "--model", str(tmp_path / "missing"), str(folder), "--out", str(out)], monkeypatch) == 2
        err = capsys.readouterr().err
        assert "output folder is also an input folder" in err and "Traceback" not in err
    assert sorted(folder.iterdir()) == before  # nothing written among the inputs


def test_corrupt_image_in_training_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "good"
    write(folder / "a.png", textured_image(np.random.default_rng(0), 64, 64))
    (folder / "b.png").write_bytes(b"not a png at all")
    code = run(["fit", "--data", str(folder), "--out", str(tmp_path / "m"), "--backbone", "tiny-cnn", "--detector", "test-gaussian"], monkeypatch)
    assert code == 2
    assert "b.png" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_evaluate_skips_test_images_with_an_empty_or_misfitting_mask(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "part"
    shutil.copytree(dataset, data)
    empty = data / "ground_truth" / "spot" / "000_mask.png"
    empty.write_bytes(b"")
    small = data / "ground_truth" / "spot" / "001_mask.png"
    cv2.imwrite(str(small), np.zeros((60, 80), dtype=np.uint8))  # its image is 128x96
    model = tmp_path / "model"
    assert run(["fit", "--data", str(data), "--out", str(model), *TINY_DOWNSAMPLE], monkeypatch) == 0  # reads no test masks
    capsys.readouterr()
    assert run(["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "report")], monkeypatch) == 3
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "hrad: warning:" in line]
    assert "Traceback" not in err and len(warnings) == 2
    assert any(line.endswith(f"skipped {data / 'test' / 'spot' / '000.png'}: mask {empty}: empty file") for line in warnings)
    assert any(f"{small}: mask is 80x60 but its image" in line and "is 128x96" in line for line in warnings)
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["images_skipped"] == 2


def test_evaluate_skips_corrupt_test_images_and_exits_3(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "part"
    shutil.copytree(dataset, data)
    truncated = data / "test" / "spot" / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:200])  # valid header, pixel data cut off
    garbage = data / "test" / "good" / "002.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    strip = data / "test" / "good" / "003.png"  # decodes; refused by the model's size check, which sees only the array
    write(strip, textured_image(np.random.default_rng(5), 8, 128))
    model = tmp_path / "model"
    assert run(["fit", "--data", str(data), "--out", str(model), *TINY_DOWNSAMPLE], monkeypatch) == 0
    capsys.readouterr()
    report = tmp_path / "report"
    assert run(["evaluate", "--model", str(model), "--data", str(data), "--out", str(report)], monkeypatch) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "hrad: warning:" in line]
    assert len(warnings) == 3  # one line per bad file, naming it and the problem
    assert any(f"{truncated}: truncated or corrupt image (the file ends at byte 200, inside its IDAT chunk" in line for line in warnings)
    assert any(str(garbage) in line and "not a readable image" in line for line in warnings)
    assert any(f"skipped {strip}: image is 128x8, its short side is under 1/8" in line for line in warnings)
    assert "3 of 7 test images skipped" in err
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["images_skipped"] == 3
    assert sorted(entry["image"] for entry in metrics["skipped"]) == sorted([str(garbage), str(strip), str(truncated)])
    assert all(entry["error"].startswith(entry["image"] + ": ") for entry in metrics["skipped"])
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1  # from the 4 readable images
    assert len((report / "scores.csv").read_text().splitlines()) == 1 + 4
    markdown = (report / "metrics.md").read_text()
    assert "## Skipped images" in markdown and str(truncated) in markdown and str(garbage) in markdown
    assert "3 test images were skipped" in (report / "report.html").read_text()

    # every test image unreadable: nothing to measure, a one-line error and status 2
    for path in (data / "test").rglob("*.png"):
        path.write_bytes(b"broken")
    assert run(["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "none")], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "no test image could be evaluated (7 given, 7 skipped" in err and "Traceback" not in err


def test_set_assignments_reach_the_config() -> None:
    from hrad.cli.main import merge_assignments
    from hrad.errors import ConfigError

    merged = merge_assignments({"strategy": {"name": "tiled"}}, ["strategy.tile=128", "postprocess.sigma=0", "detector.name=test-gaussian"])
    assert merged == {"strategy": {"name": "tiled", "tile": 128}, "postprocess": {"sigma": 0}, "detector": {"name": "test-gaussian"}}
    with pytest.raises(ConfigError, match="expected section.field=value"):
        merge_assignments({}, ["tile"])


def test_python_dash_m_hrad_is_the_hrad_command() -> None:
    """``python -m hrad`` for machines without the console script on PATH: same commands, same
    one-line errors and exit status."""
    listed = subprocess.run([sys.executable, "-m", "hrad", "list"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "patchcore" in listed.stdout
    wrong = subprocess.run([sys.executable, "-m", "hrad", "predict", "--bogus"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr and "--bogus" in wrong.stderr


def test_evaluate_needs_only_a_labelled_test_set_and_prints_its_metrics_to_stdout(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model fitted elsewhere and only MVTec's test/ and ground_truth/: hrad evaluate refused
    it ('<data>/train/good: no normal images (folder not found)'). And the metrics summary is the
    command's result, on stdout (`hrad evaluate ... > metrics.txt` kept nothing: it went to
    stderr with the messages); 'report written to' stays a message."""
    model = tmp_path / "model"
    assert run(["fit", "--data", str(dataset), "--out", str(model), *TINY_DOWNSAMPLE], monkeypatch) == 0
    test_only = tmp_path / "test_only"
    shutil.copytree(dataset / "test", test_only / "test")
    shutil.copytree(dataset / "ground_truth", test_only / "ground_truth")
    capsys.readouterr()
    report = tmp_path / "report"
    assert run(["evaluate", "--model", str(model), "--data", str(test_only), "--out", str(report)], monkeypatch) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    saved = json.loads((report / "metrics.json").read_text())
    assert printed["images"] == 6 and all(printed[key] == saved[key] for key in REQUIRED_METRICS)
    assert "image_auroc" not in captured.err and f"report written to {report}" in captured.err
    # and how the model did, in words, as messages: a log file (stderr, --log-file) never sees stdout
    lines = captured.err.splitlines()
    # after the last image, the curves and the report are a stage of their own: a log is not left at 'evaluating: 6/6'
    stages = [line.rsplit(",", 1)[0] for line in lines if line.startswith(("evaluating: ", "metrics and report: "))]
    assert stages == ["evaluating: 1/6", "evaluating: 6/6", "metrics and report: 0/2", "metrics and report: 2/2"]
    headline = f"image AUROC {printed['image_auroc']:.3f}, pixel AUROC {printed['pixel_auroc']:.3f}, AUPRO@30 {printed['aupro_30']:.3f} over 6 test images"
    assert headline in lines and any(line.startswith(f"Image threshold {printed['image_threshold']:.6g} (the model's") for line in lines)
    # a test set of good images only: the n/a metrics are said to be undefined there, and why
    shutil.rmtree(test_only / "test" / "spot")
    shutil.rmtree(test_only / "ground_truth")
    assert run(["evaluate", "--model", str(model), "--data", str(test_only), "--out", str(tmp_path / "good_only")], monkeypatch) == 0
    lines = capsys.readouterr().err.splitlines()
    assert "image AUROC n/a, pixel AUROC n/a, AUPRO@30 n/a over 3 test images" in lines
    assert any(line.endswith("no defective test images.") for line in lines) and any(line.startswith("n/a: undefined on this test set") for line in lines)
    # without the test part: one line naming what is missing
    (tmp_path / "train_only").mkdir()
    shutil.copytree(dataset / "train", tmp_path / "train_only" / "train")
    assert run(["evaluate", "--model", str(model), "--data", str(tmp_path / "train_only"), "--out", str(tmp_path / "r2")], monkeypatch) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"hrad: error: {tmp_path / 'train_only' / 'test'}: folder not found (expected one subfolder per defect type)"
    assert captured.out == ""
