"""HTTP inference service: one fitted model behind ``GET /health`` and ``POST /predict``.

The model is loaded once, when the app is created, so a broken artifact fails ``hrad serve``
before it listens. Predictions run one at a time under a lock: a forward pass already uses
every core, and the backbones are not safe to call from several threads at once. Upload size
is bounded before the multipart body is parsed, so an oversized request never reaches the disk
or the decoder. Every error is JSON ``{"error": "<one line>"}`` like the CLI's messages.
"""

from __future__ import annotations

import base64
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from hrad.data.images import IMAGE_EXTENSIONS, read_image, write_map_png16, write_overlay
from hrad.errors import HradError, InputError
from hrad.version import __version__

#: default bound on one request body (a 8K x 8K 16-bit RGB PNG is about 300 MB raw, far less compressed)
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MapKind(str, Enum):
    png16 = "png16"
    overlay = "overlay"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": " ".join(message.split())})


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, before any parsing.

    A declared ``Content-Length`` is checked first; a chunked body is buffered (at most
    ``limit`` bytes) and replayed to the app, so the limit holds whatever the client sends.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        megabytes = f" ({self.limit / 2**20:.0f} MB)" if self.limit >= 2**20 else ""
        response = _error(413, f"upload larger than the limit of {self.limit} bytes{megabytes}")
        await response(scope, receive, send)


def _suffix_for(filename: str, data: bytes) -> str:
    """A file suffix read_image understands: the upload's own, else TIFF by magic bytes, else PNG
    (OpenCV decodes PNG/JPEG/BMP by content whatever the suffix)."""
    suffix = Path(filename).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    return ".tiff" if data[:4] in (b"II*\x00", b"MM\x00*") else ".png"


def decode_upload(data: bytes, filename: str) -> np.ndarray:
    """Decode uploaded bytes with :func:`read_image` (all its formats); errors name the upload."""
    name = filename or "upload"
    if not data:
        raise InputError(f"{name}: not a readable image (empty upload)")
    with tempfile.TemporaryDirectory(prefix="hrad-upload-") as folder:
        path = Path(folder) / f"upload{_suffix_for(name, data)}"
        path.write_bytes(data)
        try:
            return read_image(path)
        except InputError as error:
            raise InputError(str(error).replace(str(path), name)) from None


def _encoded_map(kind: MapKind, image: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float | None) -> dict[str, Any]:
    """The map (16-bit, 0..vmax) or the overlay as a base64 PNG, written by the CLI's own writers."""
    with tempfile.TemporaryDirectory(prefix="hrad-map-") as folder:
        path = Path(folder) / "map.png"
        result: dict[str, Any] = {"kind": kind.value, "media_type": "image/png"}
        if kind is MapKind.png16:
            high = pixel_threshold * 2 if pixel_threshold else float(anomaly_map.max())
            high = high if high > 0 else 1.0
            write_map_png16(path, anomaly_map, 0.0, high)
            result.update(vmin=0.0, vmax=high)
        else:
            write_overlay(path, image, anomaly_map, pixel_threshold)
        result["base64"] = base64.b64encode(path.read_bytes()).decode("ascii")
    return result


def create_app(
    model_path: str | Path, device: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> FastAPI:
    """A FastAPI app serving the model at ``model_path`` (loaded now, once)."""
    from hrad.artifact import read_manifest
    from hrad.model import load

    model_path = Path(model_path)
    model = load(model_path, device=device)
    manifest = read_manifest(model_path)
    lock = threading.Lock()

    app = FastAPI(title="hrad", version=__version__, summary="High-resolution industrial anomaly detection")
    app.state.model = model
    app.add_middleware(BodyLimit, limit=max_upload_bytes)

    @app.exception_handler(HradError)
    async def _hrad_error(request: Request, error: HradError) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg")))

    @app.get("/health")
    def health() -> dict[str, Any]:
        config = model.config
        thresholds = model.thresholds
        return {
            "status": "ok",
            "hrad_version": __version__,
            "model": str(model_path),
            "model_hrad_version": manifest.get("hrad_version"),
            "backbone": config.backbone.name,
            "backbone_weights": model.extractor.weights_source,
            "fitted_backbone_weights": manifest.get("backbone_weights"),
            "detector": config.detector.name,
            "strategy": config.strategy.name,
            "fitted_size": list(model.fitted_size) if model.fitted_size else None,
            "thresholds": {"image": thresholds.image, "pixel": thresholds.pixel} if thresholds else None,
            "device": str(model.device),
            "max_upload_bytes": max_upload_bytes,
            "config": config.model_dump(mode="json"),
        }

    @app.post("/predict")
    def predict(
        image: UploadFile = File(..., description="Image file: PNG, JPEG, BMP or TIFF (8/16-bit, float)"),  # noqa: B008
        map: MapKind | None = Query(None, description="Also return the map (png16) or an overlay, base64 PNG"),  # noqa: A002, B008
    ) -> dict[str, Any]:
        array = decode_upload(image.file.read(), image.filename or "upload")
        start = time.perf_counter()
        with lock:
            prediction = model.predict(array)
        seconds = time.perf_counter() - start
        result: dict[str, Any] = {
            "filename": image.filename,
            "score": prediction.score,
            "is_anomalous": prediction.is_anomalous,
            "image_threshold": prediction.image_threshold,
            "pixel_threshold": prediction.pixel_threshold,
            "width": int(array.shape[1]),
            "height": int(array.shape[0]),
            "seconds": seconds,
        }
        if map is not None:
            result["map"] = _encoded_map(map, array, prediction.anomaly_map, prediction.pixel_threshold)
        return result

    return app
