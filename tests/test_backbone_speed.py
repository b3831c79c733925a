"""Backbone speed settings keep the features: channels-last, in-place activations, autocast, OpenVINO."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from hrad.errors import ConfigError
from hrad.features import BackboneConfig, Embedder, EmbeddingSpec, build_backbone
from hrad.features.efficientnet import EfficientNetLite
from hrad.features.openvino import OpenVINOExtractor, openvino_available

pytestmark = pytest.mark.usefixtures("one_thread")


def random_lite0() -> EfficientNetLite:
    torch.manual_seed(0)
    model = EfficientNetLite("efficientnet-lite0").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.fuse_batchnorm()
    return model


@pytest.mark.parametrize("size", [(64, 96), (75, 101)])  # odd sides: asymmetric SAME padding
def test_channels_last_lite_equals_nchw(size: tuple[int, int]) -> None:
    model = random_lite0()
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    layers = ["layer1", "layer2", "layer3"]
    with torch.inference_mode():
        plain = model.use_channels_last(False).extract(images, layers)
        fast = model.use_channels_last(True).extract(images, layers)
    assert model.channels_last and model._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    for name in layers:
        assert fast[name].shape == plain[name].shape
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-4 * float(plain[name].abs().max()))


def test_built_lite_backbone_is_channels_last() -> None:
    extractor = build_backbone(BackboneConfig(name="efficientnet-lite0"))
    assert isinstance(extractor, EfficientNetLite) and extractor.channels_last


def test_embedder_autocast_returns_float32_close_to_float32() -> None:
    extractor = build_backbone(BackboneConfig(name="tiny-cnn"))
    spec = EmbeddingSpec(layers=("layer2", "layer3"), aggregation=3)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    reference = Embedder(extractor, spec)(images)
    extractor.precision = "bfloat16"
    low = Embedder(extractor, spec)(images)
    assert low.dtype == torch.float32 and low.shape == reference.shape
    assert not torch.equal(low, reference)  # autocast really ran in bf16
    torch.testing.assert_close(low, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))


def test_backbone_config_precision_reaches_extractor() -> None:
    assert build_backbone(BackboneConfig(name="tiny-cnn", precision="bfloat16")).precision == "bfloat16"
    with pytest.raises(ValueError):
        BackboneConfig(name="tiny-cnn", precision="int8")  # type: ignore[arg-type]


needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino not installed")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Converted OpenVINO graphs go to a folder of this test, never the user's cache."""
    monkeypatch.setenv("HRAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_openvino
@pytest.mark.parametrize("name", ["tiny-cnn", "tiny-vit"])
def test_openvino_runtime_equals_torch(name: str) -> None:
    extractor = build_backbone(BackboneConfig(name=name, runtime="openvino"))
    assert isinstance(extractor, OpenVINOExtractor)
    inner = extractor.inner
    layers = list(inner.layer_strides)[1:3]
    side = 56 if inner.is_vit else 64
    rng = torch.Generator().manual_seed(3)
    for batch in (2, 3):  # the batch is dynamic; new pixels must give new features
        images = torch.rand(batch, 3, side, side, generator=rng)
        with torch.inference_mode():
            expected = inner.extract(images, layers)
        got = extractor.extract(images, layers)
        for layer in layers:
            np.testing.assert_allclose(got[layer].numpy(), expected[layer].numpy(), rtol=1e-4, atol=1e-4)
    assert len(extractor._compiled) == 1  # one conversion per layer set and input size


@needs_openvino
def test_openvino_graph_is_converted_once_and_read_back_from_the_cache(own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import openvino as ov

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    first = build_backbone(BackboneConfig(name="tiny-cnn", runtime="openvino"))
    assert isinstance(first, OpenVINOExtractor)
    expected = first.extract(images, ["layer2"])["layer2"]
    path = first.cache_path(("layer2",), (64, 64))
    assert path.exists() and path.with_suffix(".bin").exists() and path.is_relative_to(own_cache)

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted although the cache holds the graph")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    second = build_backbone(BackboneConfig(name="tiny-cnn", runtime="openvino"))
    assert isinstance(second, OpenVINOExtractor)
    torch.testing.assert_close(second.extract(images, ["layer2"])["layer2"], expected, rtol=0, atol=0)
    # another input size or other weights are another graph
    assert second.cache_path(("layer2",), (64, 96)) != path
    with torch.no_grad():
        next(second.inner.parameters()).add_(1.0)
    other = OpenVINOExtractor(second.inner)
    assert other.cache_path(("layer2",), (64, 64)) != path
    # a damaged entry is converted again (the conversion is back) and rewritten
    monkeypatch.undo()
    monkeypatch.setenv("HRAD_CACHE_DIR", str(own_cache))
    path.write_text("not a graph")
    third = build_backbone(BackboneConfig(name="tiny-cnn", runtime="openvino"))
    assert isinstance(third, OpenVINOExtractor)
    torch.testing.assert_close(third.extract(images, ["layer2"])["layer2"], expected, rtol=1e-5, atol=1e-5)
    assert ov.Core().read_model(str(path)) is not None


@needs_openvino
@pytest.mark.parametrize(("precision", "hint"), [("float32", "f32"), ("bfloat16", "bf16")])
def test_openvino_runtime_computes_at_the_backbone_precision(precision: str, hint: str, openvino_compile_configs: list) -> None:
    """Stated, not left to OpenVINO: on CPUs with AMX / AVX-512 BF16 its CPU plugin computes a
    float32 graph in bf16 by itself, features up to 2e-2 off torch's (this test's float32 case and
    the equality tests above failed so on such a CPU)."""
    import openvino as ov

    extractor = build_backbone(BackboneConfig(name="tiny-cnn", runtime="openvino", precision=precision))
    assert isinstance(extractor, OpenVINOExtractor)
    extractor.extract(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6)), ["layer2"])
    assert [config.get("INFERENCE_PRECISION_HINT") for config in openvino_compile_configs] == [hint]
    if precision == "float32":  # what the CPU then runs (bf16 only where the CPU has it)
        (compiled,) = extractor._compiled.values()
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


@needs_openvino
@pytest.mark.slow
def test_openvino_lite0_equals_torch_on_odd_size() -> None:
    model = random_lite0().use_channels_last(True)
    extractor = OpenVINOExtractor(model)
    images = torch.rand(2, 3, 75, 101, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = model.extract(images, ["layer2", "layer3"])
    got = extractor.extract(images, ["layer2", "layer3"])
    for layer in ("layer2", "layer3"):
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-4, atol=1e-4 * float(expected[layer].abs().max()))


def test_openvino_runtime_without_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ConfigError, match="pip install openvino"):
        build_backbone(BackboneConfig(name="tiny-cnn", runtime="openvino"))


def test_embedder_feeds_a_lite_backbone_one_window_per_call_on_the_cpu() -> None:
    model = random_lite0()
    assert model.cpu_windows_per_call == 1
    embedder = Embedder(model, EmbeddingSpec(layers=("layer2", "layer3"), aggregation=3))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    batches: list[int] = []
    original = model.extract

    def counting(images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        batches.append(len(images))
        return original(images, layers)

    model.extract = counting  # type: ignore[method-assign]
    split = embedder(images)
    model.cpu_windows_per_call = None
    whole = embedder(images)
    assert batches == [1, 1, 1, 3]
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
