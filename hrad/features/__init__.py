"""Feature extractors: every backbone name users can type is registered here."""

from hrad.features.base import BACKBONES, BackboneConfig, Embedder, EmbeddingSpec, FeatureExtractor, build_backbone
from hrad.features.tiny import build_tiny_cnn, build_tiny_vit

BACKBONES.register("tiny-cnn", build_tiny_cnn)
BACKBONES.register("tiny-vit", build_tiny_vit)

__all__ = ["BACKBONES", "BackboneConfig", "Embedder", "EmbeddingSpec", "FeatureExtractor", "build_backbone"]
