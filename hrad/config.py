"""The one typed configuration of a model: backbone, detector, strategy, post-processing.

YAML/JSON files and CLI flags both end up here. Detector and strategy sections are validated
into the config class registered for their ``name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

import hrad.detectors  # noqa: F401  (fills the detector registry)
import hrad.strategies  # noqa: F401  (fills the strategy registry)
from hrad.detectors.base import DETECTORS, DetectorConfig, detector_config
from hrad.errors import ConfigError
from hrad.features import BACKBONES
from hrad.features.base import BackboneConfig
from hrad.postprocess.smoothing import PostprocessConfig
from hrad.registry import close_matches
from hrad.seeds import Seed
from hrad.strategies.base import STRATEGIES, StrategyConfig, strategy_config


class ThresholdConfig(BaseModel):
    """Thresholds from held-out normal images: mean + ``sigmas`` x std (never test data)."""

    #: inf and NaN refused: no setting means them, and hrad.json (strict JSON) cannot hold them
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    validation_fraction: float = Field(0.2, ge=0, lt=1)  # HiAD holds out 20%
    #: k of mean + k x std for the image and the pixel threshold (predict can override it)
    sigmas: float = Field(3.0, ge=0, allow_inf_nan=False)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: frozen feature extractor
    backbone: BackboneConfig = BackboneConfig()
    #: low-resolution anomaly model; options depend on its name
    detector: SerializeAsAny[DetectorConfig] = Field(default_factory=lambda: detector_config({"name": "patchcore"}))
    #: how a high-resolution image is covered; options depend on its name
    strategy: SerializeAsAny[StrategyConfig] = Field(default_factory=lambda: strategy_config({"name": "downsample"}))
    #: full-resolution smoothing and image-score rule
    postprocess: PostprocessConfig = PostprocessConfig()
    #: thresholds from held-out normal images
    threshold: ThresholdConfig = ThresholdConfig()
    #: significant bits of 16-bit images (10/12/14-bit camera data, low bits aligned): they are
    #: scaled to the full 16-bit range first (hrad.data.bit_depth); auto = the smallest camera
    #: depth holding every 16-bit training pixel, 16 = as stored; 8-bit and float images as they are
    bit_depth: Literal["auto"] | Annotated[int, Field(ge=9, le=16)] = "auto"
    #: "auto" = CUDA when available, else CPU
    device: str = "auto"
    #: seed of the validation split and torch (torch takes 64 bits; a larger one was a traceback)
    seed: Seed = 0

    @field_validator("detector", mode="before")
    @classmethod
    def _typed_detector(cls, value: Any) -> DetectorConfig:
        return detector_config(_section(value, "detector"))

    @field_validator("strategy", mode="before")
    @classmethod
    def _typed_strategy(cls, value: Any) -> StrategyConfig:
        return strategy_config(_section(value, "strategy"))


#: the sections with one config class (detector and strategy have one per registered name)
_PLAIN_SECTIONS: dict[str, type[BaseModel]] = {"backbone": BackboneConfig, "postprocess": PostprocessConfig, "threshold": ThresholdConfig}
#: every section of a config file
_SECTIONS = ("detector", "strategy", *_PLAIN_SECTIONS)


def _section(value: Any, name: str) -> Any:
    """A detector/strategy section must be a mapping (``--set strategy=5`` is a mistake, not a crash)."""
    if isinstance(value, (dict, BaseModel)):
        return value
    raise ValueError(f"expected a mapping such as {{name: ...}}, got {type(value).__name__} {value!r}")


def yaml_problem(error: yaml.YAMLError, where: bool = True) -> str:
    """PyYAML's error in one line, as ``at line L, column C (problem)`` (without ``where``:
    ``(problem)``). Its message's first line was often only the context ("while parsing a flow
    node"), naming neither the problem nor where it is."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if not problem:
        return f"({' '.join(str(error).split())})"
    return f"at line {mark.line + 1}, column {mark.column + 1} ({problem})" if where and mark is not None else f"({problem})"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Read a YAML/JSON config file (optional; an empty or comments-only one, or a section with
    nothing under it, leaves those settings at their defaults) and apply nested ``overrides`` on top."""
    data: dict[str, Any] = {}
    if path is not None:
        if path.is_dir():
            raise ConfigError(f"{path}: a folder, not a config file (give the YAML or JSON file)")
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
        except UnicodeDecodeError as error:  # a binary file or another encoding: it was a traceback
            raise ConfigError(f"{path}: not a YAML or JSON text file (byte {error.start} is not UTF-8)") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML {yaml_problem(error)}") from None
        if loaded is None:  # an empty or comments-only file: every setting at its default
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping with backbone/detector/strategy sections")
        # a section whose lines are all commented out ('strategy:' alone) is None to YAML: its defaults
        data = {key: value for key, value in loaded.items() if not (value is None and key in _SECTIONS)}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            merged = dict(data.get(section) or {})
            if section in ("detector", "strategy") and "name" in values and merged.get("name") not in (None, values["name"]):
                merged = {}  # another detector/strategy: options of the old one do not apply
            merged.update(values)
            data[section] = merged
        else:
            data[section] = values
    _check_names(data, path, overrides or {})
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        source = f"{path}: " if path else ""
        hint = _unknown_option_hint(tuple(str(part) for part in first["loc"]), data) if first["type"] == "extra_forbidden" else ""
        raise ConfigError(f"{source}invalid config at {first_problem(error)}{hint}") from None


def first_problem(error: ValidationError) -> str:
    """``section.field: message`` of a config's first validation error (pydantic's own first line,
    '1 validation error for ModelConfig', names neither)."""
    first = error.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"


def _check_names(data: dict[str, Any], path: Path | None, overrides: dict[str, Any]) -> None:
    """Refuse an unknown backbone, detector or strategy name, naming the config file when the name
    came from it: 'strategy: {name: tilled}' read 'unknown strategy 'tilled'; known: ...' without
    the file, and an unknown backbone was found only when the model was built, after the fit began."""
    for section, registry in (("backbone", BACKBONES), ("detector", DETECTORS), ("strategy", STRATEGIES)):
        values = data.get(section)
        if not isinstance(values, dict) or values.get("name") is None:
            continue
        try:
            registry.get(str(values["name"]))
        except ConfigError as error:
            given = overrides.get(section)
            from_file = path is not None and not (isinstance(given, dict) and "name" in given)
            raise ConfigError(f"{path}: {error}" if from_file else str(error)) from None


def _unknown_option_hint(location: tuple[str, ...], data: dict[str, Any]) -> str:
    """What an unknown option should have been: 'strategy.strid' is 'Extra inputs are not
    permitted' to pydantic, and ``--set strategy.tile=64`` with the default strategy (downsample,
    which has no tile) read the same, with no word of which strategy was meant or what it takes."""
    *sections, field = location
    if not sections:
        known, where = list(ModelConfig.model_fields), f"a model config has no section or field {field!r}"
        listing = f"its sections and fields: {', '.join(known)}"
    elif len(sections) == 1 and sections[0] in ("detector", "strategy"):
        section = sections[0]
        given = data.get(section)
        named = isinstance(given, dict) and bool(given.get("name"))  # else the default: the option may be another's
        name = str(given.get("name") if named and isinstance(given, dict) else getattr(ModelConfig(), section).name)
        registry = DETECTORS if section == "detector" else STRATEGIES
        known, where = list(registry.get(name).config_type.model_fields), f"{section} {name!r} has no option {field!r}"
        listing = f"hrad options {section} {name} lists its options"
    elif len(sections) == 1 and sections[0] in _PLAIN_SECTIONS:
        known, where = list(_PLAIN_SECTIONS[sections[0]].model_fields), f"{sections[0]} has no option {field!r}"
        listing = f"hrad options {sections[0]} lists them"
    else:
        return ""
    close = close_matches(field, known)
    if close:
        return f" ({where}: did you mean {close[0]}? {listing})"
    if len(sections) == 1 and sections[0] in ("detector", "strategy") and not named:
        others = _options_elsewhere(field, sections[0], name)
        if others:
            return f" ({where}; {others})"
    return f" ({where}; {listing})"


def _options_elsewhere(field: str, section: str, name: str) -> str:
    """Which other detectors or strategies than the default ``name`` take ``field`` (or a close
    spelling of it): ``--set strategy.tile=64`` without ``--strategy`` is checked against the
    default strategy, which has no tile, and the line named neither the strategies that have one
    nor how to pick one. Not asked where the config names its own: that choice stands."""
    registry = DETECTORS if section == "detector" else STRATEGIES
    holders: dict[str, list[str]] = {}
    for other in registry.names():
        if other != name:
            for option in close_matches(field, list(registry.get(other).config_type.model_fields)):
                holders.setdefault(option, []).append(other)
    if not holders:
        return ""
    option = field if field in holders else min(holders)
    meant = "" if option == field else f"did you mean {option}? "
    return f"{meant}{option} is an option of {', '.join(holders[option])}: choose one with --{section} or {section}.name"
