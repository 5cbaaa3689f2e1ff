"""/v1/stream (#26): a generated conversation streamed through the WebSocket finds the same
utterances as the truth (boundaries within 0.2 s) with the labels Predictor.predict gives the same
samples and texts; bad input (a frame over the limit, text for an unknown utterance, a bad start,
NaN audio, limits, a client that never reads, a client that vanishes mid-utterance, 1 000 streams
at once) each ends in an error event or a clean close code, and the server keeps serving.

In-process cases use starlette's TestClient; the pressure cases run a real uvicorn (`dmf serve`'s
serve() in a subprocess, as tests/test_server.py does) and the `websockets` client.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets", reason="/v1/stream needs the serve extra's websockets")
pytest.importorskip("webrtcvad", reason="live sessions need webrtcvad (the serve or live extra)")
import httpx  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from conftest_runtime import free_port, predictor, rt  # noqa: E402,F401 (fixtures)
from dmf.runtime import ServeOptions, create_app  # noqa: E402
from dmf.runtime import stream as st  # noqa: E402

RATE = 16000
LEAD_S = 0.5  # silence before the first utterance
GAPS_S = (0.6, 1.2, 0.5, 2.0, 0.8)  # silence after each: within #26's 0.3-2 s (webrtcvad merged a 0.4 s gap)
FRAME = 3200  # bytes per binary message: 100 ms of 16 kHz int16 mono
START = {"type": "start", "format": {"sample_rate": RATE, "channels": 1, "sample_format": "int16"}}


@dataclass(frozen=True)
class Conversation:
    wav: Path
    pcm: np.ndarray  # (n,) int16, what conversation.wav holds
    truth: list[tuple[float, float]]  # each utterance's (start, end) in seconds
    texts: list[str]  # each utterance's transcript


_CACHE: dict[str, Conversation] = {}


def _one_utterance(clip: np.ndarray) -> bool:
    """Whether the live session's VAD, on this clip alone (padded with silence), finds exactly one
    utterance. Some synthetic clips hold a pause the VAD splits them at, so they are not one
    spoken utterance; the conversation is made of clips that are (what the VAD does with a single
    clip is the live session's own tests' subject; here it is the stream's)."""
    from dmf.runtime.live import LiveOptions, LiveSession
    from dmf.runtime.prediction import Prediction

    session = LiveSession(lambda a, t: Prediction("x", {"x": 1.0}), options=LiveOptions(max_utterance_s=5.0))
    silence = np.zeros(RATE, np.int16)
    events = session.feed(np.concatenate([silence, clip, silence])) + session.finish()
    return sum(e.kind == "utterance" for e in events) == 1


def conversation_fixture(tmp_path_factory) -> Conversation:
    """Five `dmf synth` utterances with GAPS_S of silence between them (made once per session)."""
    if "conv" not in _CACHE:
        from dmf.data import load_corpus
        from dmf.data.synth import synthesize

        root = tmp_path_factory.mktemp("conversation")
        synthesize(root / "corpus", seed=0, utterances=20)
        clips = ((u, sf.read(u.audio_path, dtype="int16")) for u in sorted(load_corpus(root / "corpus").utterances,
                                                                          key=lambda u: u.id))
        chosen = [(u, clip) for u, (clip, rate) in clips if rate == RATE and _one_utterance(clip)][:len(GAPS_S)]
        utts = [u for u, _ in chosen]
        parts, truth, t = [np.zeros(int(LEAD_S * RATE), np.int16)], [], LEAD_S
        for (u, clip), gap in zip(chosen, GAPS_S):
            truth.append((t, t + len(clip) / RATE))
            parts += [clip, np.zeros(int(gap * RATE), np.int16)]
            t += len(clip) / RATE + gap
        pcm = np.concatenate(parts)
        sf.write(root / "conversation.wav", pcm, RATE, subtype="PCM_16")
        _CACHE["conv"] = Conversation(root / "conversation.wav", pcm, truth, [u.text for u in utts])
    return _CACHE["conv"]


@pytest.fixture(scope="session")
def conversation(tmp_path_factory) -> Conversation:
    return conversation_fixture(tmp_path_factory)


def check_against_truth(events: list[dict], conv: Conversation, predictor, pcm: np.ndarray | None = None,
                        offset_s: float = 0.0) -> None:
    """One utterance event per spoken utterance, boundaries within 0.2 s of the truth (after
    `offset_s`, the stream's start within the recording), each label equal to Predictor.predict on
    the same samples (of `pcm`, the samples the stream carried) and text."""
    pcm = conv.pcm if pcm is None else pcm
    utterances = [e for e in events if e["type"] == "utterance"]
    assert len(utterances) == len(conv.truth), [(e["start_s"], e["end_s"]) for e in utterances]
    for event, (start, end), text in zip(utterances, conv.truth, conv.texts):
        assert abs(event["start_s"] + offset_s - start) <= 0.2 and abs(event["end_s"] + offset_s - end) <= 0.2, \
            (event, start, end)
        assert event["text"] == text and not event["cut"] and event["error"] is None
        samples = pcm[round(event["start_s"] * RATE):round(event["end_s"] * RATE)].astype(np.float32) / 32768.0
        offline = predictor.predict(samples, text, sample_rate=RATE)
        assert event["label"] == offline.label
        # The fixture's untrained model gives nearly the same probabilities to every input, so labels
        # alone prove little: the same samples score identically, a cut 30 ms off moves them >= 1e-6.
        assert event["probabilities"] == pytest.approx(offline.probabilities, abs=1e-7)


# ------------------------------------------------------------------------------- in-process

@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, ServeOptions(max_stream_seconds=60.0, stream_idle_s=5.0))) as c:
        yield c


def _closed(ws) -> tuple[list[dict], int, str]:
    """Every event until the server closes: (events, close code, reason)."""
    events = []
    while True:
        try:
            events.append(ws.receive_json())
        except WebSocketDisconnect as exc:
            return events, exc.code, exc.reason


def test_a_conversation_through_the_stream_matches_offline_predictions(client, conversation, predictor):
    """Texts go out when each utterance starts (as a recogniser or the page would send them); the
    session holds each closed utterance for its text (text_wait_s), then scores it."""
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_json({**START, "options": {"text_wait_s": 30}})
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["labels"] == list(predictor.labels)
        pcm = conversation.pcm.tobytes()
        for i in range(0, len(pcm), FRAME):
            ws.send_bytes(pcm[i:i + FRAME])
        events = []
        while sum(e["type"] == "utterance" for e in events) < len(conversation.truth):
            events.append(ws.receive_json())
            if events[-1]["type"] == "speech_started":
                uid = events[-1]["utterance_id"]
                ws.send_json({"type": "text", "utterance_id": uid, "text": conversation.texts[uid]})
        ws.send_json({"type": "end"})
        rest, code, reason = _closed(ws)
    assert (code, reason, rest) == (st.NORMAL, "end of stream", [])
    check_against_truth(events, conversation, predictor)
    assert client.get("/metrics").json()["streams"]["open"] == 0


def _stream(client, *messages, start: dict | None = START) -> tuple[list[dict], int, str]:
    """Open a stream, send `start` then `messages` (bytes or JSON), read until the close."""
    with client.websocket_connect("/v1/stream") as ws:
        if start is not None:
            ws.send_json(start)
        for m in messages:
            ws.send_bytes(m) if isinstance(m, bytes) else ws.send_json(m)
        return _closed(ws)


def test_text_for_an_unknown_utterance_is_an_error_event_and_the_stream_goes_on(client, conversation):
    """Bad texts get error events; the audio after them is still cut and scored, and a text for
    it longer than the model reads is cut to 2 000 characters (the event carries it)."""
    events, code, _ = _stream(client, {"type": "text", "utterance_id": 7, "text": "hello"},
                              {"type": "text", "utterance_id": "x"}, {"type": "nonsense"},
                              conversation.pcm[:4 * RATE].tobytes(),
                              {"type": "text", "utterance_id": 0, "text": "w" * 5000}, {"type": "end"},
                              start={**START, "options": {"text_wait_s": 30}})
    errors = [e for e in events if e["type"] == "error"]
    assert [e.get("utterance_id") for e in errors] == [7, "x", None]
    assert "utterance 7 is unknown" in errors[0]["message"] and "unknown" in errors[2]["message"]
    assert code == st.NORMAL
    assert [e["text"] for e in events if e["type"] == "utterance"][0] == "w" * 2000


@pytest.mark.parametrize("case, messages, start, code, reason", [
    ("frame over the limit", [b"\0\0" * (256 * 1024)], START, st.TOO_BIG, "over the 262144 byte limit"),
    ("audio before the start", [], None, st.POLICY, "the first message must be JSON"),
    ("bad sample format", [], {**START, "format": {"sample_format": "mp3"}}, st.POLICY, "sample_format 'mp3'"),
    ("unknown option", [], {**START, "options": {"max_pending": 10**9}}, st.POLICY, "unknown field(s) ['max_pending']"),
    ("utterance longer than the model's window", [], {**START, "options": {"max_utterance_s": 5.5}}, st.POLICY,
     "max_utterance_s 5.5 is invalid: at most the model's window, 5 s"),
    ("placeholder longer than the model reads", [], {**START, "options": {"placeholder_text": "x" * 2001}},
     st.POLICY, "placeholder_text is 2001 characters"),
    ("NaN samples", [np.full(1600, np.nan, "<f4").tobytes()],
     {**START, "format": {"sample_rate": RATE, "sample_format": "float32"}}, st.INVALID_DATA, "NaN"),
])
def test_bad_input_closes_with_its_code_and_reason(client, case, messages, start, code, reason):
    if start is None:  # PCM where the start message belongs
        messages = [b"\1\0" * 800]
    events, got_code, got_reason = _stream(client, *messages, start=start)
    assert got_code == code and reason in got_reason, (case, got_code, got_reason)
    assert client.get("/healthz").status_code == 200


def test_stream_length_and_idle_limits_and_max_streams(predictor, conversation):
    """Past max_stream_seconds what came before is scored and sent, then 4413; a stream that sends
    nothing for stream_idle_s gets 4408; one stream past max_streams gets 1013."""
    opts = ServeOptions(max_stream_seconds=5.0, stream_idle_s=0.5, max_streams=1)
    with TestClient(create_app(predictor, opts)) as c:
        pcm = conversation.pcm[:6 * RATE].tobytes()
        events, code, reason = _stream(c, *[pcm[i:i + FRAME] for i in range(0, len(pcm), FRAME)])
        assert code == st.TOO_LONG and "5 s of audio" in reason
        assert [e["type"] for e in events].count("utterance") == 2  # the first two utterances end before 5 s
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_json(START)
            assert ws.receive_json()["type"] == "ready"
            _, busy, busy_reason = _stream(c)
            assert busy == st.TRY_LATER and "limit of 1 streams" in busy_reason
            t0 = time.monotonic()
            _, idle, _ = _closed(ws)
            assert idle == st.IDLE and time.monotonic() - t0 < 5
        assert c.get("/metrics").json()["streams"] == {
            "open": 0, "total": 2, "closes_by_code": {"1013": 1, "4408": 1, "4413": 1}}


def test_a_client_that_never_reads_is_closed_4429_and_its_events_stay_bounded(predictor, conversation):
    """An ASGI client whose sends never complete (its socket buffer is full): once
    max_unsent_events events wait, the stream ends with 4429 while the audio is still arriving."""
    app = create_app(predictor, ServeOptions(max_unsent_events=2, stream_idle_s=5.0))
    pcm = conversation.pcm.tobytes()
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": json.dumps(START)}]
    incoming += [{"type": "websocket.receive", "bytes": pcm[i:i + FRAME]} for i in range(0, len(pcm), FRAME)]
    closes, fed = [], []

    async def receive():
        if incoming:
            fed.append(1)
            return incoming.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "websocket.send":
            await asyncio.Event().wait()  # never written: the client reads nothing
        elif message["type"] == "websocket.close":
            closes.append((message["code"], message["reason"]))

    from starlette.websockets import WebSocket

    scope = {"type": "websocket", "path": "/v1/stream", "headers": [], "app": app, "query_string": b""}
    try:
        asyncio.run(asyncio.wait_for(st.stream_route(WebSocket(scope, receive, send)), 60))
    finally:
        app.state.batcher.close()
    assert closes == [(st.SLOW_CONSUMER, "2 events unread: the client does not read")]
    assert incoming, "the stream should end before all the audio was read"
    assert app.state.streams.snapshot()["open"] == 0


# ------------------------------------------------------------------------------ real uvicorn

@pytest.fixture(scope="module")
def server(rt):
    from test_server import _start_server, _stop

    port = free_port()
    # a connection cap over 1 000, so the streams limit (not the connection cap) answers the flood:
    # refused at the cap, a connection that has not sent its request within 1 s is closed unanswered,
    # and one client process opening 1 000 sockets is that slow (the cap's own case is tested below)
    proc = _start_server(rt.artifact, port, options={"max_streams": 16, "max_connections": 1100})
    yield port, proc
    _stop(proc)


def _stats(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).json()["streams"]


def _until(condition, limit_s: float = 10.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_over_uvicorn_a_client_that_vanishes_mid_utterance_or_never_reads(server, conversation):
    """Vanishing mid-utterance (the socket simply closes, no close frame): the stream is dropped
    and its slot freed. Never reading: the stream goes on, and its end is answered with the events
    and a 1000 close the client never reads (they fit the socket buffers; 4429 is the in-process
    case above)."""
    from websockets.sync.client import connect

    port, _ = server
    url = f"ws://127.0.0.1:{port}/v1/stream"
    pcm = conversation.pcm.tobytes()
    before = _stats(port)
    with connect(url, compression=None) as ws:
        ws.send(json.dumps(START))
        ws.send(pcm[:int(conversation.truth[0][0] * RATE + RATE) * 2])  # into the first utterance
        ws.socket.close()  # no close frame: the client is gone
    vanished = lambda: sum(_stats(port)["closes_by_code"].get(c, 0) - before["closes_by_code"].get(c, 0)
                           for c in ("1005", "1006"))  # noqa: E731
    assert _until(lambda: vanished() == 1 and _stats(port)["open"] == 0)
    with connect(url, compression=None, max_queue=1) as silent:  # reads nothing past one message
        silent.send(json.dumps(START))
        for i in range(0, len(pcm), FRAME):
            silent.send(pcm[i:i + FRAME])
        silent.send(json.dumps({"type": "end"}))
        assert _until(lambda: _stats(port)["closes_by_code"].get("1000", 0) > before["closes_by_code"].get("1000", 0))
        silent.socket.close()
    assert _until(lambda: _stats(port)["open"] == 0)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


def test_1000_streams_at_once_get_a_clean_answer_and_the_server_keeps_serving(server):
    """1 000 clients open /v1/stream together: max_streams (16) are served; every other one is
    closed 1013 with its reason (never a reset or a hang). /healthz answers while they are open, and
    every slot is free afterwards."""
    import websockets
    from websockets.asyncio.client import connect

    port, _ = server

    async def one(i: int, release: asyncio.Event) -> str:
        try:
            async with connect(f"ws://127.0.0.1:{port}/v1/stream", compression=None, open_timeout=60) as ws:
                try:
                    await ws.send(json.dumps(START))
                    first = json.loads(await asyncio.wait_for(ws.recv(), 60))
                except websockets.ConnectionClosed as exc:
                    return f"closed {exc.rcvd.code}" if exc.rcvd else "closed without a code"
                await release.wait()
                return first["type"]
        except websockets.InvalidStatus as exc:
            return f"http {exc.response.status_code}"

    async def run() -> list[str]:
        release = asyncio.Event()
        tasks = [asyncio.create_task(one(i, release)) for i in range(1000)]
        while sum(t.done() for t in tasks) < 1000 - 16 and not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
        health = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status_code == 200
        release.set()
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(asyncio.wait_for(run(), 240))
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert counts == {"ready": 16, "closed 1013": 984}, counts
    assert _until(lambda: _stats(port)["open"] == 0)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def small_server(rt):
    """A real uvicorn with small limits: 2 connections, a 1 s header deadline, 4 unsent events."""
    from test_server import _start_server, _stop

    port = free_port()
    proc = _start_server(rt.artifact, port, options={"max_streams": 4, "max_connections": 2, "header_timeout_s": 1.0,
                                                     "max_unsent_events": 4})
    yield port
    _stop(proc)


def test_a_handshake_past_the_connection_cap_gets_a_503_and_streams_outlive_the_header_deadline(small_server,
                                                                                                 conversation):
    """With max_connections busy (two open streams), a third WebSocket handshake is answered
    HTTP 503 JSON, as an HTTP request would be, and the server is not upgraded past its cap. An
    open stream is not cut by the HTTP header deadline (1 s here) that its connection started with."""
    import websockets
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{small_server}/v1/stream"
    with connect(url, compression=None) as first, connect(url, compression=None) as second:
        for ws in (first, second):
            ws.send(json.dumps(START))
            assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        with pytest.raises(websockets.InvalidStatus) as refused:
            with connect(url, compression=None):
                pass
        assert refused.value.response.status_code == 503
        assert b"limit of 2 open connections" in refused.value.response.body
        time.sleep(1.5)  # past the header deadline
        pcm = conversation.pcm[:4 * RATE].tobytes()
        for i in range(0, len(pcm), FRAME):
            first.send(pcm[i:i + FRAME])
        first.send(json.dumps({"type": "end"}))
        events = [json.loads(m) for m in first]  # until the server's close
        assert first.close_code == st.NORMAL and "utterance" in [e["type"] for e in events]
    assert _until(lambda: _stats(small_server)["open"] == 0)
    assert httpx.get(f"http://127.0.0.1:{small_server}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("paused", [True, False])
def test_a_stream_that_ends_with_its_writes_stuck_has_its_socket_aborted(paused):
    """ws_protocol(): when the app returns while the socket's write buffer is over its high-water
    mark (a client that reads nothing: asyncio paused writing), the socket is aborted, because
    uvicorn's close would wait for that buffer to drain for ever; otherwise it is closed as usual.
    (Filling real socket buffers takes megabytes of events: an event is at most ~12 KB, and Linux
    buffers several MB on loopback, so this drives the protocol directly.)"""
    from unittest import mock

    import uvicorn
    from uvicorn.server import ServerState

    async def app(scope, receive, send):  # a stream that has already ended
        return None

    async def run() -> mock.Mock:
        config = uvicorn.Config(app, ws=st.ws_protocol(), log_level="warning")
        config.load()
        protocol = st.ws_protocol()(config=config, server_state=ServerState(), app_state={})
        protocol.transport, protocol.scope = mock.Mock(), {"type": "websocket"}
        protocol.handshake_complete = True
        if paused:
            protocol.pause_writing()
        await protocol.run_asgi()
        return protocol.transport

    transport = asyncio.run(run())
    assert transport.close.called and transport.abort.called == paused


def test_serve_takes_the_stream_limit_from_the_command_line(rt):
    """--max-streams reaches ServeOptions: a value that cannot hold is refused in one line before the model loads."""
    from conftest_runtime import run_cli

    code, out = run_cli("serve", rt.artifact, "--max-streams", "0")
    assert code == 2 and "max_streams = 0 is invalid" in out and len(out.strip().splitlines()) == 1, out
