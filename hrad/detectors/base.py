"""The detector interface every high-resolution strategy uses.

A detector is a low-resolution anomaly model: it is fitted on embeddings of good images
(``N x C x h x w`` tensors from an :class:`~hrad.features.base.Embedder`) and scores new
embeddings with a map at feature resolution plus one score per input. It never knows whether
its inputs are whole images, tiles or HiAD patches: strategies own that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn

from hrad.data.anomalies import AnomalyRule
from hrad.errors import ConfigError, InputError
from hrad.features.base import EmbeddingSpec, FeatureExtractor, mid_depth_blocks
from hrad.registry import ConfiguredEntry, Registry, registered_config
from hrad.seeds import Seed


class DetectorConfig(BaseModel):
    """Base of every detector's typed config; ``name`` selects the registered detector."""

    #: inf and NaN refused: no setting means them, and hrad.json (strict JSON) cannot hold them
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: registered detector name; selects this config class
    name: str
    #: backbone layers to embed; empty = the detector's default for the backbone
    layers: tuple[str, ...] = ()
    #: seed of the detector's own randomness (sampling, initialisation, synthetic anomalies);
    #: torch's range (hrad.seeds), as the top-level seed
    seed: Seed = 0

    @model_validator(mode="before")
    @classmethod
    def _no_synthesis(cls, data: object) -> object:
        """One clear line for ``synthesis`` on a detector that trains on no synthetic anomalies."""
        if isinstance(data, dict) and "synthesis" in data and "synthesis" not in cls.model_fields:
            raise ConfigError(
                f"detector {data.get('name', cls.__name__)} has no synthesis option: it trains on no"
                " synthetic anomalies (destseg and realnet do)"
            )
        return data


def backbone_layers(
    extractor: FeatureExtractor, cnn: tuple[str, ...], vit: tuple[float, ...], cnn_aggregation: int = 1
) -> EmbeddingSpec:
    """A default embedding: the ``cnn`` layers of a CNN, or a ViT's blocks at the ``vit`` fractions
    of its depth (no aggregation: a token already pools its neighbourhood)."""
    if extractor.is_vit:
        return EmbeddingSpec(layers=mid_depth_blocks(extractor, vit), aggregation=1)
    return EmbeddingSpec(layers=cnn, aggregation=cnn_aggregation)


def require_vit(extractor: FeatureExtractor, name: str) -> None:
    """One-line ConfigError unless the backbone is a ViT (a token grid)."""
    if not extractor.is_vit:
        raise ConfigError(f"{name} needs a ViT backbone (a token grid); {type(extractor).__name__} is a CNN")


@dataclass
class DetectorOutput:
    """``maps``: ``B x h x w`` anomaly maps at embedding resolution; ``scores``: ``B`` image scores."""

    maps: Tensor
    scores: Tensor


ConfigT = TypeVar("ConfigT", bound=DetectorConfig)


class Detector(ABC, Generic[ConfigT]):
    """Fit on embeddings of normal data, score embeddings of new data, save and load state.

    ``fit`` receives a re-iterable of embedding batches (it may be iterated several times,
    e.g. for training epochs); each batch is ``n x C x h x w``. State is a flat dict of tensors
    so artifacts are plain safetensors.
    """

    #: whether ``fit`` iterates its batches more than once (strategies then cache embeddings
    #: instead of recomputing the backbone every epoch)
    multi_pass: ClassVar[bool] = False

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @classmethod
    @abstractmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        """Layers and aggregation this detector uses on ``extractor`` by default."""

    @classmethod
    def embedding_spec(cls, config: DetectorConfig, extractor: FeatureExtractor) -> EmbeddingSpec:
        default = cls.default_embedding(extractor)
        if config.layers:
            return EmbeddingSpec(layers=tuple(config.layers), aggregation=default.aggregation)
        return default

    @classmethod
    def image_anomalies(cls, config: DetectorConfig) -> AnomalyRule | None:
        """The rule of the image-space synthetic anomalies this config asks the strategy for, or
        None (the default). When asked, every training batch ``fit`` receives is
        :func:`pack_anomalies` of the clean embeddings, the embeddings of a corrupted copy of the
        same tiles and the exact mask fraction per token (:mod:`hrad.data.anomalies`); the
        detector still never sees images."""
        return None

    @classmethod
    def bind_layout(cls, config: ConfigT, layer_channels: tuple[int, ...]) -> ConfigT:
        """The config with the embedding's per-layer channel split filled in, for detectors that
        treat each backbone layer separately (multi-level reconstruction); strategies call it
        once after building their embedder. Default: the config unchanged."""
        return config

    @abstractmethod
    def fit(self, batches: Iterable[Tensor]) -> None:
        """Learn the normal distribution from embedding batches of good images."""

    @abstractmethod
    def predict(self, embeddings: Tensor) -> DetectorOutput:
        """Anomaly maps and scores for ``B x C x h x w`` embeddings."""

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Everything learned, as tensors (saved to safetensors)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def scoring_module(self) -> nn.Module | None:
        """Optional: the fitted scoring as a plain-torch module, for ONNX export (``hrad export``).

        It maps ``B x C x h x w`` embeddings to ``(maps B x h x w, scores B)``, equal to
        :meth:`predict`, using only ops the ONNX exporter traces (no faiss, no numpy, no
        data-dependent Python control flow). None (the default) = not exportable.
        """
        return None


def pack_anomalies(clean: Tensor, anomalous: Tensor, masks: Tensor) -> Tensor:
    """One training batch of a detector that asked for image-space anomalies: ``B x (2C + 1) x h x w``
    = the clean ``B x C x h x w`` embeddings, those of the corrupted tiles and the ``B x h x w``
    mask fractions, along channels (so every feature cache and spill carries it unchanged)."""
    return torch.cat([clean, anomalous.to(clean.dtype), masks[:, None].to(clean.dtype)], dim=1)


def unpack_anomalies(batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`pack_anomalies` undone: (clean, anomalous, masks)."""
    channels = (batch.shape[1] - 1) // 2
    if batch.ndim != 4 or batch.shape[1] != 2 * channels + 1:
        raise InputError(
            f"a training batch with image-space anomalies must be B x (2C + 1) x h x w, got shape {tuple(batch.shape)}"
        )
    return batch[:, :channels], batch[:, channels : 2 * channels], batch[:, -1]


class PredictScoring(nn.Module):
    """A detector whose :meth:`~Detector.predict` is plain torch on fixed-shape inputs (neural
    detectors: flows, decoders, students) as an exportable module: tracing records exactly the
    ops ``predict`` runs. The detector's networks are registered so their weights travel along."""

    def __init__(self, detector: Detector, networks: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.networks = networks

    def forward(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        output = self.detector.predict(embeddings)
        return output.maps, output.scores


#: each detector's config class and implementation, by name
DETECTORS: Registry[ConfiguredEntry[DetectorConfig, type[Detector]]] = Registry("detector")


def register_detector(name: str, config_type: type[DetectorConfig], detector_type: type[Detector]) -> None:
    DETECTORS.register(name, ConfiguredEntry(config_type=config_type, build=detector_type))


def detector_config(data: dict | DetectorConfig) -> DetectorConfig:
    """Validate ``data`` into the typed config of the detector it names (default PatchCore)."""
    if isinstance(data, DetectorConfig):
        return data
    return registered_config(DETECTORS, data, "patchcore")


def build_detector(config: DetectorConfig) -> Detector:
    return DETECTORS.get(config.name).build(config)


def detector_class(name: str) -> type[Detector]:
    return DETECTORS.get(name).build
