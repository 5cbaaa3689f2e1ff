"""`dmf serve` under connection pressure (#22 items 15, 16): idle keep-alive connections never
starve new clients or /healthz, clients that close late lose nothing, oversized request heads
get 431, a connection past the cap with nothing idle to close gets a 503 JSON answer, and SIGTERM
with a long /v1/conversation in flight answers it 503 JSON. One real uvicorn on 127.0.0.1 with a
small connection cap (16) so each case needs few sockets; bench/server_load.py runs the full
32 x 1 000 version."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from conftest_runtime import free_port, predictor, rt, tone, wav_bytes  # noqa: E402,F401
from test_server import CLEAN_EXIT, _start_server, _stop, _until_closed  # noqa: E402

CAP = 16  # max_connections of the server under test


@pytest.fixture(scope="module")
def server(rt):
    port = free_port()
    proc = _start_server(rt.artifact, port, options={"max_connections": CAP, "keep_alive_s": 60,
                                                     "max_batch": 8, "max_wait_ms": 5})
    yield f"http://127.0.0.1:{port}", port
    assert _stop(proc) in CLEAN_EXIT


def _get(port: int, path: str = "/healthz", extra: bytes = b"") -> socket.socket:
    """A raw keep-alive GET whose response has been read; the socket is left open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n")
    head = _read_response(sock)
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _is_closed(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _predict(client: httpx.Client, rt, i: int) -> httpx.Response:
    clip = f"good{i % 8}.wav"
    return client.post("/v1/predict", files={"audio": (clip, rt.clips[clip].read_bytes()), "text": (None, b"late")})


def test_idle_keep_alive_connections_never_starve_a_new_client(rt, server):
    """CAP + 8 clients each make one request and keep their connection open: every one of them is
    answered 200 (the longest idle are closed to make room), and a new client still gets 200 for
    /healthz and for a prediction. uvicorn's limit_concurrency answered all of these 503."""
    url, port = server
    socks = [_get(port) for _ in range(CAP + 8)]
    try:
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        with httpx.Client(base_url=url, timeout=30) as client:
            assert _predict(client, rt, 0).status_code == 200
        # the longest idle went first; the newest are still open
        assert all(_is_closed(s, 5) for s in socks[:8])
        assert not any(_is_closed(s, 0.2) for s in socks[-4:])
    finally:
        for s in socks:
            s.close()


def test_clients_that_close_late_lose_nothing(rt, server):
    """8 clients x 12 predictions, each on a new connection that the client closes only at the end
    (96 connections against a cap of 16), while /healthz is polled: every answer is 200."""
    url, _ = server
    health: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.05):
            health.append(httpx.get(f"{url}/healthz", timeout=10).status_code)

    def client(k: int) -> list[int]:
        kept, codes = [], []
        try:
            for j in range(12):
                c = httpx.Client(base_url=url, timeout=60)  # a fresh connection per request ...
                kept.append(c)  # ... closed late
                codes.append(_predict(c, rt, k + j).status_code)
        finally:
            for c in kept:
                c.close()
        return codes

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            codes = [c for chunk in pool.map(client, range(8), timeout=240) for c in chunk]
    finally:
        done.set()
        poller.join(30)
    assert codes == [200] * 96, {c: codes.count(c) for c in set(codes)}
    assert health and set(health) == {200}, {c: health.count(c) for c in set(health)}


@pytest.mark.parametrize("kib", [20, 60])
def test_request_heads_over_16_kib_get_431(server, kib):
    _, port = server
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (kib * 1024) + b"\r\n\r\n")
        data, _ = _until_closed(sock, 10)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert b"16384 byte limit" in data and b'"error"' in data
    _get(port, extra=b"X-Fits: " + b"a" * (15 * 1024) + b"\r\n").close()  # under the limit: served


def test_a_connection_past_the_cap_with_none_idle_gets_503_json(server):
    """CAP connections in the middle of their headers are busy, not idle: the next connection's
    request is answered 503 JSON and closed; once they go, new clients are served again."""
    url, port = server
    busy = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(CAP)]
    try:
        for s in busy:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.3)
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data, _ = _until_closed(sock, 10)
        assert data.startswith(b"HTTP/1.1 503"), data[:200]
        assert b"limit of 16 open connections" in data
    finally:
        for s in busy:
            s.close()
    time.sleep(0.3)
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


def test_sigterm_answers_a_long_conversation_503_json(rt, tmp_path):
    """A /v1/conversation of 3 000 segments is in flight when SIGTERM comes: it is answered 503
    JSON once --grace 0.5 runs out (uvicorn's own cancel gave a plain-text 500 later)."""
    port = free_port()
    proc = _start_server(rt.artifact, port, "--grace", "0.5")
    url = f"http://127.0.0.1:{port}"
    recording = wav_bytes(tone(30.0, seed=1))
    cues = [{"start": (i % 290) / 10, "end": (i % 290) / 10 + 1.0, "text": f"cue {i}", "speaker": f"s{i}"}
            for i in range(3000)]
    transcript = json.dumps(cues).encode()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/conversation", timeout=60,
                                  files={"audio": ("call.wav", recording), "transcript": ("call.json", transcript)})
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/metrics", timeout=10).json()["in_flight"] < 1:
                assert time.monotonic() < deadline and not pending.done(), "the conversation never got in flight"
                time.sleep(0.05)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            answer = pending.result(30)
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"], answer.text[:300]
        assert time.monotonic() - t0 < 3
        assert proc.wait(30) in CLEAN_EXIT
    finally:
        if proc.poll() is None:
            proc.kill()
