"""The region of interest: the part of every image that is inspected.

A fixed camera sees more than the part: fixtures, conveyor, labels, the edge of the field of
view. Whatever happens there is not a defect of the part, but a model fitted on good images
flags anything it has not seen. A region of interest is a mask image (non-zero = inspect) given
at fit time; the model keeps it (PNG-encoded in its manifest and in every export's sidecar, so
nothing else has to travel with the model) and applies it to every finished map, stretched to
each image's size (nearest neighbour, so a mask drawn on one full-size frame fits them all):

- outside the region the map takes the lowest value it has inside, so nothing outside is ever
  above a threshold, drawn hot, or counted as a defect region, and the map's range is unchanged;
- the image score is taken inside the region: the map's maximum there (``image_score: max`` or
  ``strategy``; a strategy's own score may come from outside), or its top fraction there;
- the thresholds learn the pixel statistics of the held-out normal maps inside the region only.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hrad.data.images import decode_raw
from hrad.errors import ArtifactError, InputError
from hrad.prediction import Prediction

#: largest PNG of a region of interest a manifest or sidecar carries (a drawn mask is a few KB)
MAX_ROI_PNG_BYTES = 16 * 2**20


class RegionOfInterest:
    """A bool ``H x W`` mask (True = inspect), applied to maps of any size."""

    def __init__(self, mask: np.ndarray, name: str = "region of interest") -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise InputError(f"{name}: a region of interest is one H x W mask, got shape {mask.shape}")
        if not mask.any():
            raise InputError(f"{name}: the region of interest is empty (no non-zero pixel), so nothing would be inspected")
        self.mask = mask
        #: the share of each image inspected (what fit, info, evaluate and /health report)
        self.inspected = float(mask.mean())
        #: what messages call it: its file, or "region of interest"
        self.name = name
        self._resized: tuple[tuple[int, int], np.ndarray] | None = None

    @classmethod
    def from_pixels(cls, pixels: np.ndarray, name: str) -> RegionOfInterest:
        """From a decoded image (any type, gray or colour): a pixel is inside when any channel is non-zero."""
        array = np.asarray(pixels)
        inside = array.any(axis=2) if array.ndim == 3 else np.not_equal(array, 0)
        return cls(np.asarray(inside), name)

    def at(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask at ``shape`` (height, width), stretched by nearest neighbour; the last size is kept."""
        shape = (int(shape[0]), int(shape[1]))
        if shape == self.mask.shape:
            return self.mask
        cached = self._resized  # read once: another thread (hrad serve) may cache another size meanwhile
        if cached is not None and cached[0] == shape:
            return cached[1]
        resized = cv2.resize(self.mask.view(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
        self._resized = (shape, resized)
        return resized

    def stretch_problem(self, shape: tuple[int, int]) -> str | None:
        """Why stretching the mask to images of ``shape`` (height, width) may miss what was drawn:
        another aspect ratio (more than 1% apart), so the region is distorted; None when it only scales."""
        height, width = self.mask.shape
        ratio, target = width / height, shape[1] / shape[0]
        if abs(np.log(ratio / target)) <= 0.01:
            return None
        return (
            f"{self.name}: the region of interest is {width}x{height} (aspect {ratio:.3g}) but the training images are "
            f"{shape[1]}x{shape[0]} (aspect {target:.3g}); it is stretched to their shape, so check that it still covers the part"
        )

    def apply(self, anomaly_map: np.ndarray) -> np.ndarray:
        """``anomaly_map`` (writable float ``H x W``) with every pixel outside set to the lowest
        value inside, in place; returned. A region that shrinks to nothing at this size leaves
        the map as it is."""
        inside = self.at(anomaly_map.shape[:2])
        if inside.all() or not inside.any():
            return anomaly_map
        anomaly_map[~inside] = anomaly_map[inside].min()
        return anomaly_map

    def inside(self, anomaly_map: np.ndarray) -> np.ndarray:
        """The map's values inside the region (all of them when it shrinks to nothing at this size)."""
        inside = self.at(anomaly_map.shape[:2])
        return anomaly_map[inside] if inside.any() else anomaly_map.ravel()

    def to_json(self) -> dict[str, Any]:
        ok, encoded = cv2.imencode(".png", self.mask.view(np.uint8) * np.uint8(255), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 plane
            raise RuntimeError("the region of interest could not be encoded")
        height, width = self.mask.shape
        return {"width": width, "height": height, "png_base64": base64.b64encode(encoded.tobytes()).decode("ascii")}

    @classmethod
    def from_json(cls, content: Any, where: str) -> RegionOfInterest | None:
        """Back from :meth:`to_json` (None: no region); a damaged entry is one ArtifactError naming ``where``."""
        if content is None:
            return None
        try:
            data = base64.b64decode(content["png_base64"], validate=True)
            if len(data) > MAX_ROI_PNG_BYTES:
                raise ValueError(f"{len(data)} bytes of PNG")
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            if decoded is None or decoded.shape != (int(content["height"]), int(content["width"])):
                raise ValueError("not a PNG of the stated size")
            return cls(decoded > 0, where)
        except (KeyError, TypeError, ValueError, InputError) as error:
            raise ArtifactError(f"{where}: its region of interest is damaged ({' '.join(str(error).split())})") from None


def inspected_mask(roi: RegionOfInterest | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """What a :class:`~hrad.prediction.Prediction` of a map of ``shape`` carries as ``inspected``,
    for its pictures: the region stretched to that size (the cached mask, no copy), or None when
    the map was finished as without a region (no region, or one that covers everything or
    shrinks to nothing at this size, as :meth:`RegionOfInterest.apply` treats it)."""
    if roi is None:
        return None
    inside = roi.at((shape[0], shape[1]))
    return None if inside.all() or not inside.any() else inside


def finished_prediction(
    anomaly_map: np.ndarray, score: float, thresholds: tuple[float | None, float | None], roi: RegionOfInterest | None
) -> Prediction:
    """The :class:`~hrad.prediction.Prediction` of a finished map and its score: decided by the
    ``(image, pixel)`` ``thresholds``, inspected where ``roi`` says (:func:`inspected_mask`); one
    rule for the model's predictions and an export's."""
    image_threshold, pixel_threshold = thresholds
    return Prediction(
        anomaly_map=anomaly_map, score=score, image_threshold=image_threshold, pixel_threshold=pixel_threshold,
        inspected=inspected_mask(roi, anomaly_map.shape),
    )


def read_roi(path: str | Path) -> RegionOfInterest:
    """A region-of-interest mask file (any image hrad reads; non-zero = inspect).

    A file with transparency is refused: hrad reads the colour and ignores alpha (as for
    ground-truth masks), but a mask painted on a transparent layer marks its region in alpha,
    where the colour may be black everywhere (refused as empty, misleadingly) or white where
    erased (all of it inspected, silently)."""
    raw = decode_raw(Path(path))  # read_pixels' checked decoding, alpha kept
    if raw.ndim == 3 and raw.shape[2] in (2, 4):
        alpha = raw[..., -1]
        opaque = np.iinfo(alpha.dtype).max if alpha.dtype.kind in "ui" else 1.0
        if not np.all(alpha == opaque):
            raise InputError(
                f"{path}: the region of interest has transparency (an alpha channel); hrad reads the region from "
                "its colour (non-zero = inspect) and ignores alpha: save it without alpha, the region non-black on black"
            )
        raw = raw[..., :-1]
    return RegionOfInterest.from_pixels(raw, str(path))
