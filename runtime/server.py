"""HTTP server (`dmf serve`, extra `[serve]`): FastAPI app over a MicroBatcher.

Endpoints
- `POST /v1/predict`: multipart/form-data with a file field `audio` (any format libsndfile reads)
  and a field `text` (UTF-8; a plain field or a file part). 200: `{"label", "probabilities"}`.
  Errors are JSON `{"error": "..."}`: 400 bad audio/text/missing field/malformed multipart,
  413 upload over the size limit, 415 not multipart, 503 overloaded or shutting down,
  500 engine failure. A bad request never affects other requests.
- `GET /healthz`: 200 `{"status": "ok", ...artifact summary}` while serving, 503 when closing.
- `GET /metrics`: JSON by default; Prometheus text exposition with `?format=prometheus`.
  Request counts by status code, batches, batch-size histogram, request latency p50/p99.

`create_app(predictor, options)` builds the ASGI app; tests use it in-process and under uvicorn.
The batcher is created with the app and closed (drained) in the lifespan shutdown, which uvicorn
runs after it has finished the in-flight requests. fastapi is imported inside create_app.
"""

import asyncio
import io
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .batcher import BatcherClosed, MicroBatcher, Overloaded
from .engines import EngineError
from .predictor import INPUT_ERRORS, Predictor

MAX_PARTS = 8


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 8  # requests per batch (capped by dmf.json's max_batch)
    max_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first
    workers: int = 1  # batches run at once (CPU: 2 workers x 1 onnxruntime thread uses 2 cores)
    max_upload_mb: float = 10.0  # request body limit (413 above it)
    max_audio_seconds: float = 60.0  # longest accepted clip (the model uses the first input_samples)
    min_audio_seconds: float = 0.1  # shortest accepted clip
    max_queue: int = 1024  # queued requests before 503
    request_timeout_s: float = 60.0  # a request waiting longer than this for its result gets 503

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} is invalid: expected an integer >= 1")
        for name in ("max_wait_ms", "min_audio_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)} is invalid: expected >= 0")
        for name in ("max_upload_mb", "max_audio_seconds", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} is invalid: expected > 0")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ServerMetrics:
    """Request counts by status and request latency (successful predicts), thread-safe."""

    def __init__(self, window: int = 10000) -> None:
        self.lock = threading.Lock()
        self.by_status: Counter[int] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.in_flight = 0
        self.started = time.time()

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


# ------------------------------------------------------------------------------------ multipart

def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data body -> {field name: (filename or None, raw bytes)}. Raw bytes, so a
    non-UTF-8 transcript is reported as such instead of being decoded as latin-1."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise HTTPError(415, "expected a multipart/form-data body with fields 'audio' (file) and 'text'")
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPError(400, "malformed multipart body: no boundary in the Content-Type header")

    parts: dict[str, tuple[str | None, bytes]] = {}
    state: dict[str, Any] = {"headers": [], "name": b"", "value": b"", "data": bytearray(), "count": 0}

    def on_part_begin() -> None:
        state.update(headers=[], data=bytearray(), disposition=b"")
        state["count"] += 1
        if state["count"] > MAX_PARTS:
            raise HTTPError(400, f"too many form fields (more than {MAX_PARTS})")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["name"].lower() == b"content-disposition":
            state["disposition"] = state["value"]
        state["name"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        _, opts = parse_options_header(state.get("disposition", b""))
        name = opts.get(b"name")
        if name is None:
            raise HTTPError(400, "malformed multipart body: a part has no Content-Disposition name")
        filename = opts.get(b"filename")
        key = name.decode("utf-8", errors="replace")
        if key in parts:
            raise HTTPError(400, f"field {key!r} given more than once")
        parts[key] = (filename.decode("utf-8", errors="replace") if filename is not None else None,
                      bytes(state["data"]))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except HTTPError:
        raise
    except Exception as exc:  # python-multipart's MultipartParseError and friends
        raise HTTPError(400, f"malformed multipart body: {str(exc) or type(exc).__name__}") from None
    return parts


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"upload of {int(declared)} bytes is over the {limit} byte limit")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise HTTPError(413, f"upload is over the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


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

def create_app(predictor: Predictor, options: ServeOptions | None = None):
    """The ASGI app: a FastAPI instance with its own MicroBatcher (app.state.batcher)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    opts = options or ServeOptions()

    def preprocess(audio, text):
        return predictor.preprocess(audio, text, min_seconds=opts.min_audio_seconds,
                                    max_seconds=opts.max_audio_seconds)

    batcher = MicroBatcher(predictor, max_batch=opts.max_batch, max_wait_ms=opts.max_wait_ms,
                           workers=opts.workers, preprocess_fn=preprocess, max_queue=opts.max_queue)
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has finished the in-flight requests by now; drain anything still queued.
        batcher.close()

    app = FastAPI(title="dmf", summary="Dual Memory Fusion speech emotion recognition", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.predictor = predictor
    app.state.metrics = metrics
    app.state.options = opts

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    async def _predict(request: Request) -> dict:
        body = await _read_body(request, opts.max_upload_bytes)
        parts = parse_multipart(body, request.headers.get("content-type", ""))
        missing = [f for f in ("audio", "text") if f not in parts]
        if missing:
            raise HTTPError(400, f"missing form field(s) {', '.join(repr(m) for m in missing)}: send "
                                 "multipart/form-data with a file field 'audio' and a field 'text'")
        unknown = sorted(set(parts) - {"audio", "text"})
        if unknown:
            raise HTTPError(400, f"unknown form field(s) {unknown}: expected 'audio' and 'text'")
        filename, audio_bytes = parts["audio"]
        if not audio_bytes:
            raise HTTPError(400, "audio: the uploaded file is empty (0 bytes)")
        audio = io.BytesIO(audio_bytes)
        audio.name = f"audio ({filename})" if filename else "audio"
        try:
            future = batcher.submit(audio, parts["text"][1])
        except (Overloaded, BatcherClosed) as exc:
            raise HTTPError(503, str(exc)) from None

        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), opts.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(503, f"no result within {opts.request_timeout_s} s; the server is overloaded") from None
        except INPUT_ERRORS as exc:
            raise HTTPError(400, str(exc)) from None
        except EngineError as exc:
            raise HTTPError(500, str(exc)) from None
        return result.to_dict()

    @app.post("/v1/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        with metrics.lock:
            metrics.in_flight += 1
        try:
            payload, status = await _predict(request), 200
        except HTTPError as exc:
            payload, status = {"error": exc.message}, exc.status
        except Exception as exc:  # never a traceback to the client, never a crash
            payload, status = {"error": f"internal error: {type(exc).__name__}: {exc}"}, 500
        finally:
            with metrics.lock:
                metrics.in_flight -= 1
        metrics.record(status, (time.perf_counter() - t0) * 1000.0)
        return JSONResponse(payload, status_code=status)

    @app.get("/healthz")
    async def healthz():
        if batcher.closed:
            return error(503, "shutting down")
        return {"status": "ok", "providers": predictor.engine.providers, **predictor.artifact.summary()}

    @app.get("/metrics")
    async def metrics_endpoint(format: str = "json"):
        server, batch = metrics.snapshot(), batcher.stats.snapshot()
        if format == "prometheus":
            return PlainTextResponse(prometheus_text(server, batch, batcher.queue_depth()),
                                     media_type="text/plain; version=0.0.4")
        if format != "json":
            return error(400, f"format {format!r} is invalid: expected json or prometheus")
        return {**server, "queue_depth": batcher.queue_depth(), "batcher": batch,
                "options": asdict(opts)}

    return app


def serve(predictor: Predictor, options: ServeOptions | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", graceful_timeout_s: float = 30.0) -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM; in-flight requests finish first."""
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("the server needs the [serve] extra: `pip install dmf[serve]`") from None
    app = create_app(predictor, options)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s)
    finally:
        app.state.batcher.close()
