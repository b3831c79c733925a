"""One model artifact: a directory with the config, weights and calibration.

```
MODEL/
  hrad.json            package version, artifact format, config, fitted size, calibration
  weights.safetensors  every learned tensor of the strategy (and its detectors)
```

Writes go to a temporary sibling directory that is renamed into place only when complete, so
an interrupted ``hrad fit`` never leaves a half-written model behind (and never destroys the
previous one until the new one is whole).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hrad.errors import ArtifactError
from hrad.version import ARTIFACT_FORMAT, __version__

MANIFEST = "hrad.json"
WEIGHTS = "weights.safetensors"


class SafetensorsReader:
    """Lazy :class:`~hrad.strategies.base.StateReader` over a safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
            self._keys = list(self._file.keys())
        except Exception as error:  # safetensors raises several types for corrupt files
            raise ArtifactError(f"{path}: unreadable weights file ({error})") from None

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, key: str) -> Tensor:
        if key not in self._keys:
            raise ArtifactError(f"{self.path}: tensor {key!r} is missing")
        return self._file.get_tensor(key)


def write_artifact(path: Path, manifest: dict[str, Any], tensors: dict[str, Tensor] | Callable[[Path], None]) -> None:
    """Atomically write ``path`` (a directory) with the manifest and tensors.

    ``tensors`` is either a dict or a function that writes the safetensors file itself (so a
    tiled ensemble can stream one tile model at a time instead of holding all of them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    foreign = path.exists() and not (path / MANIFEST).is_file() and (not path.is_dir() or any(path.iterdir()))
    if foreign:
        raise ArtifactError(f"{path}: exists and is not an hrad model; refusing to overwrite it")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if callable(tensors):
            tensors(staging / WEIGHTS)
        else:
            save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(staging / WEIGHTS))
        full_manifest = {"hrad_version": __version__, "artifact_format": ARTIFACT_FORMAT, **manifest}
        (staging / MANIFEST).write_text(json.dumps(full_manifest, indent=2, default=str))
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            path.rename(backup)
            staging.rename(path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an artifact, checked for completeness and version compatibility."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: model not found")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: not an hrad model (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{manifest_path}: corrupt model manifest") from None
    found = manifest.get("artifact_format")
    if found != ARTIFACT_FORMAT:
        version = manifest.get("hrad_version", "unknown")
        raise ArtifactError(
            f"{path}: model was saved by hrad {version} (artifact format {found}); this is hrad {__version__} "
            f"(format {ARTIFACT_FORMAT}): refit it with this version"
        )
    if not (path / WEIGHTS).is_file():
        raise ArtifactError(f"{path}: incomplete model, {WEIGHTS} is missing")
    return manifest


def open_weights(path: Path) -> SafetensorsReader:
    return SafetensorsReader(Path(path) / WEIGHTS)
