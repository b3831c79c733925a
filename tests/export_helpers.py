"""Models and images the export tests share (ONNX, OpenVINO, tiled ensemble, torch-free runtime)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch.nn.functional as F
from conftest import textured_image, with_spot
from torch import Tensor

from hrad.config import load_config
from hrad.export_runtime import SPINNING_KEY, onnxruntime_module
from hrad.features.efficientnet import SameConv2d, same_pads
from hrad.features.tiny import TinyCNN
from hrad.model import AnomalyModel

PATCHCORE: dict[str, Any] = {"name": "patchcore", "coreset_ratio": 0.25}


def make_model(strategy: dict[str, Any], detector: str | dict[str, Any] = PATCHCORE, backbone: str = "tiny-cnn") -> AnomalyModel:
    """An unfitted CPU model of ``backbone`` / ``detector`` (a name or its options) / ``strategy``."""
    detector_options = {"name": detector} if isinstance(detector, str) else detector
    overrides = {"backbone": {"name": backbone}, "detector": detector_options, "strategy": strategy, "device": "cpu"}
    return AnomalyModel(load_config(None, overrides))


def training_images(seed: int, count: int, height: int = 90, width: int = 130) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [textured_image(rng, height, width) for _ in range(count)]


def spotted_image(seed: int, height: int = 90, width: int = 130, y: int = 30, x: int = 70, size: int = 9) -> np.ndarray:
    """A textured image with a red square defect at ``(y, x)``."""
    return with_spot(textured_image(np.random.default_rng(seed), height, width), y, x, size)[0]


class TracedSizeSameConv2d(SameConv2d):
    """SAME padding whose traced graph holds the traced size's amounts as constants (as
    :class:`SameConv2d`'s strided convolutions did at odd sizes): a backbone whose graph is right
    only at sizes of the traced one's parity at every stage."""

    def forward(self, x: Tensor) -> Tensor:
        (top, bottom), (left, right) = same_pads([int(n) for n in x.shape[-2:]], self.kernel_size, self.stride, self.dilation)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def same_padding(extractor: TinyCNN, conv_type: type[SameConv2d] = SameConv2d) -> None:
    """Its convolutions with TensorFlow SAME padding (as EfficientNet-Lite's), same weights: traced,
    each is a ``Pad`` computed from the input's shape before the ``Conv`` (:class:`SameConv2d`;
    the export makes it the ``Conv``'s ``auto_pad=SAME_UPPER``)."""
    for stage in extractor.stages:
        conv = stage[0]
        same = conv_type(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)
        same.load_state_dict(conv.state_dict())
        stage[0] = same


def recorded_sessions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every onnxruntime ``InferenceSession`` created from now on in this test, in order."""
    onnxruntime = onnxruntime_module()
    created: list[Any] = []

    class Recorded(onnxruntime.InferenceSession):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Recorded)
    return created


def spinning(session: Any) -> str:
    """The session's ``allow_spinning`` entry ("0" / "1"); onnxruntime raises for a session built without it."""
    return str(session.get_session_options().get_session_config_entry(SPINNING_KEY))
