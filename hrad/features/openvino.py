"""OpenVINO's CPU kernels behind the :class:`FeatureExtractor` interface (``backbone.runtime: openvino``).

The frozen torch backbone is converted once per requested layer set and input size with
``openvino.convert_model`` (the batch left dynamic; shape-dependent padding and position
embeddings are traced for that size) and compiled for the CPU; ``extract`` then runs the
compiled graph on the host and hands back torch tensors with the same names, shapes and values
(float tolerance, ``tests/test_backbone_speed.py``). On a 2-core AVX2 CPU this ran EfficientNet-Lite0
about 2x faster than the tuned torch module (``benchmarks/results/roofline.md``); its fused
depthwise convolutions are what torch's oneDNN path lacks.

``openvino`` is an optional dependency (``pip install hrad[openvino]``); asking for this runtime
without it is a one-line :class:`~hrad.errors.ConfigError`. CPU only: GPU runs keep torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hrad.errors import ConfigError
from hrad.features.base import FeatureExtractor


class _Layers(nn.Module):
    """``extract`` as a module with a fixed layer tuple, for tracing."""

    def __init__(self, extractor: FeatureExtractor, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.extractor = extractor
        self.layers = layers

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        maps = self.extractor.extract(images, self.layers)
        return tuple(maps[name] for name in self.layers)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVINOExtractor(FeatureExtractor):
    """A torch extractor whose ``extract`` runs through OpenVINO on the CPU."""

    def __init__(self, inner: FeatureExtractor, threads: int | None = None) -> None:
        super().__init__()
        if not openvino_available():
            raise ConfigError("backbone.runtime 'openvino' needs the openvino package: pip install openvino")
        self.inner = inner
        self.input_multiple = inner.input_multiple
        self.weights_source = inner.weights_source
        self.default_context = getattr(inner, "default_context", 0)
        self.threads = threads
        self._compiled: dict[tuple[str, ...], Any] = {}

    @property
    def layer_strides(self) -> dict[str, int]:
        return self.inner.layer_strides

    @property
    def layer_channels(self) -> dict[str, int]:
        return self.inner.layer_channels

    def _model(self, layers: tuple[str, ...], example: Tensor) -> Any:
        key = (*layers, *map(str, example.shape[-2:]))
        compiled = self._compiled.get(key)
        if compiled is None:
            import openvino as ov

            module = _Layers(self.inner, layers).eval()
            with torch.no_grad():
                converted = ov.convert_model(module, example_input=example, input=[(-1, 3, *example.shape[-2:])])
            threads = self.threads or torch.get_num_threads()
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": max(1, threads)}
            compiled = ov.Core().compile_model(converted, "CPU", config)
            self._compiled[key] = compiled
        return compiled

    def extract(self, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        if images.device.type != "cpu":
            raise ConfigError("backbone.runtime 'openvino' runs on the CPU; use runtime 'torch' on a GPU")
        key = tuple(layers)
        compiled = self._model(key, images)
        request = compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(images.detach().float().numpy())})
        return {name: torch.from_numpy(request.get_output_tensor(i).data.copy()) for i, name in enumerate(key)}
