"""hrad's JSON files and JSON stdout are strict JSON: an undefined metric (a one-class test set's
image AUROC) is ``null``, never a bare ``NaN`` that JavaScript's ``JSON.parse`` and jq refuse; and
what reads them back (``hrad compare``) takes the ``null``."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import run, write
from conftest import textured_image
from export_helpers import make_model

import hrad
from hrad.comparison import UNDEFINED_NOTE, read_evaluation
from hrad.config import load_config
from hrad.errors import ArtifactError, ConfigError
from hrad.strict_json import dumps, strict

#: "nan" as a word, any case: what an undefined metric printed by Python looks like
NAN_WORD = re.compile(r"\bnan\b", re.IGNORECASE)


def _refuse(constant: str) -> Any:
    raise ValueError(f"not JSON: {constant}")


def strict_loads(text: str) -> Any:
    """``json.loads`` as a strict reader: ``NaN``, ``Infinity`` and ``-Infinity`` refused."""
    return json.loads(text, parse_constant=_refuse)


def test_non_finite_numbers_become_null_at_any_depth() -> None:
    value = {
        "nan": math.nan, "inf": math.inf, "low": -math.inf, "one": 1.5, "count": np.int64(3), "flag": True, "text": "nan",
        "nested": [np.float32("nan"), (np.float64(0.25), None), {"deep": [math.inf, 2]}],
    }  # fmt: skip
    assert strict(value) == {
        "nan": None, "inf": None, "low": None, "one": 1.5, "count": 3, "flag": True, "text": "nan",
        "nested": [None, [0.25, None], {"deep": [None, 2]}],
    }  # fmt: skip
    assert type(strict(np.int64(3))) is int and type(strict(np.float32(0.5))) is float and strict(True) is True
    assert strict_loads(dumps(value, indent=1)) == strict(value)
    assert dumps({"when": Path("a")}, default=str) == '{"when": "a"}'  # json.dumps's options pass through


@pytest.fixture(scope="module")
def one_class(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved tiny model and a test set of good images only (image AUROC, AP, pixel metrics undefined)."""
    root = tmp_path_factory.mktemp("one_class")
    rng = np.random.default_rng(0)
    train = [textured_image(rng, 96, 128) for _ in range(6)]
    model = make_model({"name": "downsample", "image_size": 64}, "test-gaussian").fit(train)
    for index in range(3):
        write(root / "data" / "test" / "good" / f"{index:03d}.png", textured_image(rng, 96, 128))
    return model.save(root / "model"), root / "data"


def test_a_one_class_evaluation_and_its_comparison_are_strict_json(
    one_class: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = one_class
    for name in ("a", "b"):
        assert run(["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / name)], monkeypatch) == 0
        printed = strict_loads(capsys.readouterr().out)  # evaluate's metrics on stdout
    metrics = strict_loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["image_auroc"] is None and metrics["pixel_auroc"] is None and printed["image_auroc"] is None
    assert printed["images"] == metrics["images"] == 3
    report = (tmp_path / "a" / "metrics.md").read_text()
    assert UNDEFINED_NOTE in report and "| image_auroc | n/a |" in report and not NAN_WORD.search(report)
    assert UNDEFINED_NOTE in (tmp_path / "a" / "report.html").read_text()
    assert math.isnan(read_evaluation(tmp_path / "a").metrics["image_auroc"] or math.nan)

    assert run(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")], monkeypatch) == 0
    out = capsys.readouterr().out
    comparison = strict_loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [model["image_auroc_shared"] for model in comparison["models"]] == [None, None]
    assert [model["image_auroc"] for model in comparison["models"]] == [None, None]
    assert comparison["differences"][0]["image_auroc_difference"] is None and comparison["shared_images"] == 3
    assert "n/a (one class)" in out and "all of one class" in out and UNDEFINED_NOTE in out and not NAN_WORD.search(out)


def test_a_report_written_with_bare_nan_still_compares(
    one_class: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reports written before hrad wrote null hold a bare NaN: still read, shown as n/a."""
    model, data = one_class
    assert run(["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "new")], monkeypatch) == 0
    old = tmp_path / "old"
    old.mkdir()
    (old / "scores.csv").write_bytes((tmp_path / "new" / "scores.csv").read_bytes())
    (old / "metrics.json").write_text('{"image_auroc": NaN, "aupro_30": NaN, "images": 3}')
    capsys.readouterr()
    assert run(["compare", str(old), str(tmp_path / "new"), "--out", str(tmp_path / "cmp")], monkeypatch) == 0
    assert "| old | 3 | n/a (one class) |  | n/a |" in capsys.readouterr().out
    assert strict_loads((tmp_path / "cmp" / "comparison.json").read_text())["models"][0]["aupro_30"] is None


def test_ad2_evaluate_and_info_print_and_write_strict_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """MVTec AD 2's test_public with good images only: its image AUROC and pixel metrics are
    null in the file and on stdout; ``hrad info --json`` is strict JSON too."""
    rng = np.random.default_rng(1)
    root = tmp_path / "mvtec_ad_2" / "walnuts"
    train = [textured_image(rng, 84, 112) for _ in range(8)]
    for index, image in enumerate(train):
        write(root / "train" / "good" / f"{index:03d}_regular.png", image)
    write(root / "validation" / "good" / "000_regular.png", textured_image(rng, 84, 112))
    write(root / "test_public" / "good" / "000_regular.png", textured_image(rng, 84, 112))
    model = make_model({"name": "downsample", "image_size": 64}, "test-gaussian").fit(train).save(tmp_path / "model")
    assert run(["ad2-evaluate", "--model", str(model), "--data", str(root), "--out", str(tmp_path / "m")], monkeypatch) == 0
    printed = strict_loads(capsys.readouterr().out)
    assert printed == strict_loads((tmp_path / "m" / "metrics.json").read_text())
    assert printed["image_auroc"] is None and printed["aupro_05"] is None and printed["images"] == 1
    # --out holds one run (hrad.reports.folder): an earlier metrics.json of ad2-evaluate is replaced, another folder refused
    assert run(["ad2-evaluate", "--model", str(model), "--data", str(root), "--out", str(tmp_path / "m")], monkeypatch) == 0
    assert [entry.name for entry in (tmp_path / "m").iterdir()] == ["metrics.json"]
    (tmp_path / "m" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert run(["ad2-evaluate", "--model", str(model), "--data", str(root), "--out", str(tmp_path / "m")], monkeypatch) == 2
    assert "not empty and not a report of hrad ad2-evaluate (it holds notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    assert run(["info", str(model), "--json"], monkeypatch) == 0
    assert strict_loads(capsys.readouterr().out)["detector"] == "test-gaussian"


def test_a_model_with_a_diverged_epoch_writes_strict_json_and_loads(
    one_class: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NaN training loss (a diverged epoch) is null in hrad.json, not a bare NaN that strict
    readers refuse, and NaN again in the loaded model; ``hrad info`` reads it."""
    model = hrad.load(one_class[0])
    model.training_history = {"detector": [0.5, math.nan]}
    saved = model.save(tmp_path / "model")
    assert strict_loads((saved / "hrad.json").read_text())["training_history"] == {"detector": [0.5, None]}
    losses = hrad.load(saved).training_history["detector"]
    assert losses[0] == 0.5 and math.isnan(losses[1])
    assert run(["info", str(saved), "--json"], monkeypatch) == 0
    assert strict_loads(capsys.readouterr().out)["training"]["detector"]["losses"] == [0.5, None]


def test_an_older_model_with_infinity_in_its_config_names_the_field(one_class: tuple[Path, Path], tmp_path: Path) -> None:
    """hrad.json written before it was strict JSON may hold a bare Infinity in its config: loading
    it names the field, not pydantic's '1 validation error for ModelConfig'."""
    model = Path(shutil.copytree(one_class[0], tmp_path / "model"))
    manifest = json.loads((model / "hrad.json").read_text())
    manifest["config"]["postprocess"]["sigma"] = math.inf
    (model / "hrad.json").write_text(json.dumps(manifest))  # as old hrad wrote it: "sigma": Infinity
    with pytest.raises(ArtifactError, match=r"model config does not validate \(postprocess\.sigma: Input should be a finite number\)$"):
        hrad.load(model)


@pytest.mark.parametrize(
    ("section", "value"),
    [("strategy", {"name": "mrf", "max_bank_gib": math.inf}), ("detector", {"name": "varad", "lr": math.nan}), ("postprocess", {"sigma": math.inf})],
)
def test_a_config_number_that_strict_json_cannot_hold_is_refused(section: str, value: dict[str, Any]) -> None:
    """inf or NaN in any section is refused when the config is read: hrad.json would hold it as
    null, which the model's config refuses (or reads as another setting) when it is loaded."""
    field = next(name for name in value if name != "name")
    with pytest.raises(ConfigError, match=rf"^invalid config at {section}\.{field}: Input should be a finite number$"):
        load_config(None, {section: value})


def test_fit_with_an_infinite_setting_stops_before_the_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--set strategy.max_bank_gib=inf`` fitted a model whose hrad.json held a bare Infinity; now
    one line and exit 2, before the fit ('null' is the setting for no limit)."""
    rng = np.random.default_rng(2)
    for index in range(3):
        write(tmp_path / "data" / f"{index}.png", textured_image(rng, 64, 64))
    args = ["fit", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out" / "model"), "--strategy", "mrf", "--set", "strategy.max_bank_gib=inf"]
    assert run(args, monkeypatch) == 2
    assert capsys.readouterr().err == "hrad: error: invalid config at strategy.max_bank_gib: Input should be a finite number\n"
    assert not (tmp_path / "out").exists()
