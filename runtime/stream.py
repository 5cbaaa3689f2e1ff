"""`/v1/stream` (a WebSocket) and the `/live` page of `dmf serve`: emotions while people speak.

The protocol (docs/stream.md): the client's first message is JSON
`{"type": "start", "format": {"sample_rate", "channels", "sample_format"}, "options": {...}}`;
the server answers `{"type": "ready", ...}`. Then binary messages carry PCM in that format, and
JSON messages carry texts (`{"type": "text", "utterance_id": N, "text": "..."}`) or end the
stream (`{"type": "end"}`: every pending utterance is scored, then the server closes with 1000).
The server sends the `LiveSession`'s events as JSON (`speech_started`, `utterance`) and
`{"type": "error", "message": ...}` for a message it cannot use.

Each stream owns one `LiveSession` (dmf.runtime.live). Its calls run in a worker thread (they cut
and score utterances synchronously), and scoring goes through the server's micro-batcher, so
streams and HTTP requests share batches. Per stream, memory is bounded by the session's own bound,
one received message (uvicorn stops reading until the app takes it) and `max_unsent_events`
events waiting to be sent. Every limit ends the stream with a close code and a reason (CLOSE_CODES);
a reason longer than a close frame allows (123 bytes) is sent whole in an error event first.

`mount(app)` adds the routes and the stream counter to the Starlette app that server.create_app
builds; `ws_protocol()` is the WebSocket protocol `serve()` gives uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dmf.contract import MAX_TEXT_CHARS
from dmf.errors import first_line

from .batcher import BatcherClosed, Overloaded
from .live import LiveEvent, LiveOptions, LiveSession, StreamFormat, UnknownUtterance
from .prediction import Prediction

log = logging.getLogger("dmf.runtime.stream")

STATIC = Path(__file__).parent / "static"
# The page's files: name -> media type (an AudioWorklet module must be served as JavaScript).
PAGE_FILES = {"live.js": "text/javascript", "pcm-worklet.js": "text/javascript", "live.css": "text/css"}

# Close codes (RFC 6455 section 7.4; 4xxx are this application's, mirroring the HTTP status).
NORMAL, GOING_AWAY, INVALID_DATA, POLICY, TOO_BIG, INTERNAL, TRY_LATER = 1000, 1001, 1007, 1008, 1009, 1011, 1013
IDLE, TOO_LONG, SLOW_CONSUMER = 4408, 4413, 4429
CLOSE_CODES = {
    NORMAL: "the client sent {'type': 'end'}: every utterance was scored and sent",
    GOING_AWAY: "the server is shutting down",
    INVALID_DATA: "audio the session cannot use (NaN / Inf or out-of-range float samples)",
    POLICY: "a bad start message (format or options), or audio before it",
    TOO_BIG: "a message over max_frame_bytes",
    INTERNAL: "the model or the server failed (details in the server log)",
    TRY_LATER: "max_streams streams are open, or scoring is overloaded; retry later",
    IDLE: "nothing received for stream_idle_s",
    TOO_LONG: "the stream's audio passed max_stream_seconds (what came before is scored and sent)",
    SLOW_CONSUMER: "the client left max_unsent_events events unread",
}
# Options a client may set in its start message; max_pending stays the server's (memory bound).
CLIENT_OPTIONS = ("threshold", "min_speech_s", "min_silence_s", "speech_pad_s", "end_pad_s", "max_utterance_s", "text_wait_s",
                  "empty_text", "placeholder_text", "aggressiveness")
MAX_REASON_BYTES = 123  # a close frame's payload is 125 bytes, 2 of them the code
POLL_S = 0.1  # how often a quiet stream with utterances waiting for text is polled
CLOSE_S = 5.0  # how long queued events and the close frame get to reach a client before it is dropped
SCORE_RETRY_S = 0.01  # wait before resubmitting to a full batcher queue


class StreamStats:
    """Streams open now, streams served, and closes by code. Used on the event loop only."""

    def __init__(self) -> None:
        self.open = 0
        self.total = 0
        self.closes: Counter[int] = Counter()

    def admit(self, limit: int) -> bool:
        if self.open >= limit:
            return False
        self.open += 1
        self.total += 1
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"open": self.open, "total": self.total,
                "closes_by_code": {str(k): v for k, v in sorted(self.closes.items())}}


class _Close(Exception):
    """End the stream with `code`; `drain`: queued events are sent before the close frame."""

    def __init__(self, code: int, reason: str, drain: bool = True) -> None:
        super().__init__(reason)
        self.code, self.reason, self.drain = code, reason, drain


class _Gone(Exception):
    """The client disconnected (or the server closed the socket while shutting down)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code  # the client's close code; 1005 / 1006 when it sent none


def close_reason(text: str) -> str:
    """`text` cut to fit a close frame (123 bytes of UTF-8), on a character boundary."""
    raw = " ".join(text.split()).encode()
    return raw[:MAX_REASON_BYTES].decode(errors="ignore")


def scorer(batcher, timeout_s: float) -> Callable[[np.ndarray, str], Prediction]:
    """score(samples 16 kHz float32 (n,), text) through the server's batcher. Called from a worker
    thread; a full batcher queue is retried (the stream waits, as a client would) until `timeout_s`."""
    def score(samples: np.ndarray, text: str) -> Prediction:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                future = batcher.submit(samples, text, 16000)
                break
            except Overloaded:
                if time.monotonic() > deadline:
                    raise
                time.sleep(SCORE_RETRY_S)
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    return score


def live_options(requested: Any, window_s: float) -> LiveOptions:
    """The start message's `options` -> LiveOptions. max_utterance_s defaults to the model's window
    and may not pass it: the model scores a longer utterance on its first window only, and the
    session holds max_pending + 1 utterances of up to that length. ValueError names the bad field."""
    if not isinstance(requested, dict):
        raise ValueError(f"options: expected an object, got {type(requested).__name__}")
    unknown = sorted(set(requested) - set(CLIENT_OPTIONS))
    if unknown:
        raise ValueError(f"options: unknown field(s) {unknown}: expected some of {', '.join(CLIENT_OPTIONS)}")
    placeholder = requested.get("placeholder_text")
    if isinstance(placeholder, str) and len(placeholder) > MAX_TEXT_CHARS:  # it rides on every event
        raise ValueError(f"placeholder_text is {len(placeholder)} characters: expected at most {MAX_TEXT_CHARS}")
    chosen = {"max_utterance_s": window_s, **requested}
    cap = chosen["max_utterance_s"]
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > window_s:
        raise ValueError(f"max_utterance_s {cap!r} is invalid: at most the model's window, {window_s:g} s")
    try:
        return LiveOptions(**chosen)
    except TypeError as exc:  # a field of the wrong kind that the dataclass trips over
        raise ValueError(f"options: {first_line(exc)}") from None


# ------------------------------------------------------------------------------------- a stream

class _Stream:
    """One WebSocket stream: the receive loop (this task) and a sender task over a bounded queue."""

    def __init__(self, websocket, state) -> None:
        self.ws, self.state, self.opts = websocket, state, state.options
        self.out: asyncio.Queue = asyncio.Queue(maxsize=self.opts.max_unsent_events)
        self.session: LiveSession | None = None
        self.bytes_per_second = 0  # of the client's PCM, once the format is known
        self.received = 0  # PCM bytes so far
        self.idle_until = time.monotonic() + self.opts.stream_idle_s

    async def run(self) -> int:
        """Serve the stream to its end; its close code (the client's, when it closed first)."""
        sender = asyncio.create_task(self._send_loop())
        try:
            await self._start()
            while True:
                await self._step()
        except _Close as close:
            await self._close(sender, close)
            return close.code
        except _Gone as gone:
            return gone.code
        finally:
            sender.cancel()

    # ---------------------------------------------------------------------------- receiving
    async def _receive(self) -> dict | None:
        """The next message, None when the idle deadline or a poll comes first."""
        wait = self.idle_until - time.monotonic()
        if self.session is not None and self.session.pending:
            wait = min(wait, POLL_S)  # utterances waiting for text: their deadline may pass
        try:
            message = await asyncio.wait_for(self.ws.receive(), max(0.0, wait))
        except asyncio.TimeoutError:
            if time.monotonic() >= self.idle_until:
                raise _Close(IDLE, f"nothing received for {self.opts.stream_idle_s:g} s") from None
            return None
        if message["type"] == "websocket.disconnect":
            raise _Gone(message.get("code", 1006))
        self.idle_until = time.monotonic() + self.opts.stream_idle_s
        return message

    async def _start(self) -> None:
        message = await self._receive()
        if message is None:
            raise _Close(IDLE, "no start message")
        try:
            start = json.loads(message["text"]) if message.get("text") is not None else None
        except json.JSONDecodeError:
            start = None
        if not isinstance(start, dict) or start.get("type") != "start":
            raise _Close(POLICY, 'the first message must be JSON {"type": "start", "format": {...}, "options": {...}}')
        unknown = sorted(set(start) - {"type", "format", "options"})
        artifact = self.state.predictor.artifact
        try:
            if unknown:
                raise ValueError(f"start: unknown field(s) {unknown}: expected type, format, options")
            fmt = StreamFormat.from_dict(start.get("format", {}))
            options = live_options(start.get("options", {}), artifact.input_samples / artifact.sample_rate)
            self.session = LiveSession(scorer(self.state.batcher, self.opts.request_timeout_s), fmt, options)
        except ValueError as exc:
            raise _Close(POLICY, first_line(exc)) from None
        except ImportError as exc:  # webrtcvad missing: an install problem, said in the reason
            raise _Close(INTERNAL, first_line(exc)) from None
        self.bytes_per_second = fmt.frame_bytes * fmt.sample_rate
        self._emit({"type": "ready", "labels": list(artifact.labels), "format": asdict(fmt),
                    "options": asdict(options), "limits": self._limits()})

    def _limits(self) -> dict[str, Any]:
        o = self.opts
        return {"max_frame_bytes": o.max_frame_bytes, "max_stream_seconds": o.max_stream_seconds,
                "stream_idle_s": o.stream_idle_s, "max_unsent_events": o.max_unsent_events}

    async def _step(self) -> None:
        message = await self._receive()
        if message is None:
            self._emit_events(await self._call(self.session.poll))
        elif message.get("bytes") is not None:
            await self._audio(message["bytes"])
        elif message.get("text") is not None:
            await self._message(message["text"])

    def _check_size(self, size: int) -> None:
        if size > self.opts.max_frame_bytes:
            raise _Close(TOO_BIG, f"a {size} byte message is over the {self.opts.max_frame_bytes} byte limit")

    async def _audio(self, pcm: bytes) -> None:
        self._check_size(len(pcm))
        self.received += len(pcm)
        if self.received > self.opts.max_stream_seconds * self.bytes_per_second:
            self._emit_events(await self._call(self.session.finish))
            raise _Close(TOO_LONG, f"the stream passed its {self.opts.max_stream_seconds:g} s of audio")
        self._emit_events(await self._call(self.session.feed, pcm))

    async def _message(self, text: str) -> None:
        """A JSON message after the start: a text, or the end. Anything else: an error event."""
        self._check_size(len(text.encode()))
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            return self._error(f"a text message must be JSON: {exc}")
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "end":
            self._emit_events(await self._call(self.session.finish))
            raise _Close(NORMAL, "end of stream")
        if kind != "text":
            return self._error(f'message type {kind!r} is unknown: expected "text" or "end"')
        uid, words = message.get("utterance_id"), message.get("text")
        if isinstance(uid, bool) or not isinstance(uid, int) or not isinstance(words, str):
            return self._error('a text message needs "utterance_id" (an integer) and "text" (a string)', uid)
        try:  # cut as the model's preprocessing cuts it; the event carries it, so this bounds events too
            self._emit_events(await self._call(self.session.provide_text, uid, words[:MAX_TEXT_CHARS]))
        except (UnknownUtterance, ValueError) as exc:
            self._error(first_line(exc), uid)

    async def _call(self, fn: Callable, *args: Any) -> Any:
        """A session call in the streams' worker pool; its failures end the stream."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.state.stream_pool, fn, *args)
        except UnknownUtterance:  # provide_text: the caller answers it with an error event
            raise
        except ValueError as exc:  # feed: samples the session refuses (NaN, out of range)
            raise _Close(INVALID_DATA, first_line(exc)) from None
        except BatcherClosed:
            raise _Close(GOING_AWAY, "the server is shutting down") from None
        except (Overloaded, TimeoutError) as exc:
            raise _Close(TRY_LATER, f"scoring is overloaded ({first_line(exc)}); retry later") from None
        except Exception:
            log.exception("live stream failed")
            raise _Close(INTERNAL, "the model could not score this stream (details in the server log)") from None

    # ------------------------------------------------------------------------------ sending
    def _emit(self, payload: dict) -> None:
        try:
            self.out.put_nowait(payload)
        except asyncio.QueueFull:
            raise _Close(SLOW_CONSUMER, f"{self.out.maxsize} events unread: the client does not read",
                         drain=False) from None

    def _emit_events(self, events: list[LiveEvent]) -> None:
        for event in events:
            self._emit(event.to_dict())

    def _error(self, message: str, utterance_id: Any = None) -> None:
        self._emit({"type": "error", "message": message,
                    **({"utterance_id": utterance_id} if utterance_id is not None else {})})

    async def _send_loop(self) -> None:
        """Sends queued events in order; a close item sends the close frame and ends the loop."""
        from starlette.websockets import WebSocketDisconnect

        try:
            while True:
                item = await self.out.get()
                if isinstance(item, _Close):
                    await self.ws.close(item.code, close_reason(item.reason))
                    return
                await self.ws.send_json(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client is gone; the receive loop sees its disconnect

    async def _close(self, sender: asyncio.Task, close: _Close) -> None:
        """Queued events, then (if the reason is longer than a close frame holds) an error event
        with the whole reason, then the close frame; each within CLOSE_S. A client that does not
        read gets the close frame without its events (ws_protocol() then drops the socket)."""
        drain = close.drain and not sender.done()
        if drain:
            try:
                if close.code != NORMAL:
                    self.out.put_nowait({"type": "error", "code": close.code, "message": close.reason})
                self.out.put_nowait(close)
            except asyncio.QueueFull:
                drain = False
        if drain:
            await asyncio.wait({sender}, timeout=CLOSE_S)
            if sender.done():
                return
        sender.cancel()
        try:
            await asyncio.wait_for(self.ws.close(close.code, close_reason(close.reason)), CLOSE_S)
        except Exception:  # noqa: BLE001 - already closed, or the client reads nothing: uvicorn drops it
            pass


# ----------------------------------------------------------------------------------- handlers

async def stream_route(websocket) -> None:
    """WebSocket /v1/stream: admission (max_streams, not while shutting down), then the stream."""
    state = websocket.app.state
    stats: StreamStats = state.streams
    await websocket.accept()
    if state.shutdown.started or state.batcher.closed:
        code, reason = GOING_AWAY, "the server is shutting down"
    elif not stats.admit(state.options.max_streams):
        code, reason = TRY_LATER, f"server at its limit of {state.options.max_streams} streams; retry later"
    else:
        try:
            code = await _Stream(websocket, state).run()
        finally:
            stats.open -= 1
        stats.closes[code] += 1
        return
    stats.closes[code] += 1
    try:
        await websocket.close(code, reason)
    except Exception:  # noqa: BLE001 - the client left first
        pass


async def page_route(request):
    """GET /live: the page (static/live.html)."""
    from starlette.responses import FileResponse

    return FileResponse(STATIC / "live.html", media_type="text/html")


async def page_file_route(request):
    """GET /live/{name}: the page's scripts and style (only the files PAGE_FILES names)."""
    from starlette.responses import FileResponse, JSONResponse

    name = request.path_params["name"]
    if name not in PAGE_FILES:
        return JSONResponse({"error": f"no such file: /live/{name}"}, status_code=404)
    return FileResponse(STATIC / name, media_type=PAGE_FILES[name])


def mount(app) -> None:
    """Add /v1/stream, /live and its files to `app` (server.create_app's Starlette app, whose
    state holds options, predictor, batcher, shutdown), with a stream counter and a worker pool
    (one thread per allowed stream: each waits on its own utterances' scores)."""
    from starlette.routing import Route, WebSocketRoute

    app.router.routes += [WebSocketRoute("/v1/stream", stream_route),
                          Route("/live", page_route, methods=["GET"]),
                          Route("/live/{name}", page_file_route, methods=["GET"])]
    app.state.streams = StreamStats()
    app.state.stream_pool = ThreadPoolExecutor(app.state.options.max_streams, thread_name_prefix="dmf-stream")


def ws_protocol():
    """uvicorn's WebSocket protocol (websockets' sans-I/O implementation), with one change: when a
    stream has ended while its socket's write buffer is still full (a client that reads nothing),
    the socket is aborted. uvicorn would close it, and a close waits for that buffer to drain,
    which for such a client is never."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    class StreamProtocol(WebSocketsSansIOProtocol):
        async def run_asgi(self) -> None:
            await super().run_asgi()
            if not self.writable.is_set() and not self.disconnected:
                self.transport.abort()

    return StreamProtocol

