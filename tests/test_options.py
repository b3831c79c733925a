"""Discoverable options: every config field is listed with type, default and meaning; the schema validates configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import run
from pydantic import BaseModel, Field

from hrad.options import SECTIONS, config_class, field_docs, model_schema, option_rows, section_names


class _Documented(BaseModel):
    #: first line
    #: second line
    above: int = 1
    beside: str = "x"  # a trailing comment
    described: float = Field(0.5, description="from Field")
    bare: bool = False


def test_field_docs_read_descriptions_and_comments() -> None:
    assert field_docs(_Documented) == {
        "above": "first line second line",
        "beside": "a trailing comment",
        "described": "from Field",
        "bare": "",
    }
    rows = {row.name: row for row in option_rows(_Documented)}
    assert (rows["above"].type, rows["above"].default) == ("int", "1")
    assert rows["beside"].default == '"x"'


def test_every_registered_option_is_documented() -> None:
    missing = []
    for section in SECTIONS:
        for name in section_names(section) if section in ("detector", "strategy") else [None]:
            model = config_class(section, name)
            missing += [f"{model.__name__}.{row.name}" for row in option_rows(model) if not row.doc]
    assert not missing, f"undocumented config fields: {missing}"


def test_options_command_lists_fields(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["options", "detector", "patchcore"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "detector.coreset_ratio: float = 0.1" in out
    assert "share of the (sampled) fit patches kept by the greedy coreset" in out
    assert run(["options", "strategy"], monkeypatch) == 0
    out = capsys.readouterr().out
    for name in section_names("strategy"):
        assert f"strategy {name}:" in out
    assert "strategy.tile_edge" in out or "strategy.tile:" in out
    assert run(["options"], monkeypatch) == 0
    assert "backbone: " in capsys.readouterr().out


def test_options_unknown_name_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["options", "detector", "nope"], monkeypatch) == 2
    assert "unknown detector 'nope'; known:" in capsys.readouterr().err
    assert run(["options", "nope"], monkeypatch) == 2
    assert "unknown options section 'nope'" in capsys.readouterr().err


def test_schema_validates_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    path = tmp_path / "schema.json"
    assert run(["schema", "--out", str(path)], monkeypatch) == 0
    schema = json.loads(path.read_text())
    assert schema == json.loads(json.dumps(model_schema()))
    validator = jsonschema.Draft202012Validator(schema)
    good = yaml.safe_load(
        "backbone: {name: dinov2-vits14}\n"
        "detector: {name: patchcore, coreset_ratio: 0.05}\n"
        "strategy: {name: tiled, tile: 518, stride: 518}\n"
        "postprocess: {sigma: 4}\n"
    )
    assert list(validator.iter_errors(good)) == []
    for bad in (
        {**good, "detector": {"name": "patchcore", "coreset": 0.05}},  # a typo
        {**good, "strategy": {"name": "tiled", "tile": "big"}},
        {**good, "detector": {"name": "no-such-detector"}},
    ):
        assert list(validator.iter_errors(bad)), bad
    described = schema["$defs"]["detector:patchcore"]["properties"]["coreset_ratio"]["description"]
    assert described.startswith("share of the (sampled) fit patches")
