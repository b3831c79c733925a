"""A small explicit registry: names users type map to the objects that build things.

Registries are filled by explicit ``register`` calls in each package's ``__init__``; nothing
is discovered by introspection, so ``grep register(`` lists everything that exists.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from hrad.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

T = TypeVar("T")
C = TypeVar("C", bound="BaseModel")
B = TypeVar("B")


def close_matches(word: str, candidates: Sequence[str], count: int = 1) -> list[str]:
    """What a mistyped ``word`` most likely meant among ``candidates`` (registered names, config
    options), at most ``count``: one rule for every "did you mean". difflib's 0.6 cutoff offered
    image_size for HiAD's patch_size; 0.65 does not."""
    return difflib.get_close_matches(word, candidates, n=count, cutoff=0.65)


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            close = self.close_names(name)
            guess = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}{guess}") from None

    def close_names(self, name: str) -> list[str]:
        """The registered names a mistyped ``name`` most likely meant: near spellings ('tiled' for
        'tilde', 'tiny-cnn' for 'tiny_cnn'), else the names holding it ('efficientnet-lite0' for
        'lite0'); at most three. A config's misspelt option says as much (hrad.config)."""
        names = self.names()
        return close_matches(name, names, 3) or [known for known in names if name and name.lower() in known][:3]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


@dataclass(frozen=True)
class ConfiguredEntry(Generic[C, B]):
    """A registered implementation (``build``) and the config class a config's ``name`` selects
    (detectors and strategies each have their own config class)."""

    config_type: type[C]
    build: B


def registered_config(registry: Registry[ConfiguredEntry[C, B]], data: Mapping[str, Any], default: str) -> C:
    """``data`` validated into the config class registered for the ``name`` it gives (``default``
    when it gives none); an unknown name is the registry's one-line :class:`ConfigError`."""
    name = str(data.get("name", default))
    return registry.get(name).config_type.model_validate({**data, "name": name})
