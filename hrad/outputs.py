"""One writer for prediction outputs: ``hrad predict``, ``hrad predict-distributed`` and the service.

For every image (``<stem>`` = its file stem, numbered when two inputs share one):

- ``<stem>_map.png``: the anomaly map as a 16-bit PNG on the model's fixed map scale
  (:class:`MapScale`): value = ``vmin + png / 65535 x (vmax - vmin)``, clipped outside. The scale
  is stored in the PNG itself (text chunk ``hrad_scale``: ``vmin=...;vmax=...``) and in
  ``maps.json``. Or ``<stem>_map.tiff``: float32, the map's own values, nothing clipped.
- ``<stem>_mask.png``: 0/255 mask of ``map > pixel threshold`` (when the model has one).
- ``<stem>_regions.json``: the defect regions, the connected parts of the mask
  (:func:`~hrad.postprocess.regions.defect_regions`: bounding box, area, peak and mean map value,
  strongest first, at most :data:`MAX_LISTED_REGIONS`), with the threshold and their count.
- ``<stem>_overlay.png``: the image with a JET heat map on the model's fixed overlay scale
  (normal pixels' mean = blue, the pixel threshold = the middle of the scale, twice as far =
  red) and red contours around the mask, so a normal image stays calm and a defect glows, and
  two overlays are comparable. A model with a region of interest (:mod:`hrad.postprocess.roi`)
  has it drawn: outside, the plain image at half brightness (not inspected), a white outline.
- ``thumbs/<stem>.jpg``: a small JPEG of the overlay (:func:`~hrad.data.images.thumbnail`), for
  the batch's summary page ``index.html`` (:func:`write_summary_page`), when asked for.
- one row of ``scores.csv``: ``path, score, is_anomalous, threshold, status, error, map, regions``
  (threshold = the image-score threshold the decision used; status ``ok`` or ``failed``, with
  the one-line reason in ``error``; regions = how many defect regions the mask has). Rows are written and flushed as images finish
  (:class:`ScoresWriter`), so an interrupted run keeps them.

Scales come from the model's thresholds (held-out normal images), never from the image itself;
a model without thresholds falls back to each map's own range, recorded per file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import cv2
import numpy as np

from hrad import strict_json
from hrad.data.images import (
    TEXT_ERRORS,
    atomic_write_bytes,
    image_size,
    overlay_image,
    text_bytes,
    thumbnail,
    write_map_tiff,
    write_mask,
)
from hrad.errors import ConfigError, InputError
from hrad.postprocess.regions import Region, defect_regions

if TYPE_CHECKING:  # types only: this module sits below the model in the import order (ARCHITECTURE.md)
    from hrad.model import AnomalyModel, Prediction, Thresholds
    from hrad.reports.batch import BatchItem

MapFormat = Literal["png16", "tiff", "none"]
SCORES_COLUMNS = ("path", "score", "is_anomalous", "threshold", "status", "error", "map", "regions")
#: regions listed per image in ``<stem>_regions.json`` (the strongest; the count covers all)
MAX_LISTED_REGIONS = 1000
#: the text chunk of a 16-bit map PNG that holds its scale
PNG_SCALE_KEY = "hrad_scale"


@dataclass(frozen=True)
class MapScale:
    """A value range ``vmin .. vmax`` shared by every image of one model."""

    vmin: float
    vmax: float
    source: str

    def unit(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Map values as 0..1 on this scale (clipped)."""
        scaled = (np.asarray(anomaly_map, dtype=np.float64) - self.vmin) / (self.vmax - self.vmin)
        return np.clip(np.nan_to_num(scaled), 0.0, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {"vmin": self.vmin, "vmax": self.vmax, "source": self.source}


def _spread(thresholds: Thresholds) -> tuple[float, float] | None:
    """``(normal mean, threshold - mean)`` of the held-out normal pixels, when known and positive."""
    mean = thresholds.pixel_mean
    if mean is None:
        return None
    distance = thresholds.pixel - mean
    return (mean, distance) if distance > 0 else None


def overlay_scale(thresholds: Thresholds | None) -> MapScale | None:
    """Normal mean .. mean + 2 x (threshold - mean): the threshold sits mid-scale. None = per image."""
    if thresholds is None:
        return None
    spread = _spread(thresholds)
    if spread is not None:
        mean, distance = spread
        return MapScale(mean, mean + 2 * distance, "normal pixel mean .. mean + 2 x (pixel threshold - mean)")
    if thresholds.pixel > 0:  # artifacts without pixel statistics
        return MapScale(0.0, 2 * thresholds.pixel, "0 .. 2 x pixel threshold")
    return None


def map_scale(thresholds: Thresholds | None) -> MapScale | None:
    """The 16-bit map range: mean - 2d .. mean + 8d with d = threshold - mean (so the normal range
    and strong defects both keep their detail); None = each map's own range."""
    if thresholds is None:
        return None
    spread = _spread(thresholds)
    if spread is not None:
        mean, distance = spread
        return MapScale(mean - 2 * distance, mean + 8 * distance, "normal pixel mean - 2d .. mean + 8d, d = pixel threshold - mean")
    if thresholds.pixel > 0:
        return MapScale(0.0, 2 * thresholds.pixel, "0 .. 2 x pixel threshold")
    return None


def own_scale(anomaly_map: np.ndarray) -> MapScale:
    low, high = float(np.nanmin(anomaly_map)), float(np.nanmax(anomaly_map))
    return MapScale(low, high if high > low else low + 1.0, "this map's own min .. max (model without thresholds)")


def encode_map_png16(anomaly_map: np.ndarray, scale: MapScale) -> bytes:
    """A 16-bit grayscale PNG of the map on ``scale``, with the scale in its ``hrad_scale`` text chunk."""
    array = np.round(scale.unit(anomaly_map) * 65535.0).astype(np.uint16)
    # OpenCV's PNG defaults (zlib level 1, run-length strategy): a map's low bits are noise, so
    # stronger compression buys little; at 1500x1000 this takes 0.05 s where PIL's level 6 took
    # 0.67 s (as long as predicting the image on two cores) and its level 1 0.13 s
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError("cannot encode the anomaly map as PNG")
    text = f"{PNG_SCALE_KEY}\0vmin={scale.vmin!r};vmax={scale.vmax!r}".encode("latin-1")
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    data = encoded.tobytes()
    after_header = 8 + 25  # PNG signature, then the IHDR chunk (length, type, 13 bytes, CRC)
    return data[:after_header] + chunk + data[after_header:]


def read_map_png16(path: str | os.PathLike[str] | bytes) -> np.ndarray:
    """A map written by :func:`encode_map_png16` back as float32 values (within one 16-bit step)."""
    from PIL import Image

    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else Path(path)) as png:
        text = png.text.get(PNG_SCALE_KEY)  # type: ignore[attr-defined]
        array = np.asarray(png, dtype=np.float64)
    if text is None:
        raise ValueError(f"{path if not isinstance(path, bytes) else 'PNG'}: no {PNG_SCALE_KEY} text chunk")
    values = dict(part.split("=", 1) for part in text.split(";"))
    vmin, vmax = float(values["vmin"]), float(values["vmax"])
    return (vmin + array / 65535.0 * (vmax - vmin)).astype(np.float32)


def encode_png(picture: np.ndarray) -> bytes:
    """An 8-bit RGB (``H x W x 3``) or gray picture as PNG bytes."""
    array = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR) if picture.ndim == 3 else picture
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise ValueError("cannot encode the picture as PNG")
    return buffer.tobytes()


def overlay_picture(image: np.ndarray, prediction: Prediction, scale: MapScale | None) -> np.ndarray:
    """The 8-bit overlay of :mod:`hrad.outputs` (fixed scale, red contour at the pixel threshold,
    the region of interest's outside dimmed and its outline white), for files and ``hrad serve``."""
    used = scale or own_scale(prediction.anomaly_map)
    return overlay_image(
        image, prediction.anomaly_map, prediction.pixel_threshold, vmin=used.vmin, vmax=used.vmax, inspected=prediction.inspected
    )


def encode_jpeg(picture: np.ndarray, quality: int = 85) -> bytes:
    """An 8-bit RGB picture as JPEG bytes (thumbnails)."""
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("cannot encode the picture as JPEG")
    return buffer.tobytes()


def mask_picture(prediction: Prediction) -> np.ndarray | None:
    """0/255 uint8 mask of ``map > pixel threshold``; None without a pixel threshold."""
    mask = prediction.mask
    return None if mask is None else np.where(mask, 255, 0).astype(np.uint8)


@dataclass(frozen=True)
class OutputRow:
    """One line of ``scores.csv``: an image's score and decision, or why it failed (``error``)."""

    path: str
    score: float | None = None
    is_anomalous: bool | None = None
    threshold: float | None = None
    map_path: str | None = None
    error: str | None = None
    #: defect regions in the mask (None: no pixel threshold, so no mask)
    regions: int | None = None

    @property
    def status(self) -> str:
        """``ok`` or ``failed`` (the reason is in :attr:`error`)."""
        return "ok" if self.error is None else "failed"

    def csv_row(self) -> list[str]:
        return [
            self.path,
            "" if self.score is None else repr(float(self.score)),
            "" if self.is_anomalous is None else str(bool(self.is_anomalous)).lower(),
            "" if self.threshold is None else repr(float(self.threshold)),
            self.status,
            self.error or "",
            self.map_path or "",
            "" if self.regions is None else str(self.regions),
        ]


def failed_row(path: str | os.PathLike[str], error: BaseException | str) -> OutputRow:
    """A ``scores.csv`` row for an image that could not be predicted (reason in one line).

    A user-facing :class:`~hrad.errors.HradError` keeps its own line, prefixed with the path
    when it does not name the file (checks of the decoded array say "image array: ..."); any
    other exception is prefixed with the path and its type."""
    from hrad.errors import HradError, naming_file

    if isinstance(error, str):
        text = error
    elif isinstance(error, HradError):
        text = naming_file(path, error)
    else:
        text = f"{path}: {type(error).__name__}: {' '.join(str(error).split())}"
    return OutputRow(str(path), error=text[:400])


def output_stems(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """File stems for outputs; numbered (``00003_name``) when two inputs share a stem."""
    stems = [Path(path).stem for path in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{index:05d}_{stem}" for index, stem in enumerate(stems)]


class OutputStems:
    """Output stems for images that keep coming (``hrad predict --watch``): the first ones as
    :func:`output_stems` names them; a later file its own stem, or numbered by its arrival
    (``00007_name``) when another file has that stem already; a file seen again keeps its stem
    (its outputs are replaced, not doubled). ``kept``: rows an earlier run wrote
    (:func:`resumable_rows`); their images keep the stems of their files and no other image
    takes one, so a resumed run over another list of images overwrites none of them."""

    def __init__(self, paths: Sequence[Path], kept: Mapping[Path, Sequence[str]] | None = None) -> None:
        self._stems = {path: _row_stem(row) for path, row in (kept or {}).items()}
        self._taken = set(self._stems.values())
        for path, stem in zip(paths, output_stems(paths), strict=True):
            if path not in self._stems and stem not in self._taken:
                self._stems[path] = stem
                self._taken.add(stem)

    def __call__(self, path: Path) -> str:
        stem = self._stems.get(path)
        if stem is None:
            stem, index = path.stem, len(self._stems)
            while stem in self._taken:
                stem, index = f"{index:05d}_{path.stem}", index + 1
            self._stems[path] = stem
            self._taken.add(stem)
        return stem


def _csv_bytes(rows: Iterable[Sequence[str]]) -> bytes:
    """``scores.csv``'s header and ``rows``, as the file holds them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SCORES_COLUMNS)
    writer.writerows(rows)
    return text_bytes(buffer.getvalue())


class ScoresWriter:
    """``scores.csv`` written as results come, one flushed row at a time, so an interrupted run
    keeps every row it finished. Use as a context manager. ``kept``: rows of an earlier run
    written first (:func:`resumable_rows`): the header and they replace the file at once (a
    temporary file and a rename), so a kill or a full disk while they are written leaves the
    earlier file whole, and the next ``--resume`` still keeps its rows; new rows are appended."""

    def __init__(self, path: str | os.PathLike[str], kept: Sequence[Sequence[str]] = ()) -> None:
        self.path = Path(path)
        atomic_write_bytes(self.path, _csv_bytes(kept))
        self._handle = self.path.open("a", newline="", encoding="utf-8", errors=TEXT_ERRORS)
        self._writer = csv.writer(self._handle, lineterminator="\n")

    def write(self, row: OutputRow) -> None:
        self._writer.writerow(row.csv_row())
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> ScoresWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_scores_csv(path: str | os.PathLike[str], rows: Sequence[OutputRow]) -> Path:
    """All rows at once (input order), replacing ``path`` atomically."""
    atomic_write_bytes(Path(path), _csv_bytes(row.csv_row() for row in rows))
    return Path(path)


#: the summary page of ``hrad predict``'s output folder and the folder of its thumbnails
SUMMARY_PAGE = "index.html"
THUMBNAIL_FOLDER = "thumbs"


def scores_records(path: Path) -> Iterator[dict[str, str]]:
    """The rows of a ``scores.csv`` as written here, each as ``{column: text}``; ValueError when
    its header is not :data:`SCORES_COLUMNS` (I/O, decoding and CSV errors pass through)."""
    with path.open(newline="", encoding="utf-8", errors=TEXT_ERRORS) as handle:  # as ScoresWriter writes it
        reader = csv.reader(handle)
        if tuple(next(reader, ())) != SCORES_COLUMNS:
            raise ValueError(f"{path}: not a scores.csv of this hrad (its columns differ)")
        for row in reader:
            yield dict(zip(SCORES_COLUMNS, row, strict=False))


def summary_items(out_dir: Path) -> list[BatchItem]:
    """The images of ``out_dir``'s ``scores.csv`` for the summary page, the last row of each
    (a watched file retried has two), with links to their thumbnails and overlays (else maps)."""
    from hrad.reports.batch import BatchItem

    records = {record.get("path", ""): record for record in scores_records(out_dir / "scores.csv")}
    items = []
    for path, record in records.items():
        stem = _map_stem(record.get("map"))
        thumb, overlay = Path(THUMBNAIL_FOLDER) / f"{stem}.jpg", Path(f"{stem}_overlay.png")
        full = overlay if stem and (out_dir / overlay).is_file() else Path(Path(record.get("map") or "").name)
        failed = record.get("status") != "ok"
        shown = stem and not failed and (out_dir / thumb).is_file()
        items.append(
            BatchItem(
                path,
                score=float(record["score"]) if record.get("score") else None,
                flagged=record.get("is_anomalous") == "true",
                regions=int(record["regions"]) if record.get("regions") else None,
                threshold=float(record["threshold"]) if record.get("threshold") else None,
                error=(record.get("error") or "failed") if failed else None,
                thumbnail=quote(thumb.as_posix(), errors=TEXT_ERRORS) if shown else None,
                link=quote(full.as_posix(), errors=TEXT_ERRORS) if not failed and full.name and (out_dir / full).is_file() else None,
                aspect=_aspect(out_dir / thumb) if shown else None,
            )
        )
    return items


def _aspect(picture: Path) -> float | None:
    """Width over height of a thumbnail from its header; None when it cannot be read (the page
    still shows it, in the usual box)."""
    try:
        height, width = image_size(picture)
    except InputError:
        return None
    return width / height if height else None


def write_summary_page(out_dir: Path, facts: Mapping[str, str] | None = None) -> Path:
    """``out_dir/index.html`` from its ``scores.csv`` (:mod:`hrad.reports.batch`), written
    atomically; ``facts`` (the model, when) are listed under its title."""
    from hrad.reports.batch import render_batch_page

    page = render_batch_page(summary_items(out_dir), f"Predictions in {out_dir.resolve().name}", dict(facts or {}))
    atomic_write_bytes(out_dir / SUMMARY_PAGE, text_bytes(page))
    return out_dir / SUMMARY_PAGE


#: the key of ``maps.json``'s ``run`` that names the folder ``hrad predict`` ran in: a resumed
#: run finds the images of the earlier one's relative paths from there (:func:`resumable_rows`)
RUN_FOLDER = "folder"


def _map_stem(map_path: str | None) -> str:
    """The output stem a row's map file names (``<stem>_map.png``); empty without a map."""
    name = Path(map_path or "").name
    for suffix in ("_map.png", "_map.tiff"):
        name = name.removesuffix(suffix)
    return name


def _row_stem(row: Sequence[str]) -> str:
    """The output stem of a ``scores.csv`` row (a list in :data:`SCORES_COLUMNS` order)."""
    return _map_stem(dict(zip(SCORES_COLUMNS, row, strict=False)).get("map"))


def _not_resumable(maps: Path, earlier: Any, expected: dict[str, Any]) -> str:
    """Why an earlier run's files cannot be kept: what its ``maps.json`` says otherwise."""
    if not maps.is_file():
        return f"{maps.parent} holds a scores.csv without {maps.name}, so what wrote its files is unknown"
    if not isinstance(earlier, dict):
        return f"{maps}: unreadable, so what wrote the files beside it is unknown"
    run, now = earlier.get("run") or {}, expected.get("run") or {}
    differ = [
        f"{what} ({run[key]})" if key == "model" and key in run else what
        for key, what in (("model", "another model"), ("thresholds", "other thresholds"))
        if isinstance(run, dict) and run.get(key) != now.get(key)
    ]
    return f"{maps.parent} holds predictions of {' and '.join(differ) if differ else 'other output settings'} (its {maps.name} differs)"


def resumable_rows(out_dir: Path, images: Sequence[Path], description: dict[str, Any]) -> dict[Path, list[str]]:
    """What ``hrad predict --resume`` keeps of an earlier run into ``out_dir``: the ``ok`` rows of
    its ``scores.csv`` for ``images`` whose map file is still there and not older than the image
    (a rewritten image is predicted again), by image. Failed images are predicted again. The
    earlier run must have written the same ``maps.json`` (``description``: the same model,
    thresholds and output settings); else its files would mix with these, a one-line error.
    An image is matched by the file it names, not its spelling: the earlier run's relative
    paths start in the folder its ``run`` recorded (:data:`RUN_FOLDER`); a kept row names its
    image and map as this run does."""
    scores, maps = out_dir / "scores.csv", out_dir / "maps.json"
    if not scores.is_file():
        return {}
    try:
        earlier = json.loads(maps.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    run = earlier.get("run") if isinstance(earlier, dict) else None
    # where the earlier run's relative paths start; not a setting (any folder may resume it)
    start = run.pop(RUN_FOLDER, None) if isinstance(run, dict) else None
    expected = json.loads(strict_json.dumps(description))  # as written: non-finite numbers null
    if earlier != expected:
        raise ConfigError(f"--resume: {_not_resumable(maps, earlier, expected)}; choose another --out, or drop --resume to predict every image again")
    base = Path(start) if isinstance(start, str) else Path.cwd()
    wanted = {os.path.abspath(path): path for path in images}  # the same files named from another folder too
    kept: dict[Path, list[str]] = {}
    try:
        for record in scores_records(scores):
            image = wanted.get(os.path.abspath(base / record.get("path", ""))) if record.get("path") else None
            map_file = out_dir / Path(record.get("map") or "-").name  # the row may name it from another folder
            if image is None or record.get("status") != "ok" or not map_file.is_file():
                continue
            with contextlib.suppress(OSError):
                if map_file.stat().st_mtime_ns >= image.stat().st_mtime_ns:
                    # named as this run names its files (it may run elsewhere, or spell them otherwise)
                    named = record | {"path": str(image), "map": str(map_file)}
                    kept[image] = [named.get(column, "") for column in SCORES_COLUMNS]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"--resume: {scores}: unreadable ({' '.join(str(error).split())})") from None
    except ValueError as error:  # the columns differ (a decoding error, also a ValueError, is caught above)
        raise ConfigError(f"--resume: {error}") from None
    return kept


class PredictionWriter:
    """Writes maps, masks and overlays of one model's predictions into ``out_dir``.

    ``thresholds`` are the model's own (they fix the scales); decisions use whatever thresholds
    each :class:`~hrad.model.Prediction` carries (possibly overridden at predict time).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        thresholds: Thresholds | None,
        map_format: MapFormat = "png16",
        overlays: bool = True,
        masks: bool = True,
        regions: bool = True,
        thumbnails: bool = False,
    ) -> None:
        if map_format not in ("png16", "tiff", "none"):
            raise ValueError(f"map format is png16, tiff or none, not {map_format!r}")
        self.out_dir = Path(out_dir)
        self.map_format = map_format
        self.overlays = overlays
        self.masks = masks
        self.regions = regions
        #: ``thumbs/<stem>.jpg`` of each overlay, for :func:`write_summary_page`; not in
        #: :meth:`describe`: a resumed run with other settings only lacks some thumbnails
        self.thumbnails = thumbnails
        self.map_scale = map_scale(thresholds)
        self.overlay_scale = overlay_scale(thresholds)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if thumbnails:
            folder = self.out_dir / THUMBNAIL_FOLDER
            if folder.exists() and not folder.is_dir():  # mkdir's FileExistsError was a traceback
                raise InputError(f"{folder}: a file where the summary page's thumbnails go (move it, or give --no-summary)")
            folder.mkdir(exist_ok=True)

    @classmethod
    def for_model(cls, out_dir: str | os.PathLike[str], model: AnomalyModel, **options: Any) -> PredictionWriter:
        return cls(out_dir, model.thresholds, **options)

    def describe(self) -> dict[str, Any]:
        """What ``maps.json`` says: formats and scales, so the files can be read back."""
        return {
            "map_format": self.map_format,
            "map_scale": self.map_scale.to_json() if self.map_scale else "per image, in each PNG's hrad_scale text chunk",
            "map_decode": "value = vmin + png16 / 65535 x (vmax - vmin); values outside are clipped (tiff: float32 as is)",
            "overlay_scale": self.overlay_scale.to_json() if self.overlay_scale else "per image (model without thresholds)",
            "overlay": "heat map on overlay_scale over the image, contours at the pixel threshold" if self.overlays else None,
            "mask": "0/255 PNG of map > the pixel threshold used" if self.masks else None,
            "regions": "8-connected parts of map > the pixel threshold: box (x, y, width, height), area, peak, mean; "
            f"strongest first, at most {MAX_LISTED_REGIONS} listed" if self.regions else None,
            "scores_columns": list(SCORES_COLUMNS),
        }

    def write_description(self, run: dict[str, Any] | None = None) -> Path:
        """``maps.json``; ``run``: what else decided the files (``hrad predict``: the model and
        the thresholds used), so a resumed run can tell it is the same (:func:`resumable_rows`)."""
        path = self.out_dir / "maps.json"
        atomic_write_bytes(path, strict_json.dumps(self.describe() | ({"run": run} if run else {}), indent=2).encode("utf-8"))
        return path

    def write(self, path: str | os.PathLike[str], stem: str, image: np.ndarray, prediction: Prediction) -> OutputRow:
        """Write one image's files; its ``scores.csv`` row."""
        map_path: Path | None = None
        if self.map_format == "png16":
            map_path = self.out_dir / f"{stem}_map.png"
            scale = self.map_scale or own_scale(prediction.anomaly_map)
            atomic_write_bytes(map_path, encode_map_png16(prediction.anomaly_map, scale))
        elif self.map_format == "tiff":
            map_path = self.out_dir / f"{stem}_map.tiff"
            write_map_tiff(map_path, prediction.anomaly_map)
        mask = prediction.mask
        if self.masks and mask is not None:
            write_mask(self.out_dir / f"{stem}_mask.png", mask)
        if self.overlays or self.thumbnails:
            picture = overlay_picture(image, prediction, self.overlay_scale)
            if self.overlays:
                atomic_write_bytes(self.out_dir / f"{stem}_overlay.png", encode_png(picture))
            if self.thumbnails:
                small = np.clip(thumbnail(picture) + 0.5, 0, 255).astype(np.uint8)
                atomic_write_bytes(self.out_dir / THUMBNAIL_FOLDER / f"{stem}.jpg", encode_jpeg(small))
        found = prediction_regions(prediction) if self.regions else None
        if found is not None:
            atomic_write_bytes(self.out_dir / f"{stem}_regions.json", regions_json(found, prediction).encode("utf-8"))
        return OutputRow(
            str(path),
            float(prediction.score),
            prediction.is_anomalous,
            prediction.image_threshold,
            str(map_path) if map_path is not None else None,
            regions=None if found is None else len(found),
        )


def prediction_regions(prediction: Prediction) -> list[Region] | None:
    """The defect regions of a prediction's mask; None when it has no pixel threshold."""
    if prediction.pixel_threshold is None:
        return None
    return defect_regions(prediction.anomaly_map, prediction.pixel_threshold)


def listed_regions(regions: list[Region]) -> list[dict[str, Any]]:
    """The strongest :data:`MAX_LISTED_REGIONS` regions as JSON objects (the file and the service list these)."""
    return [region.to_json() for region in regions[:MAX_LISTED_REGIONS]]


def regions_json(regions: list[Region], prediction: Prediction) -> str:
    """``<stem>_regions.json``: threshold, count and the strongest :data:`MAX_LISTED_REGIONS`."""
    content = {"pixel_threshold": prediction.pixel_threshold, "count": len(regions), "regions": listed_regions(regions)}
    return strict_json.dumps(content, indent=1)


__all__ = [
    "SCORES_COLUMNS",
    "RUN_FOLDER",
    "resumable_rows",
    "MapScale",
    "OutputRow",
    "PredictionWriter",
    "ScoresWriter",
    "encode_map_png16",
    "failed_row",
    "listed_regions",
    "prediction_regions",
    "map_scale",
    "OutputStems",
    "output_stems",
    "overlay_scale",
    "read_map_png16",
    "write_scores_csv",
]
