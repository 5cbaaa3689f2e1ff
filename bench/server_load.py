"""`dmf serve` under clients that close late (issue 22): a standalone load check, loopback only.

    python -m dmf.bench.server_load ARTIFACT [--clients 32] [--requests 1000] [--late-s 10] [--idle 300]

Starts `dmf serve ARTIFACT` on a free 127.0.0.1 port with its default limits, then
1. `--clients` concurrent clients each send `--requests` predictions, every one on a new
   connection that the client closes only `--late-s` seconds after its answer (past the server's
   5 s keep-alive, so the server holds them idle), while /healthz is polled every 50 ms;
2. opens `--idle` connections that each make one request and stay open, then a new client asks
   /healthz and /v1/predict.
Prints one JSON summary: answers by status, lost requests (no HTTP answer), /healthz statuses,
the most server-side connections seen open at once, requests per second, wall time. Exit status
1 if anything was lost or not 200. Raw asyncio sockets, so the client costs little next to the
server; every loop is bounded by the request counts.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

BOUNDARY = "dmfloadboundary"


def _clip(seconds: float = 1.5, rate: int = 16000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def predict_request(port: int, wav: bytes, text: str = "load test") -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + wav + (
            f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n{text}\r\n"
            f"--{BOUNDARY}--\r\n").encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def health_request(port: int) -> bytes:
    return f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


async def exchange(port: int, request: bytes, timeout: float = 60.0):
    """(status or None if no answer, open writer): one request on a new keep-alive connection."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None, None
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await asyncio.wait_for(reader.readexactly(length), timeout)
        return status, writer
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        writer.close()
        return None, None


def server_connections(port: int) -> int:
    """Established TCP connections whose local port is the server's (from /proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


async def late_clients(port: int, wav: bytes, clients: int, requests: int, late_s: float) -> dict:
    statuses: Counter = Counter()
    health: Counter = Counter()
    peak = 0
    done = asyncio.Event()
    closers: list[asyncio.TimerHandle] = []
    loop = asyncio.get_running_loop()
    body = predict_request(port, wav)

    async def client() -> None:
        for _ in range(requests):
            status, writer = await exchange(port, body)
            statuses[status] += 1
            if writer is not None:
                closers.append(loop.call_later(late_s, writer.close))  # closed late

    async def poll() -> None:
        nonlocal peak
        while not done.is_set():
            status, writer = await exchange(port, health_request(port), timeout=10)
            health[status] += 1
            if writer is not None:
                writer.close()
            peak = max(peak, server_connections(port))
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.monotonic() - t0
    done.set()
    await poller
    for handle in closers:
        handle.cancel()
    return {"answers": {str(k): v for k, v in statuses.items()}, "lost": statuses[None],
            "healthz": {str(k): v for k, v in health.items()}, "peak_server_connections": peak,
            "requests_per_s": round(clients * requests / wall, 1), "wall_s": round(wall, 1)}


async def idle_then_new(port: int, wav: bytes, idle: int) -> dict:
    writers, opened = [], Counter()
    for _ in range(idle):
        status, writer = await exchange(port, health_request(port))
        opened[status] += 1
        if writer is not None:
            writers.append(writer)
    open_now = server_connections(port)
    health, w1 = await exchange(port, health_request(port))
    predict, w2 = await exchange(port, predict_request(port, wav))
    for w in writers + [w1, w2]:
        if w is not None:
            w.close()
    return {"idle_opened": {str(k): v for k, v in opened.items()}, "server_connections_before_new_client": open_now,
            "new_client_healthz": health, "new_client_predict": predict}


def start_server(artifact: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dmf.runtime.cli", "serve", artifact, "--port", str(port), "--threads", "1",
           "--log-level", "error"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(health_request(port))
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("dmf serve did not become healthy within 120 s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000, help="per client")
    ap.add_argument("--late-s", type=float, default=10.0, help="seconds a client keeps each connection open")
    ap.add_argument("--idle", type=int, default=300)
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wav = _clip()
    proc = start_server(args.artifact, port)
    try:
        load = asyncio.run(late_clients(port, wav, args.clients, args.requests, args.late_s))
        idle = asyncio.run(idle_then_new(port, wav, args.idle))
    finally:
        proc.terminate()
        proc.wait(30)
    summary = {"clients": args.clients, "requests_per_client": args.requests, "late_s": args.late_s,
               "load": load, "idle": idle}
    print(json.dumps(summary, indent=2))
    ok = (load["lost"] == 0 and set(load["answers"]) == {"200"} and set(load["healthz"]) == {"200"}
          and idle["new_client_healthz"] == 200 and idle["new_client_predict"] == 200)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
