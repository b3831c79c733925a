"""``AnomalyModel``: the object users fit, save, load and predict with.

It owns the backbone, the strategy (which owns the detectors), the full-resolution
post-processing and the thresholds learned from held-out normal images.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrad.artifact import open_weights, read_manifest, write_artifact
from hrad.config import ModelConfig
from hrad.errors import ArtifactError, InputError
from hrad.features import build_backbone
from hrad.postprocess.smoothing import gaussian_smooth, image_score
from hrad.strategies.base import ImageSource, ProgressCallback, Strategy, build_strategy, no_progress


@dataclass
class Prediction:
    """Full-resolution map, image score and the decisions from the validation thresholds."""

    anomaly_map: np.ndarray
    score: float
    image_threshold: float | None
    pixel_threshold: float | None

    @property
    def is_anomalous(self) -> bool | None:
        return None if self.image_threshold is None else self.score > self.image_threshold

    @property
    def mask(self) -> np.ndarray | None:
        return None if self.pixel_threshold is None else self.anomaly_map > self.pixel_threshold


@dataclass
class Thresholds:
    """Mean + k std of held-out normal image scores and pixel values."""

    image: float
    pixel: float
    image_scores: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "pixel": self.pixel, "validation_image_scores": self.image_scores}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Thresholds:
        return cls(image=data["image"], pixel=data["pixel"], image_scores=list(data.get("validation_image_scores", [])))


class ArrayImages:
    """An :class:`ImageSource` over in-memory arrays (for the Python API)."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self._images = list(images)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> np.ndarray:
        return as_image(self._images[index])


class Subset:
    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.source[self.indices[index]]


def as_image(image: np.ndarray | str | Path) -> np.ndarray:
    """Accept a path, or an array (uint8/uint16/float, gray or RGB), as float32 H x W x 3 in [0, 1]."""
    if isinstance(image, (str, Path)):
        from hrad.data.images import read_image

        return read_image(Path(image))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(f"image array of shape {array.shape} is not H x W, H x W x 1, x 3 or x 4")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[..., :3]
    if array.dtype == np.uint8:
        return (array / 255.0).astype(np.float32)
    if array.dtype == np.uint16:
        return (array / 65535.0).astype(np.float32)
    return array.astype(np.float32)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class AnomalyModel:
    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.device = resolve_device(self.config.device)
        self.extractor = build_backbone(self.config.backbone).to(self.device)
        self.strategy: Strategy = build_strategy(self.config.strategy, self.config.detector, self.extractor)
        self.thresholds: Thresholds | None = None
        self.fitted_size: tuple[int, int] | None = None

    # -- training -------------------------------------------------------------------------------
    def fit(
        self,
        images: ImageSource | Sequence[np.ndarray],
        validation: ImageSource | Sequence[np.ndarray] | None = None,
        progress: ProgressCallback = no_progress,
    ) -> AnomalyModel:
        """Fit on good images; thresholds come from ``validation`` or a held-out fraction of them."""
        source: ImageSource = ArrayImages(images) if isinstance(images, (list, tuple)) else images  # type: ignore[arg-type]
        if len(source) == 0:
            raise InputError("no normal training images")
        torch.manual_seed(self.config.seed)
        if validation is None:
            train, validation_source = self._split(source)
        else:
            train = source
            validation_source = ArrayImages(validation) if isinstance(validation, (list, tuple)) else validation  # type: ignore[arg-type]
        first = train[0]
        self.fitted_size = (int(first.shape[0]), int(first.shape[1]))
        self.strategy.fit(train, progress)
        if validation_source is not None and len(validation_source) > 0:
            self.strategy.calibrate(validation_source, progress)
            self.thresholds = self._thresholds(validation_source, progress)
        return self

    def _split(self, source: ImageSource) -> tuple[ImageSource, ImageSource | None]:
        fraction = self.config.threshold.validation_fraction
        count = int(round(len(source) * fraction))
        if fraction == 0 or count == 0 or len(source) - count < 1:
            return source, None
        order = list(range(len(source)))
        random.Random(self.config.seed).shuffle(order)
        return Subset(source, sorted(order[count:])), Subset(source, sorted(order[:count]))

    def _thresholds(self, images: ImageSource, progress: ProgressCallback) -> Thresholds:
        scores: list[float] = []
        pixel_sum = pixel_sq = pixel_count = 0.0
        for index in range(len(images)):
            anomaly_map, score = self._predict_raw(images[index])
            scores.append(score)
            values = anomaly_map.astype(np.float64)
            pixel_sum += values.sum()
            pixel_sq += np.square(values).sum()
            pixel_count += values.size
            progress(index + 1, len(images), "thresholds from held-out normal images")
        k = self.config.threshold.sigmas
        mean = pixel_sum / pixel_count
        std = max(pixel_sq / pixel_count - mean**2, 0.0) ** 0.5
        return Thresholds(
            image=float(np.mean(scores) + k * np.std(scores)), pixel=float(mean + k * std), image_scores=scores
        )

    # -- inference --------------------------------------------------------------------------------
    def _predict_raw(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        with torch.inference_mode():
            result = self.strategy.predict(image)
        smoothed = gaussian_smooth(result.anomaly_map, self.config.postprocess.sigma)
        return smoothed, image_score(smoothed, result.score, self.config.postprocess)

    def predict(self, image: np.ndarray | str | Path) -> Prediction:
        """Anomaly map at the image's own resolution and its score; independent of other images."""
        array = as_image(image)
        anomaly_map, score = self._predict_raw(array)
        thresholds = self.thresholds
        return Prediction(
            anomaly_map=anomaly_map,
            score=score,
            image_threshold=thresholds.image if thresholds else None,
            pixel_threshold=thresholds.pixel if thresholds else None,
        )

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        manifest = {
            "config": self.config.model_dump(mode="json"),
            "fitted_size": self.fitted_size,
            "backbone_weights": self.extractor.weights_source,
            "thresholds": self.thresholds.to_json() if self.thresholds else None,
        }
        write_artifact(Path(path), manifest, self.strategy.save_state_to)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> AnomalyModel:
        path = Path(path)
        manifest = read_manifest(path)
        try:
            config = ModelConfig.model_validate(manifest["config"])
        except Exception as error:
            raise ArtifactError(f"{path}: model config does not validate ({str(error).splitlines()[0]})") from None
        if device is not None:
            config = config.model_copy(update={"device": device})
        model = cls(config)
        saved_source = manifest.get("backbone_weights")
        if saved_source and saved_source != model.extractor.weights_source:
            warnings.warn(
                f"{path}: fitted with backbone weights from {saved_source}, now loaded from "
                f"{model.extractor.weights_source}; features may differ (pass --weights to pin them)",
                stacklevel=2,
            )
        model.strategy.load_state(open_weights(path))
        size = manifest.get("fitted_size")
        model.fitted_size = tuple(size) if size else None  # type: ignore[assignment]
        thresholds = manifest.get("thresholds")
        model.thresholds = Thresholds.from_json(thresholds) if thresholds else None
        return model


def load(path: str | Path, device: str | None = None) -> AnomalyModel:
    """Load a model artifact written by ``hrad fit`` or :meth:`AnomalyModel.save`."""
    return AnomalyModel.load(path, device=device)
