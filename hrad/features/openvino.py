"""OpenVINO's CPU kernels behind the :class:`FeatureExtractor` interface (``backbone.runtime: openvino``).

The frozen torch backbone is converted once per requested layer set and input size with
``openvino.convert_model`` (the batch left dynamic; shape-dependent padding and position
embeddings are traced for that size) and compiled for the CPU; ``extract`` then runs the
compiled graph on the host and hands back torch tensors with the same names, shapes and values
(float tolerance, ``tests/test_backbone_speed.py``). On a 2-core AVX2 CPU this ran EfficientNet-Lite0
about 2x faster than the tuned torch module (``benchmarks/results/roofline.md``); its fused
depthwise convolutions are what torch's oneDNN path lacks.

Converting takes seconds (5.3 s for Lite0 at 704 x 704, 3.3 s for ResNet-18 at 448 on 2 cores;
reading the saved graph back 0.1 s), paid by every ``hrad predict`` run and for every window
size, so the converted graph is kept in the cache folder (``$HRAD_CACHE_DIR`` or
``~/.cache/hrad``, ``openvino/``) under a key of everything that decides it: the backbone's
weights and buffers, its class, the layers, the input size and the hrad and OpenVINO versions.
A cache that cannot be written or read only costs the conversion.

``openvino`` is an optional dependency (``pip install hrad[openvino]``); asking for this runtime
without it is a one-line :class:`~hrad.errors.ConfigError`. CPU only: GPU runs keep torch.

Every extractor compiles through the process's one ``openvino.Core``
(:func:`hrad.openvino_core.openvino_core`: a Core per compile crashed the next signal handler).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hrad.errors import ConfigError
from hrad.features.base import FeatureExtractor
from hrad.features.weights import cache_dir
from hrad.openvino_core import openvino_core
from hrad.version import __version__

#: ``backbone.precision`` as OpenVINO's CPU inference precision. Stated always: left unset, the CPU
#: plugin computes an FP32 graph in bf16 on CPUs with AMX / AVX-512 BF16 (features up to 2e-2 off
#: torch's in tests/test_backbone_speed.py, which asks for 1e-4); a bf16 / f16 hint the CPU lacks
#: runs in f32
OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


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
        self._weights_digest: str | None = None

    @property
    def layer_strides(self) -> dict[str, int]:
        return self.inner.layer_strides

    @property
    def layer_channels(self) -> dict[str, int]:
        return self.inner.layer_channels

    def cache_path(self, layers: tuple[str, ...], size: tuple[int, int]) -> Path:
        """Where the converted graph for ``layers`` at input ``size`` is kept (``.xml`` + ``.bin``)."""
        import openvino as ov

        if self._weights_digest is None:  # once per extractor: the weights never change after loading
            digest = hashlib.sha256()
            for name, tensor in sorted(self.inner.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._weights_digest = digest.hexdigest()
        parts = [type(self.inner).__name__, *layers, *map(str, size), __version__, ov.__version__, self._weights_digest]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
        return cache_dir() / "openvino" / f"{type(self.inner).__name__.lower()}-{key}.xml"

    def _convert(self, layers: tuple[str, ...], example: Tensor) -> Any:
        """The OpenVINO model for ``layers`` at ``example``'s size: from the cache, else converted
        (and cached: written under a temporary name and renamed, so a reader never sees half)."""
        import openvino as ov

        path = self.cache_path(layers, (example.shape[-2], example.shape[-1]))
        if path.exists():
            try:
                return openvino_core().read_model(str(path))
            except Exception:  # noqa: BLE001 - a damaged cache entry is converted again
                pass
        module = _Layers(self.inner, layers).eval()
        with torch.no_grad():
            converted = ov.convert_model(module, example_input=example, input=[(-1, 3, *example.shape[-2:])])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as temporary:
                written = Path(temporary) / path.name
                ov.save_model(converted, str(written), compress_to_fp16=False)
                os.replace(written.with_suffix(".bin"), path.with_suffix(".bin"))
                os.replace(written, path)  # the .xml last: its presence means the pair is complete
        except OSError:
            pass  # a read-only or full cache folder only costs the next run the conversion
        return converted

    def _model(self, layers: tuple[str, ...], example: Tensor) -> Any:
        key = (*layers, *map(str, example.shape[-2:]))
        compiled = self._compiled.get(key)
        if compiled is None:
            threads = self.threads or torch.get_num_threads()
            config = {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": max(1, threads),
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[self.inner.precision],
            }
            compiled = openvino_core().compile_model(self._convert(layers, example), "CPU", config)
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
