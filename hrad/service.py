"""HTTP inference service: one fitted model behind ``GET /health`` and ``POST /predict``.

The model is loaded once, when the app is created, so a broken artifact fails ``hrad serve``
before it listens. Predictions (decoding included) run one at a time under a lock: a forward
pass already uses every core, the backbones are not safe to call from several threads at once,
and one decoded image at a time bounds the memory. Upload size is bounded before the multipart
body is parsed, so an oversized request never reaches the disk or the decoder; the image's
header is checked against the pixel budget before it is decoded (413), so a decompression bomb
costs its upload, not its decoded size.

Every error, whatever its source (a bad image, a bad request, an unknown route, a timeout, an
internal failure), is JSON ``{"error": "<one line>"}`` with its status code: 400 bad image,
404/405 route, 408 body not received in time, 413 upload or pixel budget, 422 bad request,
503 busy past the timeout, 504 prediction past the timeout, 500 anything else.

``/health`` says the service is up and which kind of model it serves; the model's path, its
full config and its weights' sources are shown only with ``health_details=True``
(``hrad serve --health-details``).
"""

from __future__ import annotations

import asyncio
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
from starlette.exceptions import HTTPException

from hrad.data.images import (
    IMAGE_EXTENSIONS,
    check_pixel_budget,
    read_image,
)
from hrad.errors import ConfigError, HradError, ImageTooLargeError, InputError
from hrad.model import Prediction, Thresholds
from hrad.outputs import (
    encode_map_png16,
    encode_png,
    map_scale,
    mask_picture,
    overlay_picture,
    overlay_scale,
    own_scale,
)
from hrad.version import __version__

#: default bound on one request body (a 8K x 8K 16-bit RGB PNG is about 300 MB raw, far less compressed)
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
#: default bound on one request: receiving its body, waiting for the model, predicting
DEFAULT_REQUEST_TIMEOUT = 300.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MapKind(str, Enum):
    png16 = "png16"
    overlay = "overlay"
    mask = "mask"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": " ".join(message.split())})


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, before any parsing.

    A declared ``Content-Length`` is checked first; a chunked body is buffered (at most
    ``limit`` bytes) and replayed to the app, so the limit holds whatever the client sends.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

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
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                message = await asyncio.wait_for(receive(), timeout=remaining)
            except asyncio.TimeoutError:
                response = _error(408, f"request body not received within the {self.timeout:g} s request timeout")
                await response(scope, receive, send)
                return
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


def decode_upload(
    data: bytes, filename: str, budget: int | None = None, before_decode: Callable[[], None] | None = None
) -> np.ndarray:
    """Decode uploaded bytes with :func:`read_image` (all its formats); errors name the upload.

    The header is checked against the pixel budget (``budget``, default :func:`max_pixels`)
    first; ``before_decode`` runs between that check and the decode (the service takes its lock
    there, so an over-budget upload is refused at once, without waiting for the model).
    """
    name = filename or "upload"
    if not data:
        raise InputError(f"{name}: not a readable image (empty upload)")
    with tempfile.TemporaryDirectory(prefix="hrad-upload-") as folder:
        path = Path(folder) / f"upload{_suffix_for(name, data)}"
        path.write_bytes(data)
        try:
            check_pixel_budget(path, budget)
            if before_decode is not None:
                before_decode()
            return read_image(path, budget)
        except InputError as error:
            raise type(error)(str(error).replace(str(path), name)) from None


def _encoded_map(kind: MapKind, image: np.ndarray, prediction: Prediction, thresholds: Thresholds | None) -> dict[str, Any]:
    """The map (16-bit on the model's fixed scale), the overlay (fixed colour scale, contours at
    the pixel threshold used) or the mask as a base64 PNG: the bytes ``hrad predict`` writes."""
    result: dict[str, Any] = {"kind": kind.value, "media_type": "image/png"}
    if kind is MapKind.png16:
        scale = map_scale(thresholds) or own_scale(prediction.anomaly_map)
        data = encode_map_png16(prediction.anomaly_map, scale)
        result.update(vmin=scale.vmin, vmax=scale.vmax)
    elif kind is MapKind.overlay:
        colours = overlay_scale(thresholds)
        data = encode_png(overlay_picture(image, prediction, colours))
        if colours is not None:
            result.update(vmin=colours.vmin, vmax=colours.vmax)
    else:
        mask = mask_picture(prediction)
        if mask is None:
            raise ConfigError("map=mask: this model has no pixel threshold; pass pixel_threshold")
        data = encode_png(mask)
    result["base64"] = base64.b64encode(data).decode("ascii")
    return result


class _Busy(Exception):
    """The model stayed busy with other requests past this request's timeout."""


class _Cancelled(Exception):
    """The request already timed out; its queued work is dropped."""


def create_app(
    model_path: str | Path,
    device: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    health_details: bool = False,
) -> FastAPI:
    """A FastAPI app serving the model at ``model_path`` (loaded now, once).

    ``max_pixels`` is the pixel budget of uploads (default: :func:`hrad.data.images.max_pixels`
    when the app is created); ``request_timeout`` bounds each request (body, queue, prediction).
    A prediction past the timeout gets 504 at once; the computation itself cannot be interrupted
    and finishes in the background before the next request's.
    """
    from hrad.artifact import read_manifest
    from hrad.data.images import max_pixels as current_budget
    from hrad.model import load

    if request_timeout <= 0:
        raise InputError(f"request timeout must be positive, got {request_timeout}")
    model_path = Path(model_path)
    model = load(model_path, device=device)
    manifest = read_manifest(model_path)
    budget = current_budget() if max_pixels is None else int(max_pixels)
    lock = threading.Lock()

    app = FastAPI(title="hrad", version=__version__, summary="High-resolution industrial anomaly detection")
    app.state.model = model
    app.add_middleware(BodyLimit, limit=max_upload_bytes, timeout=request_timeout)

    @app.exception_handler(HradError)
    async def _hrad_error(request: Request, error: HradError) -> JSONResponse:
        return _error(413 if isinstance(error, ImageTooLargeError) else 400, str(error))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, f"{request.url.path}: {error.detail}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(error).__name__}); the request was not completed")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg")))

    @app.get("/health")
    def health() -> dict[str, Any]:
        config = model.config
        thresholds = model.thresholds
        body: dict[str, Any] = {
            "status": "ok",
            "hrad_version": __version__,
            "model_hrad_version": manifest.get("hrad_version"),
            "backbone": config.backbone.name,
            "detector": config.detector.name,
            "strategy": config.strategy.name,
            "fitted_size": list(model.fitted_size) if model.fitted_size else None,
            "thresholds": {"image": thresholds.image, "pixel": thresholds.pixel} if thresholds else None,
            "device": str(model.device),
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": budget,
            "request_timeout": request_timeout,
        }
        if health_details:  # paths and full config only when the operator asked for them
            body.update(
                model=str(model_path),
                backbone_weights=model.extractor.weights_source,
                fitted_backbone_weights=manifest.get("backbone_weights"),
                config=config.model_dump(mode="json"),
            )
        return body

    def _predict_upload(
        data: bytes,
        name: str,
        kind: MapKind | None,
        deadline: float,
        cancelled: threading.Event,
        overrides: tuple[float | None, float | None, float | None] = (None, None, None),
    ) -> dict[str, Any]:
        acquired = False

        def take_lock() -> None:
            nonlocal acquired
            acquired = lock.acquire(timeout=max(deadline - time.monotonic(), 0.0))
            if not acquired:
                raise _Busy
            if cancelled.is_set():
                raise _Cancelled

        try:
            array = decode_upload(data, name, budget, before_decode=take_lock)
            start = time.perf_counter()
            prediction = model.predict(array, *overrides) if any(v is not None for v in overrides) else model.predict(array)
            seconds = time.perf_counter() - start
            result: dict[str, Any] = {
                "filename": name,
                "score": prediction.score,
                "is_anomalous": prediction.is_anomalous,
                "image_threshold": prediction.image_threshold,
                "pixel_threshold": prediction.pixel_threshold,
                "width": int(array.shape[1]),
                "height": int(array.shape[0]),
                "seconds": seconds,
            }
            if kind is not None:
                result["map"] = _encoded_map(kind, array, prediction, model.thresholds)
            return result
        finally:
            if acquired:
                lock.release()

    @app.post("/predict", response_model=None)
    async def predict(
        image: UploadFile = File(..., description="Image file: PNG, JPEG, BMP or TIFF (8/16-bit, float)"),  # noqa: B008
        map: MapKind | None = Query(None, description="Also return the map (png16), an overlay or the mask, base64 PNG"),  # noqa: A002, B008
        threshold: float | None = Query(None, description="Image-score threshold for this request (default: the model's)"),  # noqa: B008
        pixel_threshold: float | None = Query(None, description="Pixel threshold for the mask and contours"),  # noqa: B008
        sigmas: float | None = Query(None, description="Both thresholds at mean + sigmas x std of the held-out normals"),  # noqa: B008
    ) -> dict[str, Any] | JSONResponse:
        overrides = (threshold, pixel_threshold, sigmas)
        model.decision_thresholds(*overrides)  # a bad override is a 400 before the upload is decoded
        deadline = time.monotonic() + request_timeout
        data = await image.read()
        await image.close()
        name = image.filename or "upload"
        cancelled = threading.Event()
        # a plain executor future: on timeout the response goes out at once (an anyio worker
        # thread would hold the response until the computation it cannot interrupt is done)
        work = asyncio.get_running_loop().run_in_executor(None, _predict_upload, data, name, map, deadline, cancelled, overrides)
        work.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved even after a 504
        try:
            return await asyncio.wait_for(asyncio.shield(work), timeout=max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            cancelled.set()
            return _error(504, f"{name}: not predicted within the {request_timeout:g} s request timeout")
        except _Busy:
            return _error(503, f"{name}: the model stayed busy past the {request_timeout:g} s request timeout")
        except _Cancelled:  # pragma: no cover - only after this request already answered 504
            return _error(504, f"{name}: not predicted within the {request_timeout:g} s request timeout")

    return app
