"""The strategy interface: how a high-resolution image is covered by detectors.

A strategy owns the geometry (downsampling, tiles, HiAD patches, multi-resolution banks) and
the detectors it needs; it turns full-resolution images into an anomaly map at the input's
own resolution plus an image score. It talks to detectors only through
:class:`~hrad.detectors.base.Detector`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from hrad.data.images import pixels_to_unit
from hrad.detectors.base import DetectorConfig, detector_class
from hrad.errors import ConfigError
from hrad.features.base import FeatureExtractor
from hrad.postprocess.device_maps import to_host
from hrad.postprocess.smoothing import MapScore
from hrad.progress import ProgressCallback, no_progress
from hrad.registry import ConfiguredEntry, Registry, registered_config


class StrategyConfig(BaseModel):
    """Base of every strategy's typed config; ``name`` selects the registered strategy."""

    #: inf and NaN refused: no setting means them, and hrad.json (strict JSON) cannot hold them
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: registered strategy name; selects this config class
    name: str
    #: images are processed this many at a time where the strategy batches (0 or less was a traceback)
    batch_size: int = Field(4, ge=1)


@dataclass
class AnomalyResult:
    """A full-resolution float32 ``H x W`` map and an image score (higher = more anomalous)."""

    anomaly_map: np.ndarray
    score: float
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeviceResult:
    """:class:`AnomalyResult` before its copy to the host (:meth:`Strategy.predict_on_device`): the
    ``H x W`` float32 map and the 0-d score as tensors on the strategy's device, so a caller that
    finishes the map there (the model: :func:`hrad.postprocess.device_maps.smooth_and_score`)
    copies it back once; ``extras`` may hold tensors too."""

    anomaly_map: Tensor
    score: Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def to_host(self) -> AnomalyResult:
        """The same result on the host, as :meth:`Strategy.predict` returns it (tensors in
        ``extras`` copied as numpy arrays); map and score in one copy."""
        extras = {key: value.cpu().numpy() if isinstance(value, Tensor) else value for key, value in self.extras.items()}
        return AnomalyResult(*to_host(self.anomaly_map, self.score), extras)


class StateReader(Protocol):
    """Read access to saved tensors; artifacts back it lazily by a safetensors file so a
    strategy can load one sub-model at a time."""

    def keys(self) -> list[str]: ...

    def get(self, key: str) -> Tensor: ...


class DictStateReader:
    """A :class:`StateReader` over an in-memory dict (tests, serial round trips)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def get(self, key: str) -> Tensor:
        return self._state[key]


def sub_state(reader: StateReader, prefix: str) -> dict[str, Tensor]:
    """All tensors under ``prefix.`` with the prefix removed (loads only those)."""
    start = prefix + "."
    return {key[len(start) :]: reader.get(key) for key in reader.keys() if key.startswith(start)}


class ImageSource(Protocol):
    """A sized, indexable collection of ``H x W x 3`` RGB images, loaded lazily: float32 in [0, 1]
    or in the file's pixel type (uint8, uint16), which strategies convert a tile window at a time.

    A source may also have ``name(index) -> str`` (a file's path: :class:`~hrad.data.images.ImageList`),
    which errors about one image use (:func:`image_name`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


def image_name(images: ImageSource | Sequence[np.ndarray], index: int, what: str = "image") -> str:
    """What an error about ``images[index]`` calls it: the source's own name (its file) when it
    has one, else ``"<what> <index>"``, so a user reads which file, not which position."""
    name = getattr(images, "name", None)
    return str(name(index)) if callable(name) else f"{what} {index}"


def to_tensor(image: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """``H x W x 3`` image in any pixel type (uint8 / 255, uint16 / 65535, float as it is) -> ``1 x 3 x
    H x W`` float32 tensor in [0, 1], converted whole (12 bytes a pixel: the tiling strategies cut
    float windows from a :class:`~hrad.strategies.pixels.PixelImage` instead)."""
    unit = pixels_to_unit(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None].to(device)


class Strategy(ABC):
    """Fit on full-resolution good images; predict full-resolution maps."""

    #: whether the strategy makes image-space synthetic anomalies for detectors that ask for them
    #: (:meth:`~hrad.detectors.base.Detector.image_anomalies`)
    synthesises_anomalies: ClassVar[bool] = False

    def __init__(self, config: StrategyConfig, detector: DetectorConfig, extractor: FeatureExtractor) -> None:
        if not self.synthesises_anomalies and detector_class(detector.name).image_anomalies(detector) is not None:
            raise ConfigError(
                f"the {config.name} strategy cannot make image-space anomalies for {detector.name}"
                " synthesis=image; use synthesis=feature"
            )
        self.config = config
        self.detector_config = detector
        self.extractor = extractor

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    @abstractmethod
    def fit(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:
        """Learn from good images (all of the same size for position-bound strategies)."""

    @property
    def map_score(self) -> MapScore | None:
        """How :meth:`predict`'s image score follows from its map, when it does (HiAD's pooled
        maximum): a border-calibrated map is then scored again rather than the score scaled
        (:func:`~hrad.postprocess.smoothing.smooth_and_score`). None: the score is the detector's own."""
        return None

    @property
    def needs_calibration(self) -> bool:
        """True when :meth:`predict` only works after :meth:`calibrate` (the model then refuses to
        fit without held-out good images, rather than save a model that cannot predict)."""
        return False

    def calibrate(self, images: ImageSource, progress: ProgressCallback = no_progress) -> None:  # noqa: B027
        """Optional: learn score scales from held-out good images (never test data).

        Called by the model after :meth:`fit` with the validation split. Strategies whose
        maps combine several detectors (tiled ensemble, HiAD) put them on one scale here.
        """

    @abstractmethod
    def predict(self, image: np.ndarray) -> AnomalyResult:
        """Map at the image's own resolution and its score. Never depends on other images."""

    @property
    def maps_on_device(self) -> bool:
        """Whether :meth:`predict_on_device` is this strategy's predict: its maps come off a device
        (HiAD's ``device_maps``, on by default where the device is not the CPU) and are better
        finished there than copied to the host first. False (the default): call :meth:`predict`."""
        return False

    def predict_on_device(self, image: np.ndarray) -> DeviceResult:
        """:meth:`predict` with the map and score left on the strategy's device (only where
        :attr:`maps_on_device`); ``.to_host()`` of it equals :meth:`predict`'s result."""
        raise NotImplementedError(f"the {self.config.name} strategy keeps no map on a device; call predict()")

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[AnomalyResult]:
        """:meth:`predict` for several images, in order, each result as if predicted alone.

        The default loops over :meth:`predict`; strategies that can share work across images
        (tiles of several images through the backbone in one batch, one kNN search for all
        of them) override it and must return the same results to float tolerance.
        """
        return [self.predict(image) for image in images]

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """All learned tensors, flat (keys may be prefixed per sub-model)."""

    def save_state_to(self, path: Path) -> None:
        """Write :meth:`state_dict` as a safetensors file; strategies with many sub-models
        override this to stream them one at a time."""
        from safetensors.torch import save_file

        state = self.state_dict() or {"_hrad.empty": torch.zeros(1)}
        save_file({key: value.detach().cpu().contiguous() for key, value in state.items()}, str(path))

    @abstractmethod
    def load_state(self, reader: StateReader) -> None:
        """Restore from saved tensors; may keep ``reader`` and load sub-models lazily."""

    def fitted_image_size(self) -> tuple[int, int] | None:
        """``(H, W)`` the strategy was fitted on when it is bound to one size, else None."""
        return None

    def input_scale(self, height: int, width: int) -> tuple[float, float]:
        """The factors (rows, columns) a ``height x width`` image is scaled by before its
        features. Images of one folder scaled unlike (a fixed working size, mixed image sizes)
        teach the detector features of several scales, which the fit warns of. Default: native
        resolution, ``(1, 1)`` for every size."""
        return 1.0, 1.0

    def resizing(self) -> str:
        """What scales an image by :meth:`input_scale`, as the warnings about sizes say it."""
        return f"the {self.config.name} strategy resizes every image to its working size"

    def check_input(self, image: np.ndarray) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Refuse, before any work, an image this fitted strategy cannot predict (another size
        than a size-bound strategy's); the model names the file. Default: every image is fine."""

    def training_history(self) -> dict[str, list[float]]:
        """Mean training loss per epoch of a trainable detector, by training stage (``{}`` for
        detectors that do not train). The default reads the strategy's one shared ``detector``;
        strategies that fit many detectors elsewhere (ensembles, pools) report none."""
        detector = getattr(self, "detector", None)
        stages = getattr(detector, "stage_losses", None)
        if isinstance(stages, dict) and any(stages.values()):
            return {str(name): [float(value) for value in values] for name, values in stages.items() if values}
        losses = getattr(detector, "loss_history", None)
        return {"loss": [float(value) for value in losses]} if losses else {}


#: each strategy's config class and implementation, by name
STRATEGIES: Registry[ConfiguredEntry[StrategyConfig, type[Strategy]]] = Registry("strategy")


def register_strategy(name: str, config_type: type[StrategyConfig], strategy_type: type[Strategy]) -> None:
    STRATEGIES.register(name, ConfiguredEntry(config_type=config_type, build=strategy_type))


def strategy_config(data: dict | StrategyConfig) -> StrategyConfig:
    """Validate ``data`` into the typed config of the strategy it names (default downsample)."""
    if isinstance(data, StrategyConfig):
        return data
    return registered_config(STRATEGIES, data, "downsample")


def build_strategy(config: StrategyConfig, detector: DetectorConfig, extractor: FeatureExtractor) -> Strategy:
    return STRATEGIES.get(config.name).build(config, detector, extractor)
