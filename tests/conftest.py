"""Shared fixtures: a tiny, exact test detector and small synthetic images.

``GaussianTestDetector`` (registered as ``test-gaussian`` for the session) scores each
embedding vector by its standardised distance to the mean of all fitted vectors: simple
enough to reason about, real enough to find a bright spot.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from hrad.detectors.base import DETECTORS, Detector, DetectorConfig, DetectorOutput, register_detector
from hrad.features.base import EmbeddingSpec, FeatureExtractor

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAPSULES = SHARED / "data" / "visa" / "capsules"


class GaussianTestConfig(DetectorConfig):
    name: str = "test-gaussian"


class GaussianTestDetector(Detector[GaussianTestConfig]):
    @classmethod
    def default_embedding(cls, extractor: FeatureExtractor) -> EmbeddingSpec:
        names = list(extractor.layer_strides)
        return EmbeddingSpec(layers=(names[1],) if len(names) > 1 else (names[0],))

    def fit(self, batches: Iterable[Tensor]) -> None:
        total, squares, count = 0.0, 0.0, 0
        for batch in batches:
            vectors = batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1]).double()
            total = total + vectors.sum(0)
            squares = squares + (vectors**2).sum(0)
            count += len(vectors)
        self.mean = (total / count).float()
        self.std = ((squares / count - (total / count) ** 2).clamp_min(1e-12).sqrt()).float()

    def predict(self, embeddings: Tensor) -> DetectorOutput:
        z = (embeddings - self.mean[None, :, None, None]) / (self.std[None, :, None, None] + 1e-6)
        maps = z.pow(2).mean(1).sqrt()
        return DetectorOutput(maps=maps, scores=maps.flatten(1).max(1).values)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean, self.std = state["mean"], state["std"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run where CUDA is present and are skipped (with the reason) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def test_detector() -> Iterator[str]:
    if "test-gaussian" not in DETECTORS:
        register_detector("test-gaussian", GaussianTestConfig, GaussianTestDetector)
    yield "test-gaussian"


def textured_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random texture in [0, 1], H x W x 3 float32."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = 0.5 + 0.2 * np.sin(xx / 7.0 + rng.uniform(0, 6)) * np.cos(yy / 9.0 + rng.uniform(0, 6))
    noise = rng.normal(0, 0.02, (height, width))
    gray = np.clip(base + noise, 0, 1)
    return np.repeat(gray[..., None], 3, axis=2).astype(np.float32)


def with_spot(image: np.ndarray, y: int, x: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    out = image.copy()
    out[y : y + size, x : x + size] = [1.0, 0.0, 0.0]
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y : y + size, x : x + size] = True
    return out, mask


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: extra threads only hand work back and forth and contend with other
    processes on a shared 2-core machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def serve_logging_undone() -> Iterator[None]:
    """Each test leaves logging as ``hrad serve`` found it: run in-process, serve configures logging
    through uvicorn (``server_log_config``: its handler on the root logger, levels of uvicorn's and
    the service's loggers, ``warnings.showwarning``), and the root handler then printed the progress
    records of every later test (test_progress failed after test_service; alphabetical order hid it).
    Only what that config sets is undone: pytest's own capture handlers come and go by phase."""
    from hrad.cli.progress import ServerLines, server_log_config

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in server_log_config()["loggers"])]
    saved = [(logger, logger.level, logger.propagate) for logger in loggers]
    showwarning = warnings.showwarning
    yield
    warnings.showwarning = showwarning
    for logger, level, propagate in saved:
        for handler in [handler for handler in logger.handlers if isinstance(handler, ServerLines)]:
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def rng() -> np.random.Generator:
    torch.manual_seed(0)
    return np.random.default_rng(0)


@pytest.fixture
def openvino_compile_configs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The config of each ``openvino.Core.compile_model`` call the test makes, in order (the call
    itself goes through): what hrad asks for, whatever this CPU would pick by itself."""
    openvino = pytest.importorskip("openvino")
    configs: list[dict[str, Any]] = []
    compile_model = openvino.Core.compile_model

    def recording(core: Any, model: Any, device_name: str | None = None, config: dict[str, Any] | None = None, **options: Any) -> Any:
        configs.append(dict(config or {}))
        return compile_model(core, model, device_name, config, **options)

    monkeypatch.setattr(openvino.Core, "compile_model", recording)
    return configs


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Python's fault handler again before each test: Ray's driver (tests/test_distributed.py runs
    one in-process) replaces the SIGSEGV handler and leaves none after ray.shutdown(), so a crash
    in a later test ended the run with status 139 and no traceback."""
    import faulthandler
    import sys

    faulthandler.enable(file=sys.__stderr__, all_threads=True)
