"""HTTP server (`dmf serve`, extra `[serve]`): a Starlette app over a MicroBatcher, run by uvicorn.

Endpoints (the route table `ROUTES`; each handler reads what it needs from `request.app.state`)
- `POST /v1/predict`: multipart/form-data with a file field `audio` (any format libsndfile reads)
  and a field `text` (UTF-8; a plain field or a file part). 200: `{"label", "probabilities"}`.
  Errors are JSON `{"error": "..."}` with the status from one table (`ERROR_STATUS`): 400 bad
  audio/text, missing field, malformed multipart; 408 body not received within the request
  timeout; 413 upload over the size limit; 415 not multipart; 422 audio samples or model scores
  that are not finite or out of range; 503 busy, no result within the timeout, or shutting down;
  500 engine failure (the detail goes to the log, never to the client). A bad request never
  affects other requests. A client that disconnects is counted as 499, not as a server error.
- `POST /v1/conversation`: multipart/form-data with file fields `audio` (the recording) and
  `transcript` (.vtt, .srt or .json: its file name's suffix decides) and an optional field `policy`
  (first | windows). 200: `Conversation.to_dict()` (turns, per-speaker summary, warnings). The
  upload limit applies, and `max_recording_seconds`; a bad transcript is a 400 naming the segment,
  one of more than `max_segments` segments a 413 naming the limit. It counts against max_queue and
  runs in a worker thread (segments batched by `Predictor.infer`) under the same deadline as a
  predict: no result within `request_timeout_s` is a 503, and the worker stops at its next batch.
- `GET /healthz`: 200 `{"status": "ok", ...artifact summary}` while serving, 503 when closing.
- `GET /metrics`: JSON by default; Prometheus text exposition with `?format=prometheus`.
  Request counts by status code, batches, batch-size histogram, request latency p50/p99.
- `GET /openapi.json`: the OpenAPI 3.1 document of these endpoints (runtime/openapi.py).
- `WebSocket /v1/stream`, `GET /live`: live audio, one event per utterance, and its page; added by
  runtime/stream.py's `mount` (its limits are the `max_streams` ... `max_unsent_events` options).

Limits (`ServeOptions`): at most `max_queue` predict requests at once (each holds at most one
upload, so upload memory is bounded by max_queue x max_upload_mb; upload parts over 1 MiB spool
to a temp file while they arrive); each has `request_timeout_s` for its body (else 408) and its
result (else 503); a connection gets `header_timeout_s` to send a request's headers (request line
+ headers over MAX_HEADER_BYTES: 431) and is closed after `keep_alive_s` idle. At most
`max_connections` connections are open: past it the connections idle longest between requests
are closed to make room (as nginx reuses keep-alive connections), and only when none is idle does
a new connection's request get 503. Idle connections never count against the work limits, so
/healthz answers while the predict queue has room. On SIGTERM uvicorn stops accepting and
finishes in-flight requests; those still waiting `grace_s` later get 503.

`create_app(predictor, options)` builds the ASGI app (tests use it in-process); `serve()` runs
it under uvicorn. starlette and uvicorn are imported inside the functions that need them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, replace
from typing import Any, Awaitable, Callable

import numpy as np

from dmf import install_hint
from dmf.contract import MAX_CLIP_SECONDS, MIN_CLIP_SECONDS
from dmf.preprocess import AudioError, AudioRangeError, TextError

from .conversation import MAX_RECORDING_SECONDS, POLICIES, TranscriptError, read_transcript
from .batcher import BatcherClosed, MicroBatcher, Overloaded
from .engine import EngineError
from .predictor import InputError, Predictor, ResultError
from .stream import mount as mount_stream
from .stream import ws_protocol

log = logging.getLogger("dmf.runtime.server")

FORM_FIELDS = ("audio", "text")
MAX_PARTS = 8  # form parts parsed before the body is refused (only two are used)
MAX_FIELD_BYTES = 64 * 1024  # a plain (non-file) field; the model reads max_tokens tokens anyway
MAX_HEADER_BYTES = 16 * 1024  # request line + headers: over it, 431 (checked by the app and in h11's buffer)
MAX_SEGMENTS = 10_000  # /v1/conversation segments per request: a 4-hour recording with a cue every 1.5 s
SHUTDOWN_FLUSH_S = 2.0  # uvicorn's own shutdown limit is grace_s + this, so the 503s get written
CLIENT_GONE = 499  # nginx's code for "client closed the request": recorded, never sent


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int | None = None  # requests per batch (capped by dmf.json's max_batch); None: machine_defaults
    max_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first
    workers: int | None = None  # batches run at once; None: machine_defaults (CPU: one per core)
    max_upload_mb: float = 10.0  # request body limit (413 above it)
    max_clip_seconds: float = MAX_CLIP_SECONDS  # longest accepted clip (the model uses the first input_samples)
    min_clip_seconds: float = MIN_CLIP_SECONDS  # shortest accepted clip
    max_recording_seconds: float = MAX_RECORDING_SECONDS  # longest recording for /v1/conversation
    max_queue: int = 64  # predict requests at once (reading, queued or running); one more gets 503
    request_timeout_s: float = 30.0  # per predict request: body within it (else 408), result within it (else 503)
    grace_s: float = 10.0  # on SIGTERM, requests still unanswered this long after get 503
    header_timeout_s: float = 10.0  # a connection must send a request's complete headers within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections; past it the longest-idle keep-alive ones are closed
    max_segments: int = MAX_SEGMENTS  # /v1/conversation: more transcript segments than this is a 413
    # /v1/stream (dmf.runtime.stream; close codes in docs/stream.md)
    max_streams: int = 32  # streams open at once; one more is closed with 1013
    max_stream_seconds: float = 4 * 3600.0  # audio per stream; past it the stream is scored and closed 4413
    max_frame_bytes: int = 256 * 1024  # one WebSocket message; a bigger one closes the stream with 1009
    stream_idle_s: float = 30.0  # a stream that sends nothing this long is closed 4408
    max_unsent_events: int = 256  # events a client has not read; one more closes the stream 4429

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "workers", "max_connections", "max_segments", "max_streams",
                     "max_frame_bytes", "max_unsent_events"):
            value = getattr(self, name)
            if value is None and name in ("max_batch", "workers"):
                continue  # chosen for the machine by resolved()
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} = {value!r} is invalid: expected an integer >= 1")
        # NaN compares false with everything, so each bound is written as "not (valid)"
        for name in ("max_wait_ms", "min_clip_seconds", "grace_s"):
            if not _finite(getattr(self, name)) or not getattr(self, name) >= 0:
                raise ValueError(f"{name} = {getattr(self, name)!r} is invalid: expected a finite number >= 0")
        for name in ("max_upload_mb", "max_clip_seconds", "max_recording_seconds", "request_timeout_s", "header_timeout_s",
                     "keep_alive_s", "max_stream_seconds", "stream_idle_s"):
            if not _finite(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} = {getattr(self, name)!r} is invalid: expected a finite number > 0")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def resolved(self, running: dict[str, Any], cores: int | None = None) -> "ServeOptions":
        """These options with `workers` and `max_batch` left at None set by `machine_defaults`."""
        workers, max_batch = machine_defaults(running, cores)
        return replace(self, workers=self.workers or workers, max_batch=self.max_batch or max_batch)


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "TensorRT")
GPU_MAX_BATCH = 8  # dmf serve's batch on a GPU (TensorRT plans are tuned for it: export.tensorrt.profile_batches)


def machine_defaults(running: dict[str, Any], cores: int | None = None) -> tuple[int, int]:
    """(workers, max_batch) that serve fastest for a predictor running as `running`
    (`Predictor.running()`) on `cores` CPU cores (default: those this process may use).
    On a CPU batching saves nothing for this model (a clip's conv feature encoder costs the same
    alone or batched; past 4 clips more, out of cache), so one worker per core, each with one
    engine thread (`dmf serve` loads the predictor with threads=1), in batches of 2: measured
    against sequential calls in docs/serving.md, "Batching: workers, threads and batch size". On a
    GPU one worker and GPU_MAX_BATCH."""
    if running.get("running_engine") == "trt" or any(p in GPU_PROVIDERS for p in running.get("providers", ())):
        return 1, GPU_MAX_BATCH
    if cores is None:
        from dmf.cpuinfo import cpu_info

        cores = cpu_info().cores
    return max(1, cores), 2


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class HTTPError(Exception):
    """An answer decided by the server itself (status and a message safe to show)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client disconnected before its request was answered."""


# Error -> (status, whether its message may be shown). First match wins, so subclasses come first.
# A 5xx whose message is hidden is logged with its traceback instead.
ERROR_STATUS: tuple[tuple[type[BaseException], int, bool], ...] = (
    (AudioRangeError, 422, True),  # decodable, but NaN / Inf / out-of-range samples
    (ResultError, 422, True),  # the model's scores for this input are not finite
    (AudioError, 400, True),
    (TextError, 400, True),
    (TranscriptError, 400, True),
    (InputError, 400, True),
    (ClientGone, CLIENT_GONE, True),
    (Overloaded, 503, True),
    (BatcherClosed, 503, True),
    (EngineError, 500, False),
)


def error_reply(exc: BaseException) -> tuple[int, str]:
    """(status, message for the client) for an exception raised while answering a request."""
    if isinstance(exc, HTTPError):
        return exc.status, exc.message
    for kind, status, shown in ERROR_STATUS:
        if isinstance(exc, kind):
            if not shown:
                log.error("request failed with %d", status, exc_info=exc)
                return status, "the model could not run on this request (details in the server log)"
            return status, str(exc)
    log.error("internal error", exc_info=exc)
    return 500, "internal error (details in the server log)"


class ServerMetrics:
    """Request counts by status, request latency (successful predicts) and the requests admitted
    now (`in_flight`, limited to max_queue); thread-safe."""

    def __init__(self, window: int = 10000) -> None:
        self.lock = threading.Lock()
        self.by_status: Counter[int] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.in_flight = 0
        self.started = time.time()

    def admit(self, limit: int) -> bool:
        with self.lock:
            if self.in_flight >= limit:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def record(self, status: int, latency_ms: float) -> None:
        with self.lock:
            self.by_status[status] += 1
            if status == 200:
                self.latency_ms.append(latency_ms)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = np.array(self.latency_ms, dtype=np.float64)
            return {
                "uptime_s": time.time() - self.started,
                "requests_total": sum(self.by_status.values()),
                "requests_by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "in_flight": self.in_flight,
                "latency_ms": {"count": int(lat.size),
                               "p50": float(np.percentile(lat, 50)) if lat.size else None,
                               "p99": float(np.percentile(lat, 99)) if lat.size else None},
            }


class Shutdown:
    """Graceful-shutdown state: `begin(grace_s)` when uvicorn starts shutting down; `expired` is set
    once the grace period has passed, and every request still waiting is then answered 503."""

    def __init__(self) -> None:
        self.started = False
        self._expired: asyncio.Event | None = None

    @property
    def expired(self) -> asyncio.Event:
        if self._expired is None:  # created on first use, inside the serving event loop
            self._expired = asyncio.Event()
        return self._expired

    def begin(self, grace_s: float) -> None:
        self.started = True
        asyncio.get_running_loop().call_later(grace_s, self.expired.set)


# ------------------------------------------------------------------------------------ multipart

def _parser_class():
    """Starlette's multipart parser (its limits, spooling and error handling), with one override:
    a plain field that is not UTF-8 is kept as bytes. Starlette decodes such a field as latin-1,
    which would turn a mis-encoded transcript into silent mojibake; kept as bytes, validate_text
    refuses it (tests/test_server.py, case non_utf8)."""
    from starlette.formparsers import MultiPartParser

    class StrictTextParser(MultiPartParser):
        def on_part_end(self) -> None:
            part = self._current_part
            if part.file is None:
                try:
                    bytes(part.data).decode("utf-8")
                except UnicodeDecodeError:
                    self.items.append((part.field_name, bytes(part.data)))
                    return
            super().on_part_end()

    return StrictTextParser


async def _body(request, limit: int):
    """The request body as it arrives, refused (413) past `limit` bytes."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"upload of {int(declared)} bytes is over the {limit} byte limit")
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPError(413, f"upload is over the {limit} byte limit")
            yield chunk
    except ClientDisconnect:
        raise ClientGone("the client disconnected while sending its body") from None


async def read_form(request, limit: int, fields: Callable | None = None,
                    expected: str = "fields 'audio' (file) and 'text'"):
    """A request's multipart body -> `fields(form)`; by default a predict request's (audio as a
    named stream, text as str or raw bytes). `expected` names the fields in the 415 message."""
    from python_multipart.multipart import parse_options_header
    from starlette.formparsers import MultiPartException

    kind, _ = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data":
        raise HTTPError(415, f"expected a multipart/form-data body with {expected}")
    parser = _parser_class()(request.headers, _body(request, limit), max_files=MAX_PARTS,
                             max_fields=MAX_PARTS, max_part_size=MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPError(400, f"malformed multipart body: {exc.message}") from None
    try:
        return await (fields or _form_fields)(form)
    finally:
        await form.close()


async def _conversation_fields(form) -> tuple[io.BytesIO, bytes, str, str]:
    """/v1/conversation's form -> (recording, transcript bytes, transcript file name, policy)."""
    unknown = sorted(set(form.keys()) - {"audio", "transcript", "policy"})
    if unknown or "audio" not in form or "transcript" not in form:
        raise HTTPError(400, f"expected file fields 'audio' and 'transcript' and an optional 'policy'"
                             f"{f', got unknown field(s) {unknown}' if unknown else ''}")
    upload, transcript = form["audio"], form["transcript"]
    if not hasattr(upload, "read") or not hasattr(transcript, "read"):
        raise HTTPError(400, "audio and transcript must be file parts (curl -F audio=@call.wav -F transcript=@call.vtt)")
    policy = form.get("policy", "first")
    if policy not in POLICIES:
        raise HTTPError(400, f"policy {policy!r} is invalid: expected one of {', '.join(POLICIES)}")
    audio = io.BytesIO(await upload.read())
    if not audio.getbuffer().nbytes:
        raise HTTPError(400, "audio: the uploaded file is empty (0 bytes)")
    audio.name = f"audio ({upload.filename})" if upload.filename else "audio"
    return audio, await transcript.read(), transcript.filename or "transcript", policy


async def _form_fields(form) -> tuple[io.BytesIO, str | bytes]:
    missing = [f for f in FORM_FIELDS if f not in form]
    if missing:
        raise HTTPError(400, f"missing form field(s) {', '.join(repr(m) for m in missing)}: send "
                             "multipart/form-data with a file field 'audio' and a field 'text'")
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise HTTPError(400, f"unknown form field(s) {unknown}: expected 'audio' and 'text'")
    for name in FORM_FIELDS:
        if len(form.getlist(name)) > 1:
            raise HTTPError(400, f"field {name!r} given more than once")
    upload, text = form["audio"], form["text"]
    if not hasattr(upload, "read"):
        raise HTTPError(400, "audio: expected a file part (curl -F audio=@clip.wav), got a plain field")
    audio = io.BytesIO(await upload.read())
    if not audio.getbuffer().nbytes:
        raise HTTPError(400, "audio: the uploaded file is empty (0 bytes)")
    audio.name = f"audio ({upload.filename})" if upload.filename else "audio"
    return audio, (await text.read() if hasattr(text, "read") else text)


# ------------------------------------------------------------------------------------- handlers

async def _within(awaitable: Awaitable, deadline: float, shutdown: Shutdown, status: int, message: str) -> Any:
    """Await `awaitable` until `deadline` (time.monotonic) or the end of the shutdown grace period.
    Past either it is cancelled (a queued request is then skipped by the batcher) and the request
    is answered `status` / 503."""
    task = asyncio.ensure_future(awaitable)
    stop = asyncio.ensure_future(shutdown.expired.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if stop in done:
        raise HTTPError(503, "the server is shutting down; retry on another instance or later")
    raise HTTPError(status, message)


async def _predict(request) -> dict:
    state = request.app.state
    opts: ServeOptions = state.options
    deadline = time.monotonic() + opts.request_timeout_s
    top_k = _top_k(request.query_params.get("top_k"), len(state.predictor.labels))
    audio, text = await _within(read_form(request, opts.max_upload_bytes), deadline, state.shutdown, 408,
                                f"request body not received within {opts.request_timeout_s:g} s")
    truncated = state.predictor.is_truncated(audio)  # header only, before the batcher reads the upload
    future = state.batcher.submit(audio, text)
    result = await _within(asyncio.wrap_future(future), deadline, state.shutdown, 503,
                           f"no result within {opts.request_timeout_s:g} s; the server is overloaded")
    return {**result.to_dict(), "truncated": truncated, **({"top_k": result.top(top_k)} if top_k else {})}


def _top_k(value: str | None, n_labels: int) -> int | None:
    """The query's top_k: None when absent, else an integer 1..n_labels (400 otherwise)."""
    if value is None:
        return None
    if not value.isdigit() or not 1 <= int(value) <= n_labels:
        raise HTTPError(400, f"query parameter top_k = {value[:20]!r} is invalid: expected an integer 1..{n_labels}")
    return int(value)


class _Abandoned(Exception):
    """Raised inside a conversation's worker thread once its request has been answered (deadline
    or shutdown): the worker stops at its next batch instead of running on for nobody."""


async def _conversation(request) -> dict:
    state = request.app.state
    opts: ServeOptions = state.options
    deadline = time.monotonic() + opts.request_timeout_s
    audio, raw, name, policy = await _within(
        read_form(request, opts.max_upload_bytes, _conversation_fields, "file fields 'audio' and 'transcript'"),
        deadline, state.shutdown, 408, f"request body not received within {opts.request_timeout_s:g} s")
    abandoned = threading.Event()

    def stop_if_abandoned(_done: int) -> None:
        if abandoned.is_set():
            raise _Abandoned()

    def work():  # off the event loop: a large transcript takes a while to parse, every segment to run
        segments = read_transcript(raw, name=name)
        if len(segments) > opts.max_segments:
            raise HTTPError(413, f"{name}: {len(segments)} segments, over this server's limit of "
                                 f"{opts.max_segments} per request; split the recording")
        return state.predictor.predict_conversation(audio, segments, policy=policy, name=name,
                                                    max_recording_seconds=opts.max_recording_seconds,
                                                    progress=stop_if_abandoned)

    try:
        result = await _within(asyncio.to_thread(work), deadline, state.shutdown, 503,
                               f"no result within {opts.request_timeout_s:g} s; send a shorter recording "
                               "(fewer segments) or retry later")
    finally:
        abandoned.set()
    return result.to_dict()


def _json(status: int, payload: Any):
    from starlette.responses import JSONResponse

    # 408/413/431/499: the body may be unread; closing stops a trickling client from holding the connection.
    headers = {"connection": "close"} if status in (408, 413, 431, CLIENT_GONE) else None
    return JSONResponse(payload, status_code=status, headers=headers)


async def predict_route(request):
    """POST /v1/predict: admission (max_queue), then the form, the batcher, and one counted answer."""
    return await _answer(request, _predict)


async def conversation_route(request):
    """POST /v1/conversation: admission (max_queue), the form, every segment, one counted answer."""
    return await _answer(request, _conversation)


async def _answer(request, work: Callable[[Any], Awaitable[dict]]):
    state = request.app.state
    t0 = time.perf_counter()
    if not state.metrics.admit(state.options.max_queue):
        status, payload = 503, {"error": f"server busy: {state.options.max_queue} requests in progress; retry later"}
    else:
        try:
            status, payload = 200, await work(request)
        except Exception as exc:  # every error becomes a JSON answer; none reaches the client raw
            status, message = error_reply(exc)
            payload = {"error": message}
        finally:
            state.metrics.release()
    state.metrics.record(status, (time.perf_counter() - t0) * 1000.0)
    return _json(status, payload)


async def health_route(request):
    """GET /healthz: 503 while shutting down; the artifact is named by its folder, not its path."""
    state = request.app.state
    if state.batcher.closed or state.shutdown.started:
        return _json(503, {"error": "shutting down"})
    summary = {**state.predictor.artifact.summary(), "path": state.predictor.artifact.path.name}
    return _json(200, {"status": "ok", **summary, **state.predictor.running()})


async def metrics_route(request):
    """GET /metrics[?format=json|prometheus]."""
    from starlette.responses import PlainTextResponse

    state = request.app.state
    server, batch = state.metrics.snapshot(), state.batcher.stats.snapshot()
    fmt = request.query_params.get("format", "json")
    if fmt == "prometheus":
        return PlainTextResponse(prometheus_text(server, batch, state.batcher.queue_depth()),
                                 media_type="text/plain; version=0.0.4")
    if fmt != "json":
        return _json(400, {"error": f"format {fmt!r} is invalid: expected json or prometheus"})
    return _json(200, {**server, "queue_depth": state.batcher.queue_depth(), "batcher": batch,
                       "streams": state.streams.snapshot(), "options": asdict(state.options)})


async def openapi_route(request):
    """GET /openapi.json: this server's OpenAPI 3.1 document (dmf.runtime.openapi)."""
    from dmf import __version__

    from .openapi import document

    state = request.app.state
    return _json(200, document(state.predictor.labels, state.options.max_upload_mb, __version__))


# (method, path, handler): add a route here, and its operation to runtime/openapi.py (tests/test_openapi.py
# checks both ways); handlers take the request and read app.state.
ROUTES: list[tuple[str, str, Callable]] = [
    ("POST", "/v1/predict", predict_route),
    ("POST", "/v1/conversation", conversation_route),
    ("GET", "/healthz", health_route),
    ("GET", "/metrics", metrics_route),
    ("GET", "/openapi.json", openapi_route),
]


# ------------------------------------------------------------------------------------ prometheus

def prometheus_text(server: dict, batcher: dict, queue_depth: int) -> str:
    lines = ["# HELP dmf_requests_total Prediction requests by HTTP status.",
             "# TYPE dmf_requests_total counter"]
    for code, n in server["requests_by_status"].items():
        lines.append(f'dmf_requests_total{{code="{code}"}} {n}')
    lines += ["# HELP dmf_batches_total Batches run by the micro-batcher.", "# TYPE dmf_batches_total counter",
              f"dmf_batches_total {batcher['batches']}",
              "# HELP dmf_batch_size Requests per batch.", "# TYPE dmf_batch_size histogram"]
    hist = {int(k): v for k, v in batcher["batch_size_histogram"].items()}
    bounds = [1, 2, 4, 8, 16, 32, 64, 128]
    for b in bounds:
        lines.append(f'dmf_batch_size_bucket{{le="{b}"}} {sum(v for k, v in hist.items() if k <= b)}')
    lines.append(f'dmf_batch_size_bucket{{le="+Inf"}} {sum(hist.values())}')
    lines.append(f"dmf_batch_size_sum {sum(k * v for k, v in hist.items())}")
    lines.append(f"dmf_batch_size_count {sum(hist.values())}")
    lines += ["# HELP dmf_request_latency_ms Latency of successful predictions (recent window).",
              "# TYPE dmf_request_latency_ms summary"]
    lat = server["latency_ms"]
    for q, key in (("0.5", "p50"), ("0.99", "p99")):
        if lat[key] is not None:
            lines.append(f'dmf_request_latency_ms{{quantile="{q}"}} {lat[key]:.3f}')
    lines.append(f"dmf_request_latency_ms_count {lat['count']}")
    lines += ["# TYPE dmf_in_flight_requests gauge", f"dmf_in_flight_requests {server['in_flight']}",
              "# TYPE dmf_queue_depth gauge", f"dmf_queue_depth {queue_depth}",
              "# TYPE dmf_rejected_total counter", f"dmf_rejected_total {batcher['rejected']}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- app

def request_head_bytes(scope: dict) -> int:
    """The size of a request's request line and headers as sent (HTTP/1.1 framing)."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + (len(scope["query_string"]) + 1
                                                                     if scope.get("query_string") else 0)
    line = len(scope["method"]) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"]) + 2


class HeaderLimit:
    """ASGI middleware: a request whose request line + headers exceed `limit` bytes gets 431.
    (h11 limits only a buffer of incomplete headers; complete headers that arrive in one read of
    up to 256 KiB would otherwise pass.)"""

    def __init__(self, app, metrics: ServerMetrics, limit: int = MAX_HEADER_BYTES) -> None:
        self.app, self.metrics, self.limit = app, metrics, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (size := request_head_bytes(scope)) > self.limit:
            self.metrics.record(431, 0.0)
            reply = _json(431, {"error": f"request line and headers are {size} bytes, over the {self.limit} byte limit"})
            await reply(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(predictor: Predictor, options: ServeOptions | None = None):
    """The ASGI app: `ROUTES` over app.state (predictor, batcher, metrics, options, shutdown)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    opts = (options or ServeOptions()).resolved(predictor.running())
    metrics = ServerMetrics()

    def preprocess(audio, text, sample_rate=None):  # a rate for /v1/stream's 16 kHz arrays
        return predictor.preprocess(audio, text, sample_rate, min_clip_seconds=opts.min_clip_seconds,
                                    max_clip_seconds=opts.max_clip_seconds)

    batcher = MicroBatcher(predictor, max_batch=opts.max_batch, max_wait_ms=opts.max_wait_ms,
                           workers=opts.workers, preprocess_fn=preprocess, max_queue=opts.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has answered the in-flight requests by now; drain anything still queued.
        await asyncio.to_thread(batcher.close)
        app.state.stream_pool.shutdown(wait=False)  # /v1/stream's idle worker threads

    async def http_error(request, exc: HTTPException):  # 404 / 405 from the router, as JSON
        return _json(exc.status_code, {"error": str(exc.detail)})

    app = Starlette(routes=[Route(path, handler, methods=[method]) for method, path, handler in ROUTES],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan,
                    middleware=[Middleware(HeaderLimit, metrics=metrics)])
    app.state.predictor, app.state.batcher, app.state.options = predictor, batcher, opts
    app.state.metrics, app.state.shutdown = metrics, Shutdown()
    mount_stream(app)  # /v1/stream and the /live page
    return app


# ---------------------------------------------------------------------------------------- uvicorn

REFUSED_HEADER_TIMEOUT_S = 1.0  # a connection refused at the cap gets this long to send the request its 503 answers


def _head_error(too_long: bool) -> tuple[int, bytes]:
    """(status, raw HTTP response) for a request head h11 refused: 431 over MAX_HEADER_BYTES, else 400."""
    status = 431 if too_long else 400
    message = (f"request line and headers are over the {MAX_HEADER_BYTES} byte limit" if too_long
               else "malformed HTTP request")
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {'Request Header Fields Too Large' if too_long else 'Bad Request'}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return status, head.encode() + body


def _make_room(new, connections, cap: int) -> bool:
    """Close the longest-idle connections until `new` fits under `cap` open connections; False if
    it cannot (every other connection is busy)."""
    open_now = [c for c in connections if not c.transport.is_closing()]
    excess = len(open_now) - cap
    if excess <= 0:
        return True
    idle = sorted((c for c in open_now if c is not new and getattr(c, "_idle_since", None) is not None),
                  key=lambda c: c._idle_since)
    for conn in idle[:excess]:
        conn._shed()
    return len(idle) >= excess


# The protocol dmf serve runs under uvicorn (_protocol):
# Header deadline: a connection must deliver each request's complete headers within
# `header_timeout_s` of opening or of its first byte after the previous response; else it is
# closed. (uvicorn alone waits for ever on a client that sends nothing, or a header byte a second;
# its keep-alive timer only covers idle time after a response.)
# Connection cap: uvicorn's own limit (limit_concurrency) counts idle keep-alive connections, so
# clients that keep a connection open after their request fill it and every new client, liveness
# probes included, gets 503 while the server has nothing to do. Instead, when a new connection
# takes the count past `max_connections`, the connections idle longest between requests are closed
# (an idle keep-alive connection may be closed at any time, RFC 9112 9.8; clients reconnect). Only
# when no connection is idle does the new one get 503 for its request, and it is closed. Work is
# limited by the app (max_queue), not by counting connections.


class _HeaderDeadline:
    """The header-deadline timer, mixed into the h11 protocol (uses its loop, cycle, transport)."""

    _header_timer: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._header_timer = self.loop.call_later(seconds, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.get_protocol() is not self:  # upgraded to a WebSocket, which has its own deadlines
            return
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def _at_capacity_app(cap: int, metrics: ServerMetrics):
    """The ASGI app a connection refused at the cap runs: 503 JSON, then the connection closes."""
    async def at_capacity(scope, receive, send) -> None:
        metrics.record(503, 0.0)
        reply = _json(503, {"error": f"server at its limit of {cap} open connections, none idle; retry later"})
        reply.headers["connection"] = "close"
        await reply(scope, receive, send)
    return at_capacity


def _capacity_reply(cap: int) -> bytes:
    """The raw 503 a WebSocket handshake refused at the connection cap gets."""
    body = json.dumps({"error": f"server at its limit of {cap} open connections, none idle; retry later"}).encode()
    return (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def _answer_and_close(transport, metrics: ServerMetrics, status: int, raw: bytes) -> None:
    """A reply the server wrote itself (no app ran), counted in /metrics; then the connection closes."""
    metrics.record(status, 0.0)
    transport.write(raw)
    transport.close()


def _protocol(opts: ServeOptions, metrics: ServerMetrics):
    """uvicorn's h11 protocol with a header deadline, a connection cap that sheds idle keep-alive
    connections first, and JSON answers to malformed or oversized request heads (see above)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    cap, header_timeout_s = opts.max_connections, opts.header_timeout_s
    at_capacity = _at_capacity_app(cap, metrics)

    class DMFProtocol(_HeaderDeadline, H11Protocol):
        _idle_since: float | None = None  # set while idle between requests (after a response)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            refused = not self._make_room()
            if refused:
                self.app = at_capacity  # this connection's request gets 503, then the connection closes
            self._arm(REFUSED_HEADER_TIMEOUT_S if refused else header_timeout_s)

        def data_received(self, data: bytes) -> None:
            self._idle_since = None
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in: the request deadline takes over
            elif self._header_timer is None:
                self._arm(header_timeout_s)  # bytes of the next request's headers

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._idle_since = time.monotonic()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, event) -> None:
            """A WebSocket handshake on a connection refused at the cap gets the 503 (not the upgrade)."""
            if self.app is at_capacity:
                return _answer_and_close(self.transport, metrics, 503, _capacity_reply(cap))
            super().handle_websocket_upgrade(event)

        def send_400_response(self, msg: str) -> None:
            """h11 refused the request head: 431 when its buffer of incomplete headers outgrew
            MAX_HEADER_BYTES, else 400; JSON like every other error, and the connection closes."""
            _answer_and_close(self.transport, metrics, *_head_error(len(self.conn.trailing_data[0]) > MAX_HEADER_BYTES))

        def _make_room(self) -> bool:
            return _make_room(self, self.connections, cap)

        def _shed(self) -> None:
            self._idle_since = None
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_handler()  # h11's close of an idle connection

    return DMFProtocol


def serve(predictor: Predictor, options: ServeOptions | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM; in-flight requests get `grace_s` to finish,
    then 503."""
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError(f"the server needs the [serve] extra: `{install_hint('serve')}`") from None
    opts = options or ServeOptions()
    app = create_app(predictor, opts)

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.shutdown.begin(opts.grace_s)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=_protocol(opts, app.state.metrics),  # header deadline, connection cap
                            timeout_keep_alive=opts.keep_alive_s, limit_concurrency=None,
                            ws=ws_protocol(), ws_max_size=opts.max_frame_bytes + 1, ws_per_message_deflate=False,
                            timeout_graceful_shutdown=opts.grace_s + SHUTDOWN_FLUSH_S,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    try:
        GracefulServer(config).run()
    finally:
        app.state.batcher.close()
