"""The HTTP API and web page: ``create_app(predictor)`` returns a FastAPI app.

``POST /caption`` takes an image (multipart field ``image``, or the raw bytes as the body) and
returns the caption, the n-best list with scores, one attention grid per word and timings.
``GET /health`` says the model is loaded; ``GET /`` is the web page, ``/docs`` the OpenAPI docs
(assets served locally, like the page's: nothing is fetched from a CDN).

Every refused request gets a 4xx with a JSON body ``{"error": "..."}`` that says what to fix;
the server keeps serving. Bodies over the upload limit are refused from their Content-Length
before anything is read, or as soon as the streamed bytes pass the limit; pixel bombs are refused
from the image header (:func:`attncap.images.decode_image`).

Memory stays within bounds (:mod:`attncap.serve.admission`): each request holds a share of a byte
budget, an upload is decoded once in one of a few threads and at once cut down to the encoder's
input, and past the budget a request gets a 503 with ``Retry-After``. A client that disconnects
is dropped before the model runs; on shutdown every pending request is answered.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import AttncapError
from ..images import DEFAULT_MAX_PIXELS, decode_image
from ..predict import Prediction, Predictor
from .admission import MB, DecodePool, MemoryBudget
from .batching import MicroBatcher, shutting_down

STATIC = Path(__file__).parent / "static"
FIELD = "image"
MAX_BEAM, MAX_LEN = 10, 100
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'")


@dataclass(frozen=True)
class ServeLimits:
    """Request limits and batching settings (the ``attncap serve`` flags).

    ``max_queued_bytes`` bounds the memory held for requests (see :mod:`attncap.serve.admission`);
    ``max_queue`` bounds both the requests waiting for a decode thread and those waiting for the
    model; ``max_connections`` is uvicorn's ``limit_concurrency``, a backstop (plain 503s past it).
    """

    max_upload_bytes: int = 10 * MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_queued_bytes: int = 1024 * MB
    decode_workers: int = 2
    upload_timeout_s: float = 60.0
    max_connections: int = 1024

    def __post_init__(self):
        if self.max_upload_bytes <= 0 or self.max_batch < 1 or self.max_wait_ms < 0:
            raise AttncapError("--max-upload-mb must be positive, --max-batch at least 1, --max-wait-ms >= 0")
        if self.max_queued_bytes < 2 * self.max_upload_bytes:
            raise AttncapError(f"--max-queue-mb ({self.max_queued_bytes / MB:g}) must be at least twice "
                               f"--max-upload-mb ({self.max_upload_bytes / MB:g}): an upload is held "
                               "twice while it is read")
        if self.decode_workers < 1 or self.upload_timeout_s <= 0 or self.max_queue < 1:
            raise AttncapError("--decode-workers and --max-queue must be at least 1, --upload-timeout "
                               "positive")


@dataclass(frozen=True)
class CaptionOptions:
    beam_size: int
    n_best: int
    max_len: int
    allow_unk: bool
    block_trigrams: bool


class Alternative(BaseModel):
    caption: str
    score: float


class CaptionResponse(BaseModel):
    caption: str
    words: list[str]
    score: float
    attention: list[list[list[float]]]  # one (g, g) grid per word
    grid: int
    n_best: list[Alternative]
    image: dict[str, int]
    options: dict[str, int | bool]
    timings: dict[str, float]


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes``, without buffering them first."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, self._message(int(declared)))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked upload without Content-Length
                raise HTTPException(413, self._message(seen, streamed=True))
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int, streamed: bool = False) -> str:
        got = f"more than {size}" if streamed else f"{size}"
        return (f"upload too large: {got} bytes, the limit is {self.max_bytes} "
                "(attncap serve --max-upload-mb raises it)")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg")))
    return _error(422, "; ".join(parts) or "invalid request")


async def _user_error(request: Request, exc: AttncapError) -> JSONResponse:
    return _error(400, str(exc))


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    request.app.state.disconnected += 1
    return Response(status_code=499)  # nobody reads it: uvicorn drops sends to a closed connection


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


@asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.decoder.start()
    await app.state.batcher.start()
    try:
        yield
    finally:
        await app.state.batcher.stop()
        app.state.decoder.stop()


def begin_shutdown(app: FastAPI) -> None:
    """Refuse new work and answer every waiting request with a 503; the running batch finishes.

    :mod:`attncap.serve.server` calls this before uvicorn waits for open requests, so they end
    at once instead of at its graceful-shutdown timeout (the lifespan's end does it otherwise).
    """
    app.state.batcher.close()


def create_app(predictor: Predictor, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The API and web page around one loaded model; batching starts with the app's lifespan."""
    app = FastAPIOffline(title="attncap", version=__version__, lifespan=_lifespan,
                         description="Image captioning with attention (Show, Attend and Tell). "
                                     "POST an image to /caption; the web page is at /.")
    app.state.predictor, app.state.limits = predictor, limits
    app.state.batcher = MicroBatcher(lambda pixels, o: predictor.caption_pixels(
        torch.stack(pixels), o.beam_size, o.n_best, o.max_len, o.allow_unk, o.block_trigrams),
        limits.max_batch, limits.max_wait_ms, limits.max_queue)
    app.state.budget = MemoryBudget(limits.max_queued_bytes)
    app.state.decoder = DecodePool(limits.decode_workers, limits.max_queue)
    app.state.disconnected = 0  # clients gone before their answer (mid-upload, decode or queue)
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(AttncapError, _user_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _server_error)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


router = APIRouter()

UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [FIELD], "properties": {
        FIELD: {"type": "string", "format": "binary"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


@router.get("/health")
async def health(request: Request) -> dict:
    """The model is loaded and the batching worker runs; queue, memory and batch counters."""
    state = request.app.state
    batcher, limits = state.batcher, state.limits
    return {"status": "shutting down" if batcher.closing else "ok", "model": state.predictor.describe(),
            "waiting": batcher.waiting, "collected": batcher.collected, "decoding": state.decoder.pending,
            "held_bytes": state.budget.used, "batches": batcher.batches, "served": batcher.served,
            "disconnected": state.disconnected, "dropped": batcher.dropped,
            "refused_for_memory": state.budget.refused,
            "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
                       "max_batch": limits.max_batch, "max_queue": limits.max_queue,
                       "max_queued_bytes": limits.max_queued_bytes,
                       "decode_workers": limits.decode_workers}}


@router.post("/caption", response_model=CaptionResponse, openapi_extra=UPLOAD_BODY,
             responses={400: {"description": "not a readable image, or no image sent"},
                        408: {"description": "upload slower than the upload timeout"},
                        413: {"description": "upload over the size limit"},
                        422: {"description": "invalid options"},
                        503: {"description": "too many requests or bytes waiting, or shutting "
                                             "down; see Retry-After"}})
async def caption(request: Request,
                  beam_size: int | None = Query(None, ge=1, le=MAX_BEAM, description="default: the model's"),
                  n_best: int = Query(1, ge=1, le=MAX_BEAM, description="alternatives to return"),
                  max_len: int | None = Query(None, ge=1, le=MAX_LEN, description="words at most"),
                  allow_unk: bool | None = Query(None, description="may <unk> be written; default: the model's"),
                  block_trigrams: bool | None = Query(None, description="never repeat a trigram; default: the "
                                                      "model's")) -> dict:
    """Caption one image: multipart field ``image``, or the image bytes as the request body."""
    started = time.perf_counter()
    state = request.app.state
    d = state.predictor.cfg.decode
    options = CaptionOptions(beam_size or d.beam_size, n_best, max_len or d.max_len,
                             d.allow_unk if allow_unk is None else allow_unk,
                             d.block_trigrams if block_trigrams is None else block_trigrams)
    if options.n_best > options.beam_size:
        raise HTTPException(422, f"n_best ({n_best}) cannot exceed beam_size ({options.beam_size})")
    if state.batcher.closing:
        raise shutting_down()
    with state.budget.hold(2 * _declared_length(request, state.limits), "this upload") as held:
        data, name = await _read_upload(request, state.limits, state.batcher.closed)
        held.resize(len(data), "this upload")
        read = time.perf_counter()
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            pixels, size = await _unless(gone, state.decoder.run(
                _model_input, state.predictor, data, name, state.limits.max_pixels))
            del data  # from here on only the encoder's input is kept
            held.resize(pixels.nbytes, "this image")
            decoded = time.perf_counter()
            preds, batch = await _unless(gone, state.batcher.submit(pixels, options))
        finally:
            gone.cancel()
    timings = {"read_ms": (read - started) * 1e3, "decode_image_ms": (decoded - read) * 1e3,
               "queue_ms": batch.queue_ms, "model_ms": batch.model_ms, "batch_size": batch.batch_size,
               "total_ms": (time.perf_counter() - started) * 1e3}
    return _response(preds, size, options, timings, state.predictor.info["grid"])


def _declared_length(request: Request, limits: ServeLimits) -> int:
    """The upload's Content-Length, or the upload limit for a chunked one (its size is unknown)."""
    declared = request.headers.get("content-length", "")
    return min(int(declared), limits.max_upload_bytes) if declared.isdigit() else limits.max_upload_bytes


def _model_input(predictor: Predictor, data: bytes, name: str,
                 max_pixels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Upload bytes -> (the encoder's input, uint8 (3, S, S); the image's (width, height)).

    Runs in a decode thread: the full-size image exists only here.
    """
    image = decode_image(data, name, max_pixels)
    return predictor.pixels(image), image.size


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (after the body was read, the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless(gone: asyncio.Future, work):
    """The result of ``work``, or ``ClientDisconnect`` once ``gone`` is done first.

    Cancelling ``work`` cancels what it awaits: a decode not yet started never runs, and a queued
    request's future is cancelled, so the batcher leaves it out of the model call.
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished = task.done()
        task.cancel()  # a no-op once it finished
    if not finished:
        raise ClientDisconnect()
    return task.result()


async def _read_upload(request: Request, limits: ServeLimits,
                       closed: asyncio.Event) -> tuple[bytes, str]:
    """The uploaded bytes and a name for error messages.

    408 when the body takes over ``limits.upload_timeout_s``; 503 when the server starts shutting
    down meanwhile (``closed``), so no request is left unanswered by a slow upload.
    """
    reading, closing = asyncio.ensure_future(_read_body(request)), asyncio.ensure_future(closed.wait())
    try:
        done, _ = await asyncio.wait({reading, closing}, timeout=limits.upload_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        reading.cancel()  # a no-op once it finished
    if reading in done:
        return reading.result()
    if closed.is_set():
        raise shutting_down()
    raise HTTPException(408, f"upload not complete after {limits.upload_timeout_s:g} s: send it "
                             "faster, or raise attncap serve --upload-timeout")


async def _read_body(request: Request) -> tuple[bytes, str]:
    """Multipart field ``image`` or the raw body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=16) as form:
            upload = form.get(FIELD)
            if upload is None or isinstance(upload, str):
                sent = ", ".join(repr(k) for k in form.keys()) or "none"
                raise HTTPException(400, f"no file in form field '{FIELD}' (fields sent: {sent}); "
                                         f"send the picture as {FIELD}=@picture.jpg")
            data, name = await upload.read(), (upload.filename or "<upload>")[:120]
    else:
        data, name = await request.body(), "<request body>"
    if not data:
        raise HTTPException(400, f"empty upload: send an image, as multipart field '{FIELD}' or "
                                 "as the raw request body")
    return data, name


def _response(preds: list[Prediction], size: tuple[int, int], options: CaptionOptions,
              timings: dict, grid: int) -> dict:
    best = preds[0]
    return {"caption": best.caption, "words": best.words, "score": round(float(best.score), 4),
            "attention": np.round(best.attention.astype(np.float64), 4).tolist(), "grid": grid,
            "n_best": [{"caption": p.caption, "score": round(float(p.score), 4)} for p in preds],
            "image": {"width": size[0], "height": size[1]}, "options": options.__dict__,
            "timings": {k: round(float(v), 2) for k, v in timings.items()}}
