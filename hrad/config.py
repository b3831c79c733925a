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
from hrad.detectors.base import DetectorConfig, detector_config
from hrad.errors import ConfigError
from hrad.features.base import BackboneConfig
from hrad.postprocess.smoothing import PostprocessConfig
from hrad.strategies.base import StrategyConfig, strategy_config


class ThresholdConfig(BaseModel):
    """Thresholds from held-out normal images: mean + ``sigmas`` x std (never test data)."""

    model_config = ConfigDict(extra="forbid")

    validation_fraction: float = Field(0.2, ge=0, lt=1)  # HiAD holds out 20%
    #: k of mean + k x std for the image and the pixel threshold (predict can override it)
    sigmas: float = 3.0


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
    #: seed of the validation split and torch
    seed: int = 0

    @field_validator("detector", mode="before")
    @classmethod
    def _typed_detector(cls, value: Any) -> DetectorConfig:
        return detector_config(_section(value, "detector"))

    @field_validator("strategy", mode="before")
    @classmethod
    def _typed_strategy(cls, value: Any) -> StrategyConfig:
        return strategy_config(_section(value, "strategy"))


def _section(value: Any, name: str) -> Any:
    """A detector/strategy section must be a mapping (``--set strategy=5`` is a mistake, not a crash)."""
    if isinstance(value, (dict, BaseModel)):
        return value
    raise ValueError(f"expected a mapping such as {{name: ...}}, got {type(value).__name__} {value!r}")


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Read a YAML/JSON config file (optional) and apply nested ``overrides`` on top."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping with backbone/detector/strategy sections")
        data = loaded
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            merged = dict(data.get(section) or {})
            if section in ("detector", "strategy") and "name" in values and merged.get("name") not in (None, values["name"]):
                merged = {}  # another detector/strategy: options of the old one do not apply
            merged.update(values)
            data[section] = merged
        else:
            data[section] = values
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        source = f"{path}: " if path else ""
        raise ConfigError(f"{source}invalid config at {where}: {first['msg']}") from None
