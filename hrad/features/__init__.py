"""Feature extractors: every backbone name users can type is registered here."""

from hrad.features.base import (
    BACKBONES,
    BackboneConfig,
    Embedder,
    EmbeddingSpec,
    FeatureExtractor,
    build_backbone,
)
from hrad.features.dinov2 import build_dinov2_vitb14, build_dinov2_vitb14_reg, build_dinov2_vits14
from hrad.features.efficientnet import build_efficientnet_lite0, build_efficientnet_lite2
from hrad.features.resnet import build_resnet18, build_wide_resnet50
from hrad.features.tiny import build_tiny_cnn, build_tiny_vit

BACKBONES.register("tiny-cnn", build_tiny_cnn)
BACKBONES.register("tiny-vit", build_tiny_vit)
BACKBONES.register("efficientnet-lite0", build_efficientnet_lite0)
BACKBONES.register("efficientnet-lite2", build_efficientnet_lite2)
BACKBONES.register("dinov2-vits14", build_dinov2_vits14)
BACKBONES.register("dinov2-vitb14", build_dinov2_vitb14)
BACKBONES.register("dinov2-vitb14-reg", build_dinov2_vitb14_reg)
BACKBONES.register("wide-resnet50", build_wide_resnet50)
BACKBONES.register("resnet18", build_resnet18)

__all__ = ["BACKBONES", "BackboneConfig", "Embedder", "EmbeddingSpec", "FeatureExtractor", "build_backbone"]
