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
404/405 route, 408 body not received in time, 413 upload or pixel budget, 422 bad request
(a request without the image file says how to send one), 503 busy (the queue full, or the model
busy past the timeout), 504 prediction past the timeout, 500 anything else; 499 (nginx's "client
closed request") to a client that left before its body was complete, which no one reads but the
log and ``/metrics``.

``/health`` (liveness) says the process is up and which kind of model it serves; the model's
path, its full config and its weights' sources are shown only with ``health_details=True``
(``hrad serve --health-details``). ``/ready`` (readiness) is 200 while fewer than ``max_queue``
prediction requests are in flight (receiving their upload, waiting for or holding the model)
and 503 past that, so a load balancer stops routing to a saturated replica without restarting
it; a prediction request that arrives then is refused at once, 503 with ``Retry-After``, before
its body is read (:class:`BodyLimit`), so a flood of uploads cannot fill the disk. ``Retry-After``
is the queue's drain time as measured (:class:`ServiceTime`), which ``/ready`` shows too.
``POST /predict/batch`` takes several images in one request (each answered or failed on its
own). ``/metrics`` is Prometheus text: requests by route and status, request and prediction
latencies, requests waiting. Responses are Pydantic models, so ``/openapi.json`` describes every
field. What hrad warns of while predicting an upload
(a 16-bit image brighter than the model's bit depth saturates) comes back with its result, in
``warnings``, gathered per thread (:func:`hrad.errors.collecting_warnings`), not only on the
server's console. A warning the model gives once (an image scaled unlike the training images,
a gray one among colour ones: one console line per model) still comes back with every response
it concerns (:func:`hrad.prediction.tell_once`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import shutil
import sys
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
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.formparsers import parse_options_header

from hrad.data.images import (
    IMAGE_EXTENSIONS,
    check_pixel_budget,
    read_pixels,
)
from hrad.errors import ConfigError, HradError, ImageTooLargeError, InputError, collecting_warnings, named
from hrad.outputs import (
    encode_map_png16,
    encode_png,
    listed_regions,
    map_scale,
    mask_picture,
    overlay_picture,
    overlay_scale,
    own_scale,
    prediction_regions,
)
from hrad.prediction import Prediction, Predictor, Thresholds
from hrad.service_page import PAGE
from hrad.version import __version__

#: request lines (:func:`_log_request`) and a worker's failure to start; ``hrad serve`` shows them
#: and writes them to its log file
_requests = logging.getLogger(__name__)

#: default bound on one request body (a 8K x 8K 16-bit RGB PNG is about 300 MB raw, far less compressed)
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
#: default bound on one request: receiving its body, waiting for the model, predicting
DEFAULT_REQUEST_TIMEOUT = 300.0
#: a request body, and an upload on its way to the decoder, is held in memory up to this size and
#: on disk beyond it, so requests waiting for the model cost disk, not memory
SPOOL_BYTES = 2**20
#: the routes whose requests carry uploads: only these bodies are received (and spooled), and only
#: while fewer than ``max_queue`` of them are in flight (:class:`BodyLimit`)
PREDICTION_ROUTES = frozenset({"/predict", "/predict/batch"})
#: ``Retry-After`` seconds of a prediction request refused because the queue was full, before any
#: request's service time was measured, and the least it ever says (:class:`ServiceTime`)
QUEUE_FULL_RETRY_AFTER = 1
#: the most ``Retry-After`` says, however deep the queue and slow the model: a client told to wait
#: longer is better served by another replica (``/ready`` already steers a load balancer there)
RETRY_AFTER_CAP = 60
#: weight of the newest request in the moving average of service time: about the last five requests
#: count, so the estimate follows a change of image size or load within a few requests
SERVICE_TIME_WEIGHT = 0.3

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class MapKind(str, Enum):
    png16 = "png16"
    overlay = "overlay"
    mask = "mask"


class ErrorResponse(BaseModel):
    """Every error: one line."""

    error: str


class MapPayload(BaseModel):
    """A map, overlay or mask as base64 PNG: the bytes ``hrad predict`` writes."""

    kind: MapKind
    media_type: str = "image/png"
    base64: str
    vmin: float | None = Field(None, description="value of the darkest level (png16, overlay on a fixed scale)")
    vmax: float | None = Field(None, description="value of the brightest level")


class RegionModel(BaseModel):
    """One defect region: a connected part of ``map > pixel_threshold`` (as ``<stem>_regions.json``)."""

    x: int
    y: int
    width: int
    height: int
    area: int = Field(description="pixels")
    peak: float = Field(description="highest map value in the region")
    mean: float = Field(description="mean map value over the region")


class PredictResponse(BaseModel):
    """One image's result."""

    filename: str
    score: float = Field(description="image anomaly score")
    is_anomalous: bool | None = Field(description="score > image_threshold; null without a threshold")
    image_threshold: float | None
    pixel_threshold: float | None
    width: int
    height: int
    seconds: float = Field(description="prediction time (decoding excluded)")
    map: MapPayload | None = Field(None, description="present when the request asked for ?map=")
    region_count: int | None = Field(None, description="defect regions in map > pixel_threshold; null without a pixel threshold")
    regions: list[RegionModel] | None = Field(None, description="the strongest regions first, at most 1000 (hrad.outputs.MAX_LISTED_REGIONS)")
    warnings: list[str] = Field(
        default_factory=list,
        description="what hrad warned of while predicting this image, one line each (e.g. a 16-bit upload brighter "
        "than the model's bit depth saturated); empty when nothing",
    )


class BatchFailure(BaseModel):
    """One image of a batch that could not be predicted (the others still are)."""

    filename: str
    error: str
    status: int = Field(description="the status this image alone would have got")


class BatchResponse(BaseModel):
    """Results in upload order."""

    results: list[PredictResponse | BatchFailure]


class ThresholdsModel(BaseModel):
    image: float | None
    pixel: float | None


class HealthResponse(BaseModel):
    """Liveness and what is served (details only with ``--health-details``)."""

    status: str
    hrad_version: str
    model_hrad_version: str | None
    backbone: str
    detector: str
    strategy: str
    fitted_size: list[int] | None
    thresholds: ThresholdsModel | None
    bit_depth: int | None = Field(None, description="significant bits 16-bit uploads are scaled from (learned at fit); null: as stored")
    region_of_interest: float | None = Field(None, description="share of each image inspected (hrad fit --roi); null: all of it")
    device: str
    max_upload_bytes: int
    max_pixels: int | None
    request_timeout: float
    pid: int = Field(description="the serving process (one of several with hrad serve --workers)")
    model: str | None = None
    backbone_weights: Any = None
    fitted_backbone_weights: Any = None
    config: dict[str, Any] | None = None


class ReadyResponse(BaseModel):
    """Readiness: ``ready`` false (status 503) while ``queued`` >= ``max_queue``; a prediction
    request that arrives then is refused with 503."""

    ready: bool
    queued: int = Field(description="prediction requests in flight now: receiving their upload, waiting for or holding the model")
    max_queue: int
    request_seconds: float | None = Field(
        description="recent seconds one prediction request held the model (moving average, this worker); null before the first"
    )
    retry_after: int = Field(
        description="the Retry-After a prediction request refused now would get: queued x request_seconds, rounded up, "
        f"{QUEUE_FULL_RETRY_AFTER} to {RETRY_AFTER_CAP} s ({QUEUE_FULL_RETRY_AFTER} before any request was measured)"
    )


#: default readiness bound: requests waiting for or holding the model
DEFAULT_MAX_QUEUE = 4
#: most images in one POST /predict/batch
DEFAULT_MAX_BATCH = 16


class _Metrics:
    """Prometheus metrics of one app (own registry, so several apps in one process stay apart)."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prometheus
        except ImportError:
            raise ConfigError("hrad serve needs prometheus-client: pip install 'hrad[serve]'") from None
        self.prometheus = prometheus
        self.registry = prometheus.CollectorRegistry()
        self.requests = prometheus.Counter(
            "hrad_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = prometheus.Histogram(
            "hrad_request_seconds", "HTTP request latency (whole request)", ["route"], registry=self.registry
        )
        self.prediction = prometheus.Histogram(
            "hrad_prediction_seconds", "model.predict time per image", registry=self.registry
        )
        self.queued = prometheus.Gauge("hrad_queued_requests", "requests waiting for or holding the model", registry=self.registry)

    def text(self) -> bytes:
        return self.prometheus.generate_latest(self.registry)  # type: ignore[no-any-return]


def _log_request(scope: Scope, status: int, seconds: float) -> None:
    """One INFO line per request, ``client "METHOD path?query" status seconds s``, for an operator's
    log (``hrad serve`` shows it and writes it to its log file). The path as received, escaped to
    printable ASCII, so a hostile one (``%0A``) cannot forge lines."""
    client = scope.get("client")
    target = scope.get("raw_path") or scope.get("path", "").encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    where = f"{client[0]}:{client[1]}" if client else "-"
    _requests.info('%s "%s %s" %d %.3f s', where, scope.get("method"), ascii(target.decode("latin-1"))[1:-1], status, seconds)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": " ".join(message.split())})


def _is_prediction(scope: Scope) -> bool:
    """A request that carries an upload (``POST`` to one of :data:`PREDICTION_ROUTES`, below the
    app's ``root_path`` when it is mounted under a prefix)."""
    path, prefix = scope.get("path", ""), scope.get("root_path", "")
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :]
    return scope["type"] == "http" and scope.get("method") == "POST" and path in PREDICTION_ROUTES


class ServiceTime:
    """How long a prediction request holds the model, recently: an exponential moving average
    (weight :data:`SERVICE_TIME_WEIGHT` on the newest request, the first taken as it is), and the
    ``Retry-After`` it implies for a request refused because the queue is full.

    The model serves one request at a time, so the ``depth`` requests in flight take about
    ``depth x seconds`` to be served: that, rounded up to whole seconds, at least
    :data:`QUEUE_FULL_RETRY_AFTER` and at most :data:`RETRY_AFTER_CAP`, is the ``Retry-After``;
    before any request was measured it is :data:`QUEUE_FULL_RETRY_AFTER`. A fixed second made
    clients that obey it retry many times into a queue that takes seconds per request (HiAD on a
    4K image) to drain. Each worker process of ``hrad serve --workers N`` measures its own model
    and queue, and the refusal comes from the worker whose queue is full."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self._lock = threading.Lock()  # requests end in executor threads

    def observe(self, seconds: float) -> None:
        """One request held the model ``seconds`` in all (a batch: over its images)."""
        with self._lock:
            previous = self.seconds
            self.seconds = seconds if previous is None else previous + SERVICE_TIME_WEIGHT * (seconds - previous)

    def retry_after(self, depth: int) -> int:
        """Whole seconds for ``depth`` requests to be served, within the bounds above."""
        if self.seconds is None:
            return QUEUE_FULL_RETRY_AFTER
        return min(max(math.ceil(depth * self.seconds), QUEUE_FULL_RETRY_AFTER), RETRY_AFTER_CAP)


class InFlight:
    """Prediction requests admitted and not yet answered, at most ``limit`` (changed only on the
    event loop, by :class:`BodyLimit`), and how long each recently took to serve."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.service_time = ServiceTime()

    def retry_after(self) -> int:
        """The ``Retry-After`` of a request refused now (:meth:`ServiceTime.retry_after`)."""
        return self.service_time.retry_after(self.count)


class BodyLimit:
    """ASGI middleware: bounds what request bodies cost before any parsing.

    A declared ``Content-Length`` over ``limit`` bytes is 413 at once. Only a prediction
    request's body is received (:func:`_is_prediction`; the other routes read none, so theirs is
    never stored), and only while fewer than ``in_flight.limit`` prediction requests are in
    flight: past that it is 503 at once, with ``Retry-After`` (:meth:`InFlight.retry_after`),
    before any of its body is received. Counting requests from their arrival, not from when they wait for the model, is
    what bounds the disk, since each admitted one may spool up to ``limit`` bytes.

    An admitted body is received whole (at most ``limit`` bytes, spooled to disk past
    :data:`SPOOL_BYTES`, so concurrent large uploads cost disk, not memory) and replayed to the
    app a chunk at a time, so the limit holds whatever the client sends. A client that
    disconnects before its body is complete is answered 499 (nginx's "client closed request";
    it goes nowhere), so the request is counted and logged like any other instead of failing
    the middleware stack with a traceback.
    """

    def __init__(self, app: ASGIApp, limit: int, in_flight: InFlight, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = in_flight
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
        if not _is_prediction(scope):  # a route that reads no body: nothing to store
            await self.app(scope, receive, send)
            return
        in_flight = self.in_flight
        if in_flight.count >= in_flight.limit:
            await self._refuse_busy(scope, receive, send)
            return
        in_flight.count += 1
        try:
            await self._receive_whole(scope, receive, send)
        finally:
            in_flight.count -= 1

    async def _receive_whole(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Receive the body (spooled), then run the app on it."""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="hrad-body-") as body:
            size = 0
            tail = b""
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
                    gone = _error(499, f"client disconnected after {size} bytes of the request body")
                    await gone(scope, receive, send)
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    await self._refuse(scope, receive, send)
                    return
                body.write(chunk)
                tail = (tail + chunk)[-BODY_TAIL_BYTES:]
                if not message.get("more_body", False):
                    break
            scope[BODY_TAIL] = tail
            body.seek(0)
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                chunk = body.read(SPOOL_BYTES)
                replayed = body.tell() >= size
                return {"type": "http.request", "body": chunk, "more_body": not replayed}

            await self.app(scope, replay, send)

    async def _refuse_busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        in_flight = self.in_flight
        retry_after = in_flight.retry_after()
        response = _error(
            503,
            f"{scope['path']}: the queue is full ({in_flight.count} of at most {in_flight.limit} prediction requests "
            f"in flight, max_queue); retry in {retry_after} s",
        )
        response.headers["Retry-After"] = str(retry_after)
        await response(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        megabytes = f" ({self.limit / 2**20:.0f} MB)" if self.limit >= 2**20 else ""
        response = _error(413, f"upload larger than the limit of {self.limit} bytes{megabytes}")
        await response(scope, receive, send)


#: the scope key of a prediction request body's last bytes (a multipart form ends with its closing
#: boundary there), and how many are kept: a boundary is at most 70 characters (RFC 2046)
BODY_TAIL = "hrad.body_tail"
BODY_TAIL_BYTES = 4096


def _unterminated_form(request: Request) -> str | None:
    """The closing delimiter a multipart body lacks (``--BOUNDARY--``), or None: a body cut short
    parses as a form without the field, and 'this form has no such field' misled its client.

    The form parser does not say so itself: python-multipart's ``finalize`` does not check that
    the closing delimiter came (a TODO there, 0.0.34), and Starlette's parser neither raises nor
    keeps its state. So the body's last bytes are searched for it, with the boundary as
    Starlette's parser reads it from the header."""
    tail = request.scope.get(BODY_TAIL)
    boundary = parse_options_header(request.headers.get("content-type"))[1].get(b"boundary")
    if tail is None or boundary is None:
        return None
    closing = b"--" + boundary + b"--"
    return None if closing in tail else closing.decode("latin-1")


def _how_to_upload(request: Request, field: str, missing: bool) -> str:
    """What a request without its image file did wrong, and how to send one: Pydantic's 'Field
    required' told a client that posted JSON or the raw image bytes nothing of multipart, and its
    'Expected UploadFile, received: <class 'str'>' spoke Python."""
    how = f"the image file in multipart/form-data field '{field}' (curl -F {field}=@part.png)"
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        return f"{request.url.path} takes {how}, not {kind or 'a body without Content-Type'}"
    closing = _unterminated_form(request) if missing else None
    if closing is not None:
        return f"{request.url.path} takes {how}; the body is not a complete multipart form (it lacks the closing {closing}; cut short?)"
    return f"{request.url.path} takes {how}; this form has {'no such field' if missing else 'text there, not a file'}"


def _suffix_for(filename: str, data: bytes) -> str:
    """A file suffix read_pixels understands: the upload's own, else TIFF by magic bytes, else PNG
    (OpenCV decodes PNG/JPEG/BMP by content whatever the suffix)."""
    suffix = Path(filename).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    return ".tiff" if data[:4] in (b"II*\x00", b"MM\x00*") else ".png"


#: the upload folders of this process's requests in flight (:func:`upload_folder`), for a stop
#: that cannot wait for them: ``hrad serve``'s forced stop ends with ``os._exit``, which skips the
#: requests' own removal, so it removes these first (:func:`remove_live_upload_folders`)
_live_upload_folders: set[Path] = set()
_live_upload_folders_lock = threading.Lock()


def upload_folder() -> Path:
    """A private folder for one request's uploads, removed by :func:`remove_upload_folder` when its
    work is done (after a 504 too: the work that goes on in the background removes it)."""
    folder = Path(tempfile.mkdtemp(prefix="hrad-upload-"))
    with _live_upload_folders_lock:
        _live_upload_folders.add(folder)
    return folder


def remove_upload_folder(folder: Path) -> None:
    """Remove a request's :func:`upload_folder`, its work done."""
    shutil.rmtree(folder, ignore_errors=True)
    with _live_upload_folders_lock:
        _live_upload_folders.discard(folder)


def remove_live_upload_folders() -> int:
    """Remove the upload folders of the requests still in flight, and say how many: for a stop that
    abandons them (their own removal never runs), so a service restarted often leaves no
    ``hrad-upload-*`` folders behind in the temp directory."""
    with _live_upload_folders_lock:
        folders = list(_live_upload_folders)
        _live_upload_folders.clear()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return len(folders)


async def save_upload(upload: UploadFile, folder: Path, name: str, index: int = 0) -> Path:
    """Copy ``upload`` (named ``name`` in messages) into a file of ``folder`` a chunk at a time,
    never whole in memory, so a request waiting for the model holds its image on disk. The
    file's suffix is one :func:`read_pixels` understands (:func:`_suffix_for`)."""
    chunk = await upload.read(SPOOL_BYTES)
    path = folder / f"upload{index}{_suffix_for(name, chunk)}"
    with path.open("wb") as file:
        while chunk:
            file.write(chunk)
            chunk = await upload.read(SPOOL_BYTES)
    await upload.close()
    return path


def decode_upload(
    path: Path, filename: str, budget: int | None = None, before_decode: Callable[[], None] | None = None
) -> np.ndarray:
    """Decode an upload saved at ``path`` (:func:`save_upload`) with :func:`read_pixels` (all its
    formats, kept in their pixel type: an 8-bit upload costs its bytes, not 12 a pixel); errors
    name the upload.

    The header is checked against the pixel budget (``budget``, default :func:`max_pixels`)
    first; ``before_decode`` runs between that check and the decode (the service takes its lock
    there, so an over-budget upload is refused at once, without waiting for the model).
    """
    name = filename or "upload"
    if path.stat().st_size == 0:
        raise InputError(f"{name}: not a readable image (empty upload)")
    try:
        check_pixel_budget(path, budget)
        if before_decode is not None:
            before_decode()
        return read_pixels(path, budget)
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


def health_summary(facts: dict[str, Any]) -> dict[str, Any]:
    """``/health``'s account of the served model from
    :func:`~hrad.export_runtime.saved_model_facts`, the reading ``hrad info`` shows."""
    size, thresholds, roi = facts["fitted_size"], facts["thresholds"], facts["region_of_interest"]
    return {
        "model_hrad_version": facts["saved_by"],
        **{part: facts[part] or "?" for part in ("backbone", "detector", "strategy")},
        "fitted_size": [size["height"], size["width"]] if size else None,
        "thresholds": {"image": thresholds["image"], "pixel": thresholds["pixel"]} if thresholds else None,
        "bit_depth": facts["bit_depth"],
        "region_of_interest": roi["inspected"] if roi is not None else None,
    }


def _load_served(
    model_path: Path, device: str | None, runtime: str | None, ort_spinning: bool
) -> tuple[Predictor, dict[str, dict[str, Any]]]:
    """The model (an :class:`~hrad.model.AnomalyModel`, or an exported model's predictor) and
    what ``/health`` says of it: ``summary`` always, ``details`` with ``--health-details``."""
    from hrad.export_runtime import ExportedPredictor, saved_model_facts
    from hrad.loading import load_predictor

    model = load_predictor(model_path, device, runtime, ort_spinning)
    if isinstance(model, ExportedPredictor):
        sidecar = model.sidecar
        facts = saved_model_facts(sidecar, True, f"{model_path.with_suffix('.json')}")
        summary = health_summary(facts)
        summary["device"] = f"cpu ({model.runtime})"
        details = {"backbone_weights": facts["backbone_weights"], "config": {"geometry": sidecar.get("geometry")}}
        return model, {"summary": summary, "details": details}
    from hrad.artifact import MANIFEST, read_manifest
    from hrad.model import AnomalyModel  # not an export: an artifact directory's model, so torch is there

    if not isinstance(model, AnomalyModel):
        raise TypeError(f"cannot serve a {type(model).__name__}: an AnomalyModel or an exported model's predictor")

    manifest = read_manifest(model_path)
    summary = health_summary(saved_model_facts(manifest, False, f"{model_path / MANIFEST}"))
    summary["device"] = str(model.device)
    details = {
        "backbone_weights": model.extractor.weights_source,
        "fitted_backbone_weights": manifest.get("backbone_weights"),
        "config": model.config.model_dump(mode="json"),
    }
    return model, {"summary": summary, "details": details}


def create_app(
    model_path: str | Path,
    device: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    health_details: bool = False,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_batch: int = DEFAULT_MAX_BATCH,
    runtime: str | None = None,
    page: bool = True,
    ort_spinning: bool = False,
) -> FastAPI:
    """A FastAPI app serving the model at ``model_path`` (loaded now, once): an artifact directory,
    or an exported ``.onnx`` / OpenVINO ``.xml`` run by ``runtime`` (onnxruntime or openvino; the
    default follows the suffix) without torch; ``ort_spinning``: onnxruntime's threads busy-wait
    between ops (:func:`hrad.export_runtime.onnxruntime_session`).

    ``max_pixels`` is the pixel budget of uploads (default: :func:`hrad.data.images.max_pixels`
    when the app is created); ``request_timeout`` bounds each request (body, queue, prediction).
    A prediction past the timeout gets 504 at once; the computation itself cannot be interrupted
    and finishes in the background before the next request's. ``page``: ``GET /`` answers with
    a page to try the model in a browser (:mod:`hrad.service_page`).
    """
    from hrad.data.images import max_pixels as current_budget

    if request_timeout <= 0:
        raise InputError(f"request timeout must be positive, got {request_timeout}")
    model_path = Path(model_path)
    model, served = _load_served(model_path, device, runtime, ort_spinning)
    budget = current_budget() if max_pixels is None else int(max_pixels)
    lock = threading.Lock()
    metrics = _Metrics()
    queue_lock = threading.Lock()
    queued = 0

    def count_queued(change: int) -> None:
        nonlocal queued
        with queue_lock:
            queued += change
            metrics.queued.set(queued)

    app = FastAPI(title="hrad", version=__version__, summary="High-resolution industrial anomaly detection")
    app.state.model = model
    app.state.metrics = metrics
    in_flight = InFlight(max_queue)
    app.add_middleware(BodyLimit, limit=max_upload_bytes, timeout=request_timeout, in_flight=in_flight)
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse} for status in (400, 408, 413, 422, 500, 503, 504)
    }

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500  # what the client gets when the app raises
        try:
            response = await call_next(request)
            status = response.status_code
            route = getattr(request.scope.get("route"), "path", "unmatched")  # bounded label values
            metrics.requests.labels(route, str(response.status_code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
            return response
        finally:
            _log_request(request.scope, status, time.perf_counter() - start)

    @app.exception_handler(HradError)
    async def _hrad_error(request: Request, error: HradError) -> JSONResponse:
        return _error(413 if isinstance(error, ImageTooLargeError) else 400, str(error))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 400 and str(error.detail).startswith("Too many files"):  # Starlette's form parser stops at 1000
            return _error(413, f"over 1000 files in one request; at most {max_batch} images in one batch")
        return _error(error.status_code, f"{request.url.path}: {error.detail}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(error).__name__}); the request was not completed")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        if where in ("body.image", "body.images"):
            return _error(422, f"{where}: {_how_to_upload(request, where[5:], first.get('type') == 'missing')}")
        return _error(422, f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg")))

    if page:

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        def try_page() -> HTMLResponse:
            return HTMLResponse(PAGE)

    @app.get("/health", response_model=HealthResponse, response_model_exclude_unset=True)
    def health() -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "ok",
            "hrad_version": __version__,
            **served["summary"],
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": budget,
            "request_timeout": request_timeout,
            "pid": os.getpid(),
        }
        if health_details:  # paths and full config only when the operator asked for them
            body.update(model=str(model_path), **served["details"])
        return body

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    def ready() -> Any:
        busy = in_flight.count
        body = {
            "ready": busy < max_queue,
            "queued": busy,
            "max_queue": max_queue,
            "request_seconds": in_flight.service_time.seconds,
            "retry_after": in_flight.retry_after(),
        }
        return body if body["ready"] else JSONResponse(status_code=503, content=body)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def prometheus_metrics() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _predict_upload(
        path: Path,
        name: str,
        kind: MapKind | None,
        deadline: float,
        cancelled: threading.Event,
        held: list[float],
        overrides: tuple[float | None, float | None, float | None] = (None, None, None),
    ) -> dict[str, Any]:
        """Predict one upload under the model's lock; the seconds it held the model (decoding,
        predicting, encoding) are appended to ``held``, for its request's service time."""
        acquired = False
        held_since: float | None = None
        count_queued(+1)

        def take_lock() -> None:
            nonlocal acquired, held_since
            acquired = lock.acquire(timeout=max(deadline - time.monotonic(), 0.0))
            if not acquired:
                raise _Busy
            if cancelled.is_set():
                raise _Cancelled
            held_since = time.perf_counter()

        try:
            array = decode_upload(path, name, budget, before_decode=take_lock)
            start = time.perf_counter()
            # this thread's own warnings (hrad.errors.warn), for this upload's response
            with collecting_warnings() as warned:
                try:  # checks of the decoded array say "image array: ...": name the upload instead
                    threshold, pixel_threshold, sigmas = overrides
                    prediction = model.predict(array, threshold=threshold, pixel_threshold=pixel_threshold, sigmas=sigmas, name=name)
                except HradError as error:
                    raise named(name, error) from None
            seconds = time.perf_counter() - start
            metrics.prediction.observe(seconds)
            result: dict[str, Any] = {
                "filename": name,
                "score": prediction.score,
                "is_anomalous": prediction.is_anomalous,
                "image_threshold": prediction.image_threshold,
                "pixel_threshold": prediction.pixel_threshold,
                "width": int(array.shape[1]),
                "height": int(array.shape[0]),
                "seconds": seconds,
                "warnings": warned,
            }
            found = prediction_regions(prediction)
            if found is not None:
                result["region_count"] = len(found)
                result["regions"] = listed_regions(found)
            if kind is not None:
                result["map"] = _encoded_map(kind, array, prediction, model.thresholds)
            return result
        finally:
            count_queued(-1)
            if held_since is not None:
                held.append(time.perf_counter() - held_since)
            if acquired:
                lock.release()

    def observe_service(held: list[float]) -> None:
        """A request done: the seconds it held the model, if it got it, feed ``Retry-After``."""
        if held:
            in_flight.service_time.observe(sum(held))

    async def _bounded(name: str, deadline: float, cancelled: threading.Event, job: Callable[[], Any]) -> Any:
        """Run ``job`` in a thread; 504 past the deadline (the work is dropped or finishes unseen), 503 busy."""
        # a plain executor future: on timeout the response goes out at once (an anyio worker
        # thread would hold the response until the computation it cannot interrupt is done)
        work = asyncio.get_running_loop().run_in_executor(None, job)
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

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_unset=True, responses=errors)
    async def predict(
        request: Request,
        image: UploadFile = File(..., description="Image file: PNG, JPEG, BMP or TIFF (8/16-bit, float)"),  # noqa: B008
        map: MapKind | None = Query(None, description="Also return the map (png16), an overlay or the mask, base64 PNG"),  # noqa: A002, B008
        threshold: float | None = Query(None, description="Image-score threshold for this request (default: the model's)"),  # noqa: B008
        pixel_threshold: float | None = Query(None, description="Pixel threshold for the mask and contours"),  # noqa: B008
        sigmas: float | None = Query(None, description="Both thresholds at mean + sigmas x std of the held-out normals"),  # noqa: B008
    ) -> Any:
        overrides = (threshold, pixel_threshold, sigmas)
        model.decision_thresholds(*overrides)  # a bad override is a 400 before the upload is decoded
        given = len((await request.form()).getlist("image"))  # the form FastAPI parsed (cached)
        if given > 1:  # FastAPI keeps the last: the others would go unanswered without a word
            return _error(422, f"body.image: /predict takes one image, this form has {given} in field 'image' (several: /predict/batch, field 'images')")
        deadline = time.monotonic() + request_timeout
        folder = upload_folder()
        try:
            name = image.filename or "upload"
            path = await save_upload(image, folder, name)
        except BaseException:
            remove_upload_folder(folder)
            raise
        cancelled = threading.Event()

        def job() -> dict[str, Any]:
            held: list[float] = []
            try:
                return _predict_upload(path, name, map, deadline, cancelled, held, overrides)
            finally:
                observe_service(held)
                remove_upload_folder(folder)

        return await _bounded(name, deadline, cancelled, job)

    @app.post("/predict/batch", response_model=BatchResponse, response_model_exclude_unset=True, responses=errors)
    async def predict_batch(
        images: list[UploadFile] = File(..., description="Image files (field 'images', repeated)"),  # noqa: B008
        map: MapKind | None = Query(None, description="Also return each map, overlay or mask, base64 PNG"),  # noqa: A002, B008
        threshold: float | None = Query(None, description="Image-score threshold for this request"),  # noqa: B008
        pixel_threshold: float | None = Query(None, description="Pixel threshold for masks and contours"),  # noqa: B008
        sigmas: float | None = Query(None, description="Both thresholds at mean + sigmas x std of the held-out normals"),  # noqa: B008
    ) -> Any:
        """Several images in one request, predicted in order; a bad image fails alone (its own status)."""
        if len(images) > max_batch:
            return _error(413, f"{len(images)} images in one batch; at most {max_batch}")
        overrides = (threshold, pixel_threshold, sigmas)
        model.decision_thresholds(*overrides)
        deadline = time.monotonic() + request_timeout
        folder = upload_folder()
        try:
            uploads = []
            for index, upload in enumerate(images):
                name = upload.filename or f"upload{index}"
                uploads.append((await save_upload(upload, folder, name, index), name))
        except BaseException:
            remove_upload_folder(folder)
            raise
        cancelled = threading.Event()

        def run_all() -> dict[str, Any]:
            results: list[dict[str, Any]] = []
            held: list[float] = []
            try:
                for path, name in uploads:
                    try:
                        results.append(_predict_upload(path, name, map, deadline, cancelled, held, overrides))
                    except HradError as error:
                        status = 413 if isinstance(error, ImageTooLargeError) else 400
                        results.append({"filename": name, "error": " ".join(str(error).split()), "status": status})
            finally:
                observe_service(held)
                remove_upload_folder(folder)
            return {"results": results}

        return await _bounded(f"batch of {len(uploads)}", deadline, cancelled, run_all)

    return app


#: environment variable carrying :func:`create_app`'s arguments (JSON) to uvicorn's worker processes
SETTINGS_ENV = "HRAD_SERVE_SETTINGS"


def app_from_environment() -> FastAPI:
    """:func:`create_app` with the JSON keyword arguments in ``HRAD_SERVE_SETTINGS``: the factory
    each worker process of ``hrad serve --workers N`` calls (every worker loads its own model).

    A worker that cannot build its app (its model fails to load here, though it loaded in the
    parent: a file changed, memory ran out) says why in one error line and exits with uvicorn's
    startup-failure status, which stops the server; any other exit made uvicorn start the worker
    again, to fail again, with a traceback each time, forever."""
    from uvicorn.config import STARTUP_FAILURE

    settings = os.environ.get(SETTINGS_ENV)
    if not settings:
        raise ConfigError(f"{SETTINGS_ENV} is not set (it is set by hrad serve --workers)")
    try:
        return create_app(**json.loads(settings))
    except Exception as error:  # noqa: BLE001 (whatever it is, the worker cannot serve)
        reason = str(error) if isinstance(error, HradError) else f"{type(error).__name__}: {error}"
        _requests.error("worker process %d cannot serve: %s", os.getpid(), " ".join(reason.split()))
        sys.exit(STARTUP_FAILURE)
