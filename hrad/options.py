"""Every configuration option, discoverable: ``hrad options`` and ``hrad schema``.

Options are the fields of the Pydantic config models (:mod:`hrad.config` and the config class
registered for each detector and strategy). A field's documentation is its
``Field(description=...)`` when it has one, else the ``#:`` comment lines right above it in
the class body, else a ``# ...`` comment at the end of its line. :func:`option_rows` lists them
with type and default; :func:`model_schema` is the JSON schema of a whole model config, in
which ``detector`` and ``strategy`` are one of the registered configs (selected by ``name``)
and every property carries its documentation as ``description``.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import textwrap
import tokenize
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hrad.config import ModelConfig, ThresholdConfig
from hrad.detectors import DETECTORS
from hrad.errors import ConfigError
from hrad.features import BACKBONES, BackboneConfig
from hrad.postprocess.smoothing import PostprocessConfig
from hrad.strategies import STRATEGIES

#: sections users can ask about; detector and strategy have one config class per registered name
SECTIONS = ("detector", "strategy", "backbone", "postprocess", "threshold", "model")


@dataclass(frozen=True)
class Option:
    """One config field: its name, type, default (as YAML would write it) and documentation."""

    name: str
    type: str
    default: str
    doc: str


@cache
def _class_comments(cls: type) -> dict[str, str]:
    """``#:`` comments above, or ``#`` comments beside, the annotated fields of ``cls``'s body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            if lines[row - 1][:column].strip():  # code before it on the line
                trailing[row] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        row = node.lineno - 1  # 1-based line above the field
        while row >= 1 and lines[row - 1].strip().startswith("#:"):
            above.insert(0, lines[row - 1].strip()[2:].strip())
            row -= 1
        text = " ".join(above) or trailing.get(node.lineno, "") or trailing.get(node.end_lineno or node.lineno, "")
        if text:
            docs[node.target.id] = text
    return docs


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """The documentation of every field of ``model`` (empty string where there is none)."""
    docs: dict[str, str] = {}
    for name, info in model.model_fields.items():
        if info.description:
            docs[name] = info.description
            continue
        for owner in model.__mro__:
            if isinstance(owner, type) and issubclass(owner, BaseModel) and name in owner.__dict__.get("__annotations__", {}):
                text = _class_comments(owner).get(name)
                if text:
                    docs[name] = text
                    break
        docs.setdefault(name, "")
    return docs


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    for prefix in ("typing.", "pathlib.", "hrad.", "NoneType"):
        text = text.replace(prefix, "None" if prefix == "NoneType" else "")
    return text


def _default_text(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "{...}"
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def option_rows(model: type[BaseModel]) -> list[Option]:
    """Every field of ``model`` in declaration order (``name`` first where it selects the class)."""
    docs = field_docs(model)
    rows = []
    for name, info in model.model_fields.items():
        if info.default is not PydanticUndefined:
            default = _default_text(info.default)
        elif info.default_factory is not None:
            default = _default_text(info.default_factory())  # type: ignore[call-arg]
        else:
            default = "(required)"
        rows.append(Option(name, _type_name(info.annotation), default, docs[name]))
    return rows


def config_class(section: str, name: str | None = None) -> type[BaseModel]:
    """The config class of one section (``detector``/``strategy`` need the registered ``name``)."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown options section {section!r}; choose one of {', '.join(SECTIONS)}")
    if section == "detector":
        return DETECTORS.get(name or "patchcore").config_type
    if section == "strategy":
        return STRATEGIES.get(name or "downsample").config_type
    if section == "backbone":
        if name is not None:
            BACKBONES.get(name)  # an unknown name is an error; every backbone shares one config
        return BackboneConfig
    sections: dict[str, type[BaseModel]] = {"postprocess": PostprocessConfig, "threshold": ThresholdConfig, "model": ModelConfig}
    return sections[section]


def section_names(section: str) -> list[str]:
    """Registered names of a section (empty for sections with one config class)."""
    return {"detector": DETECTORS.names(), "strategy": STRATEGIES.names(), "backbone": BACKBONES.names()}.get(section, [])


def _describe(schema: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s schema with every property described by :func:`field_docs`."""
    docs = field_docs(model)
    for name, prop in schema.get("properties", {}).items():
        if docs.get(name) and "description" not in prop:
            prop["description"] = docs[name]
    return schema


def model_schema() -> dict[str, Any]:
    """JSON schema (draft 2020-12) of a whole model config file.

    ``detector`` and ``strategy`` are ``oneOf`` the registered configs, each selected by its
    ``name`` constant; every property has its documentation as ``description``.
    """
    nested: dict[str, type[BaseModel]] = {"backbone": BackboneConfig, "postprocess": PostprocessConfig, "threshold": ThresholdConfig}
    schema = _describe(ModelConfig.model_json_schema(ref_template="#/$defs/{model}"), ModelConfig)
    definitions: dict[str, Any] = schema.setdefault("$defs", {})
    for key, model in nested.items():
        definitions[model.__name__] = _describe(model.model_json_schema(), model)
        schema["properties"][key] = {"$ref": f"#/$defs/{model.__name__}", "description": (model.__doc__ or "").strip()}
    for key, registry in (("detector", DETECTORS), ("strategy", STRATEGIES)):
        choices = []
        for name in registry.names():
            model = registry.get(name).config_type
            sub = _describe(model.model_json_schema(ref_template="#/$defs/{model}"), model)
            definitions.update(sub.pop("$defs", {}))
            sub["properties"]["name"] = {"const": name, "description": f"selects the {key} {name!r}"}
            sub["required"] = sorted({*sub.get("required", []), "name"})
            definitions[f"{key}:{name}"] = sub
            choices.append({"$ref": f"#/$defs/{key}:{name}"})
        schema["properties"][key] = {"oneOf": choices, "description": f"one registered {key}, chosen by name"}
    for name in [n for n in definitions if n in ("DetectorConfig", "StrategyConfig")]:
        del definitions[name]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hrad model config"
    return schema


__all__ = ["SECTIONS", "Option", "config_class", "field_docs", "model_schema", "option_rows", "section_names"]
