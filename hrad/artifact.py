"""One model artifact: a directory with the config, weights and calibration.

```
MODEL/
  hrad.json            package version, artifact format, config, fitted size, calibration,
                       and the weights file's sha256, size and tensor shapes
  weights.safetensors  every learned tensor of the strategy (and its detectors)
```

Writes go to a staging sibling (``.MODEL.staging-HOST-PID-RANDOM``) that is renamed into place
only when complete, so an interrupted ``hrad fit`` never leaves a half-written model behind.
Overwriting renames the old model to ``.MODEL.old`` for the instant between the two renames;
a reader that finds no ``MODEL`` but a complete ``.MODEL.old`` loads that (the old model stays
loadable until the new one is in place), and the next write removes it. Staging folders left
by a killed process on this host are removed by the next write next to them. Parent folders made
for the model are removed again when the fit or the write fails (:func:`artifact_target`).

Loading verifies the weights against the manifest: file size, every tensor's shape (a file
from another model) and the sha256 digest (bit flips, truncation, a swapped file of the same
shapes). Artifacts written before the digest was recorded load without that check.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hrad import strict_json
from hrad.data.images import default_file_mode, missing_reason
from hrad.errors import ArtifactError
from hrad.staging import left_by_dead_process, remove_created, staging_name
from hrad.version import ARTIFACT_FORMAT, __version__

MANIFEST = "hrad.json"
WEIGHTS = "weights.safetensors"
_STAGING = "staging"


class SafetensorsReader:
    """Lazy :class:`~hrad.strategies.base.StateReader` over a safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
            self._keys = list(self._file.keys())
        except Exception as error:  # safetensors raises several types for corrupt files
            raise ArtifactError(f"{path}: unreadable weights file ({_one_line(error)})") from None

    def keys(self) -> list[str]:
        return list(self._keys)

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape from the file header (no tensor data is read)."""
        return {key: [int(side) for side in self._file.get_slice(key).get_shape()] for key in self._keys}

    def get(self, key: str) -> Tensor:
        if key not in self._keys:
            raise ArtifactError(f"{self.path}: tensor {key!r} is missing")
        return self._file.get_tensor(key)


def _one_line(error: BaseException) -> str:
    return (" ".join(str(error).split()) or type(error).__name__)[:200]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_record(weights: Path) -> dict[str, Any]:
    """What the manifest records about a weights file: sha256, size, tensor shapes."""
    return {
        "file": weights.name,
        "sha256": file_sha256(weights),
        "bytes": weights.stat().st_size,
        "tensors": SafetensorsReader(weights).shapes(),
    }


def _backup(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / WEIGHTS).is_file()


def clean_stale_staging(path: Path) -> list[Path]:
    """Remove staging folders of ``path`` left by dead processes of this host; the removed ones."""
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for sibling in path.parent.glob(f".{path.name}.{_STAGING}-*"):
        if not sibling.is_dir() or not left_by_dead_process(sibling.name, f".{path.name}.{_STAGING}-"):
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        removed.append(sibling)
    return removed


def check_artifact_target(path: Path) -> list[Path]:
    """Refuse, before any work, an output that cannot become a model: an existing file or folder
    that is not an hrad model, or a parent folder that cannot be written. The parent folders it
    created to find out, outermost first (:func:`artifact_target` removes them after a failure)."""
    path = Path(path)
    foreign = path.exists() and not (path / MANIFEST).is_file() and (not path.is_dir() or any(path.iterdir()))
    if foreign:
        raise ArtifactError(f"{path}: exists and is not an hrad model; refusing to overwrite it")
    created: list[Path] = []
    try:
        _make_folders(path.parent, created)
        probe = path.parent / f".{path.name}.{_STAGING}-probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        remove_created(created)
        reason = error.strerror or _one_line(error)
        raise ArtifactError(f"{path}: cannot write a model here ({reason})") from None
    return created


def _make_folders(folder: Path, created: list[Path]) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)`` that appends to ``created`` each folder its
    own ``mkdir`` made, and only those: one that existed, or that another process made
    meanwhile, is never counted (nor one reached through ``..`` or a link)."""
    for ancestor in [*reversed(folder.parents), folder]:
        if ancestor.is_dir():
            continue
        try:
            ancestor.mkdir()
        except FileExistsError:
            if not ancestor.is_dir():
                raise
            continue
        created.append(ancestor)


@contextmanager
def artifact_target(path: Path) -> Iterator[None]:
    """:func:`check_artifact_target` around the work that ends in writing ``path`` (a fit): when
    the work fails (an error, Ctrl-C, SIGTERM), the parent folders the check created go again,
    so a failed fit leaves nothing that was not there before."""
    created = check_artifact_target(path)
    try:
        yield
    except BaseException:
        remove_created(created)
        raise


def write_artifact(path: Path, manifest: dict[str, Any], tensors: dict[str, Tensor] | Callable[[Path], None]) -> None:
    """Atomically write ``path`` (a directory) with the manifest and tensors.

    ``tensors`` is either a dict or a function that writes the safetensors file itself (so a
    tiled ensemble can stream one tile model at a time instead of holding all of them).
    """
    path = Path(path)
    created = check_artifact_target(path)
    clean_stale_staging(path)
    staging = path.parent / staging_name(f".{path.name}.{_STAGING}-")
    try:
        staging.mkdir()  # the umask's permissions, like any folder the user creates
        if callable(tensors):
            tensors(staging / WEIGHTS)
        else:
            save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(staging / WEIGHTS))
        full_manifest = {
            "hrad_version": __version__,
            "artifact_format": ARTIFACT_FORMAT,
            **manifest,
            "weights": weights_record(staging / WEIGHTS),
        }
        # strict JSON: a diverged epoch's NaN loss is null (read_manifest makes it NaN again)
        (staging / MANIFEST).write_text(strict_json.dumps(full_manifest, indent=2, default=str))
        mode = default_file_mode()  # safetensors writes 0600 whatever the umask
        for written in staging.iterdir():
            written.chmod(mode)
        backup = _backup(path)
        if path.exists():
            shutil.rmtree(backup, ignore_errors=True)
            path.rename(backup)  # from here until the next rename, readers load the backup
        staging.rename(path)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)  # model.save("a/b/model") that failed leaves no a/b either
        raise


def locate_artifact(path: Path) -> Path:
    """``path``, or its ``.NAME.old`` backup while an overwrite is between its two renames (or
    was killed there); the backup is used only when ``path`` itself does not exist."""
    path = Path(path)
    backup = _backup(path)
    if not path.exists() and _is_complete(backup):
        return backup
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_manifest(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """The fields ``load`` uses have the types it expects (a hand-edited or foreign file does not)."""

    def fail(field: str, expected: str) -> ArtifactError:
        return ArtifactError(f"{manifest_path}: corrupt model manifest ({field} must be {expected})")

    if not isinstance(manifest.get("config"), dict):
        raise fail("config", "an object")
    size = manifest.get("fitted_size")
    if size is not None and not (
        isinstance(size, list) and len(size) == 2 and all(isinstance(side, int) and side > 0 for side in size)
    ):
        raise fail("fitted_size", "null or [height, width]")
    thresholds = manifest.get("thresholds")
    if thresholds is not None:
        if not isinstance(thresholds, dict) or not all(_is_number(thresholds.get(key)) for key in ("image", "pixel")):
            raise fail("thresholds", "null or an object with numbers image and pixel")
        scores = thresholds.get("validation_image_scores", [])
        if not isinstance(scores, list) or not all(_is_number(score) for score in scores):
            raise fail("thresholds.validation_image_scores", "a list of numbers")
    history = manifest.get("training_history")  # a diverged epoch's NaN loss is still a number here
    if history is not None and not (
        isinstance(history, dict)
        and all(isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) for values in history.values())
    ):
        raise fail("training_history", "null or an object of lists of numbers")
    record = manifest.get("weights")
    if record is not None and not (
        isinstance(record, dict)
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("bytes"), int)
        and isinstance(record.get("tensors"), dict)
    ):
        raise fail("weights", "an object with sha256, bytes and tensors")


def _losses_from_json(history: Any) -> Any:
    """The training history with each ``null`` loss (how strict JSON writes a diverged epoch's
    NaN) as NaN again, so readers get the numbers the fit recorded; anything else unchanged."""
    if not isinstance(history, dict):
        return history
    return {stage: [math.nan if loss is None else loss for loss in losses] if isinstance(losses, list) else losses for stage, losses in history.items()}


def _what_it_is(path: Path) -> str:
    """What a path given for a model folder is instead, and what to give, for the refusal's line:
    the manifest inside a model (its folder), an export or an export's sidecar (hrad export writes
    the sidecar as the .json beside the graph), a folder holding an export or model folders. A
    user who gave any of these read only 'not an hrad model'."""
    if path.is_file():
        if path.name == MANIFEST:
            return f": give its folder, {path.parent}"
        if path.suffix != ".json" and path.with_suffix(".json").is_file():
            return f": an exported model (its sidecar {path.with_suffix('.json').name} beside it); this command takes the model folder it was exported from"
        graphs = [path.with_suffix(suffix).name for suffix in (".onnx", ".xml") if path.with_suffix(suffix).is_file()]
        return f": the sidecar of the exported model {graphs[0]}; give that" if path.suffix == ".json" and graphs else ""
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return ""
    models = [entry.name for entry in entries if (entry / MANIFEST).is_file()]
    if models:
        return f": it holds model folders ({', '.join(models[:3])}{', ...' if len(models) > 3 else ''}); give one"
    exports = [entry.name for entry in entries if entry.suffix in (".onnx", ".xml") and entry.with_suffix(".json").is_file()]
    return f": it holds the exported model {exports[0]}; give that file" if exports else ""


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an artifact, checked for completeness, types and version compatibility."""
    path = locate_artifact(Path(path))
    if not path.exists():  # a link that leads nowhere or to itself says so, as one to an image does
        raise ArtifactError(missing_reason(path) if path.is_symlink() else f"{path}: model not found")
    manifest_path = path / MANIFEST
    if path.is_file():  # e.g. the manifest itself, or a weights file, given for the model
        raise ArtifactError(f"{path}: not an hrad model (a file; a model is the folder hrad fit writes, holding {MANIFEST}){_what_it_is(path)}")
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: not an hrad model (no {MANIFEST}){_what_it_is(path)}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise ArtifactError(f"{manifest_path}: corrupt model manifest") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: corrupt model manifest (a JSON {type(manifest).__name__}, not an object)")
    found = manifest.get("artifact_format")
    if found != ARTIFACT_FORMAT:
        version = manifest.get("hrad_version", "unknown")
        # a newer format is read by upgrading hrad; an older one only by refitting (its geometry changed)
        newer = isinstance(found, int) and not isinstance(found, bool) and found > ARTIFACT_FORMAT
        remedy = f"upgrade hrad to {version} or later to read it" if newer else "refit it with this version"
        raise ArtifactError(
            f"{path}: model was saved by hrad {version} (artifact format {found}); this is hrad {__version__} "
            f"(format {ARTIFACT_FORMAT}): {remedy}"
        )
    if "training_history" in manifest:
        manifest["training_history"] = _losses_from_json(manifest["training_history"])
    _check_manifest(manifest_path, manifest)
    if not (path / WEIGHTS).is_file():
        raise ArtifactError(f"{path}: incomplete model, {WEIGHTS} is missing")
    return manifest


def verify_weights(reader: SafetensorsReader, record: dict[str, Any]) -> None:
    """Refuse weights that differ from the manifest's record: shapes, size, then sha256."""
    weights = reader.path
    expected: dict[str, Any] = record["tensors"]
    shapes = reader.shapes()
    if set(shapes) != set(expected):
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ArtifactError(f"{weights}: tensors differ from the manifest ({detail}): weights of another model")
    for key, shape in shapes.items():
        if shape != expected[key]:
            raise ArtifactError(
                f"{weights}: tensor {key!r} has shape {shape}, the manifest says {expected[key]}: weights of another model"
            )
    size = weights.stat().st_size
    if size != record["bytes"]:
        raise ArtifactError(
            f"{weights}: weights file is {size} bytes, the manifest says {record['bytes']}: "
            "corrupted or replaced; restore it or refit"
        )
    digest = file_sha256(weights)
    if digest != record["sha256"]:
        raise ArtifactError(
            f"{weights}: sha256 {digest[:16]}... does not match the manifest's {record['sha256'][:16]}...: "
            "the file is corrupted or was swapped; restore it or refit"
        )


def open_weights(path: Path, manifest: dict[str, Any] | None = None) -> SafetensorsReader:
    """The weights reader; checked against ``manifest``'s record when it has one."""
    reader = SafetensorsReader(locate_artifact(Path(path)) / WEIGHTS)
    record = (manifest or {}).get("weights")
    if record is not None:
        verify_weights(reader, record)
    return reader
