"""dmf.runtime.server: in-process (starlette TestClient) and over a real uvicorn on 127.0.0.1, including
the limits of #12 (trickling, stalled and vanishing clients, decompression bombs, busy, timeout and
shutdown answers, and what /metrics counts for each)."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
import soundfile as sf  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from conftest_runtime import ACCEPTED, BAD_AUDIO, BAD_TEXT, TEXTS, free_port, predictor, rt  # noqa: E402,F401

from dmf.runtime import ServeOptions, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# NaN / Inf samples are decodable but unusable: 422; every other bad input: 400.
STATUS = {"nan": 422, "inf": 422}


def _files(rt, clip: str, text):
    return {"audio": (clip, rt.clips[clip].read_bytes(), "audio/wav"),
            "text": (None, text if isinstance(text, bytes) else text.encode("utf-8"))}


@pytest.fixture(scope="module")
def client(predictor):
    app = create_app(predictor, ServeOptions(max_batch=8, max_wait_ms=2, max_upload_mb=4))
    with TestClient(app) as c:  # runs the lifespan: the batcher is closed on exit
        yield c
    assert app.state.batcher.closed


def test_predict_ok_matches_the_python_api(rt, predictor, client):
    r = client.post("/v1/predict", files=_files(rt, "good1.wav", "hello there"))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = predictor.predict(rt.clips["good1.wav"], "hello there")
    assert set(body) == {"label", "label_name", "probabilities", "truncated"} and body["label"] == expected.label
    assert body["label_name"] == {"neu": "neutral", "hap": "happy", "sad": "sad", "ang": "angry"}[body["label"]]
    assert body["truncated"] is False  # a 1.5 s clip fits the 5 s window
    assert np.allclose([body["probabilities"][k] for k in predictor.labels],
                       [expected.probabilities[k] for k in predictor.labels], atol=1e-5)
    # text as a plain form field works too
    r = client.post("/v1/predict", files={"audio": ("a.wav", rt.clips["good1.wav"].read_bytes())},
                    data={"text": "hello there"})
    assert r.status_code == 200 and r.json()["label"] == expected.label


def test_top_k_answers_the_most_probable_labels_in_order(rt, predictor, client):
    expected = predictor.predict(rt.clips["good1.wav"], "hello there")
    r = client.post("/v1/predict?top_k=2", files=_files(rt, "good1.wav", "hello there"))
    assert r.status_code == 200, r.text
    top = r.json()["top_k"]
    ranked = sorted(expected.probabilities, key=lambda lab: -expected.probabilities[lab])
    assert [t["label"] for t in top] == ranked[:2] and top[0]["label"] == expected.label
    assert top[0]["probability"] >= top[1]["probability"] and top[0]["name"] == expected.label_name
    for bad in ("0", "5", "two", "-1"):  # the tiny artifact has 4 labels
        r = client.post(f"/v1/predict?top_k={bad}", files=_files(rt, "good1.wav", "hello there"))
        assert r.status_code == 400 and "top_k" in r.json()["error"] and "1..4" in r.json()["error"]


@pytest.mark.parametrize("case", sorted({**BAD_AUDIO, **BAD_TEXT}))
def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(rt, client, case):
    clip, text, (_, fragment) = {**BAD_AUDIO, **BAD_TEXT}[case]
    r = client.post("/v1/predict", files=_files(rt, clip, text))
    assert r.status_code == STATUS.get(case, 400), r.text
    assert fragment in r.json()["error"]
    assert client.post("/v1/predict", files=_files(rt, "good0.wav", "ok")).status_code == 200


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_accepted_inputs_over_http(rt, client, case):
    clip, text = ACCEPTED[case]
    r = client.post("/v1/predict", files=_files(rt, clip, text))
    assert r.status_code == 200, r.text
    assert np.isfinite(list(r.json()["probabilities"].values())).all()


def test_missing_fields_wrong_content_type_and_upload_limit(rt, client):
    wav = rt.clips["good0.wav"].read_bytes()
    r = client.post("/v1/predict", files={"audio": ("a.wav", wav)})
    assert r.status_code == 400 and "missing form field(s) 'text'" in r.json()["error"]
    r = client.post("/v1/predict", data={"text": "hello"}, files={"other": ("x", b"1")})
    assert r.status_code == 400 and "'audio'" in r.json()["error"]
    r = client.post("/v1/predict", json={"audio": "x", "text": "y"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    r = client.post("/v1/predict", content=b"--xyz\r\ngarbage", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]
    big = b"\0" * (5 * 1024 * 1024)  # over the 4 MiB limit of this app
    r = client.post("/v1/predict", files={"audio": ("big.wav", big), "text": (None, b"x")})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = client.post("/v1/predict", files=[("audio", ("a.wav", wav)), ("text", (None, b"a")), ("text", (None, b"b"))])
    assert r.status_code == 400 and "more than once" in r.json()["error"]
    r = client.post("/v1/predict", files=[("audio", ("a.wav", wav))] + [(f"f{i}", (None, b"x")) for i in range(9)])
    assert r.status_code == 400 and "Too many fields" in r.json()["error"]
    # python-multipart's own wording ("Expected boundary character 65, got 66") is not shown
    r = client.post("/v1/predict", content=b"--AAAB\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--AAAA--",
                    headers={"content-type": "multipart/form-data; boundary=AAAA"})
    assert r.status_code == 400 and r.json()["error"] == "malformed multipart body: Invalid multipart data."
    r = client.post("/v1/predict", files={"audio": (None, b"not a file part"), "text": (None, b"x")})
    assert r.status_code == 400 and "expected a file part" in r.json()["error"]
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/healthz").status_code == 200


def test_health_and_metrics(rt, predictor, client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["labels"] == list(predictor.labels)
    assert h["running_engine"] == predictor.engine.name and h["providers"] == list(predictor.engine.providers)
    before = client.get("/metrics").json()
    assert client.post("/v1/predict", files=_files(rt, "good2.wav", "metrics")).status_code == 200
    m = client.get("/metrics").json()
    ok = m["requests_by_status"]["200"]
    assert m["requests_total"] == before["requests_total"] + 1  # our one request, whatever ran before
    assert ok == before["requests_by_status"].get("200", 0) + 1
    assert m["latency_ms"]["count"] == before["latency_ms"]["count"] + 1 and m["latency_ms"]["p50"] is not None
    for key in ("submitted", "succeeded", "batches"):
        assert m["batcher"][key] == before["batcher"][key] + 1, key
    text = client.get("/metrics", params={"format": "prometheus"})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert f'dmf_requests_total{{code="200"}} {ok}' in text.text
    assert f'dmf_batches_total {m["batcher"]["batches"]}' in text.text
    assert 'dmf_batch_size_bucket{le="+Inf"}' in text.text
    assert client.get("/metrics", params={"format": "xml"}).status_code == 400


# ---------------------------------------------------------------------------- real uvicorn

# Runs dmf.runtime.server.serve with ServeOptions(**json.loads(argv[3])): options the CLI has no flag for.
SERVE_WITH_OPTIONS = (
    "import json, sys\n"
    "from dmf.runtime import Predictor\n"
    "from dmf.runtime.server import ServeOptions, serve\n"
    "serve(Predictor.load(sys.argv[1], threads=1), ServeOptions(**json.loads(sys.argv[3])), port=int(sys.argv[2]),\n"
    "      log_level='warning')\n"
)


def _start_server(artifact: Path, port: int, *extra: str, options: dict | None = None) -> subprocess.Popen:
    """`dmf serve ARTIFACT *extra` (or serve() with `options`) in a subprocess, once healthy. Its
    output goes to a temp file (a pipe nobody reads would fill up and block the server)."""
    if options is None:
        cmd = [sys.executable, "-m", "dmf.runtime.cli", "serve", str(artifact), "--port", str(port),
               "--threads", "1", "--log-level", "warning", *extra]
    else:
        cmd = [sys.executable, "-c", SERVE_WITH_OPTIONS, str(artifact), str(port), json.dumps(options)]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"server exited early: {log.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not become healthy within 60 s")


# uvicorn re-raises the signal it caught once it has shut down gracefully, so a clean SIGTERM exit
# reads as -SIGTERM; 0 on platforms/versions that exit normally.
CLEAN_EXIT = (0, -signal.SIGTERM)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def test_load_32_clients_over_real_uvicorn(rt, predictor):
    """32 concurrent clients x 8 requests: nothing lost, every answer equals that input's single
    prediction, bad requests in the mix get 400, the server stays healthy, batches > 1 ran."""
    inputs = [(f"good{i}.wav", TEXTS[i]) for i in range(8)]
    expected = [predictor.predict(rt.clips[c], t) for c, t in inputs]
    payloads = [rt.clips[c].read_bytes() for c, _ in inputs]
    port = free_port()
    proc = _start_server(rt.artifact, port, "--max-batch", "8", "--max-wait-ms", "10")
    url = f"http://127.0.0.1:{port}"
    try:
        bad_cases = {**BAD_AUDIO, **BAD_TEXT}
        for case, (clip, text, (_, fragment)) in sorted(bad_cases.items()):  # every bad input, real loopback
            bad = httpx.post(f"{url}/v1/predict", files=_files(rt, clip, text), timeout=30)
            assert bad.status_code == STATUS.get(case, 400) and fragment in bad.json()["error"], (case, bad.text)

        def client(k: int) -> list[tuple[int, int, dict]]:
            out = []
            with httpx.Client(base_url=url, timeout=60) as http:
                for j in range(8):
                    idx = (k + j) % len(inputs)
                    r = http.post("/v1/predict", files={"audio": (f"{idx}.wav", payloads[idx]),
                                                        "text": (None, inputs[idx][1].encode())})
                    out.append((idx, r.status_code, r.json()))
            return out

        with ThreadPoolExecutor(32) as pool:
            answers = [a for chunk in pool.map(client, range(32), timeout=120) for a in chunk]
        assert len(answers) == 256
        assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
        for idx, _, body in answers:
            exp = expected[idx]
            assert body["label"] == exp.label
            np.testing.assert_allclose([body["probabilities"][k] for k in predictor.labels],
                                       [exp.probabilities[k] for k in predictor.labels], atol=1e-5)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        metrics = httpx.get(f"{url}/metrics", timeout=10).json()
        by_status = metrics["requests_by_status"]
        assert by_status["200"] == 256 and by_status["422"] == len(STATUS)
        assert by_status["400"] == len(bad_cases) - len(STATUS)
        hist = {int(k): v for k, v in metrics["batcher"]["batch_size_histogram"].items()}
        assert sum(k * v for k, v in hist.items()) == 256
        assert max(hist) > 1, hist
        prom = httpx.get(f"{url}/metrics?format=prometheus", timeout=10).text
        assert "dmf_batches_total" in prom
    finally:
        assert _stop(proc) in CLEAN_EXIT


def test_graceful_shutdown_finishes_in_flight_requests(rt):
    port = free_port()
    # A long batching window keeps the requests in flight while SIGTERM arrives.
    proc = _start_server(rt.artifact, port, "--max-batch", "8", "--max-wait-ms", "1500")
    url = f"http://127.0.0.1:{port}/v1/predict"
    wav = rt.clips["good0.wav"].read_bytes()
    results: list[int] = []

    def send() -> None:
        r = httpx.post(url, files={"audio": ("a.wav", wav), "text": (None, b"still answered")}, timeout=30)
        results.append(r.status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # SIGTERM only once all 4 are in flight
            if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).json()["in_flight"] == 4:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the requests never got in flight")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert results == [200] * 4
    assert code in CLEAN_EXIT


def test_serve_refuses_a_bad_artifact(rt, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "dmf.json").write_text(json.dumps({"format": "dmf-artifact", "schema_version": 7}))
    proc = subprocess.run([sys.executable, "-m", "dmf.runtime.cli", "serve", str(art), "--port", str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "schema_version 7 is not supported" in proc.stderr


# ------------------------------------------------------------------------- refusals in-process (#12)

def _wav_upload(data: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> dict:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype=subtype)
    return {"audio": ("x.wav", buf.getvalue(), "audio/wav"), "text": (None, b"hello")}


def test_huge_samples_are_422_and_counted(client):
    huge = np.full(16000, 3e38, dtype=np.float32)
    huge[::2] *= -1  # finite, but the model would return NaN for it
    before = client.get("/metrics").json()["requests_by_status"].get("422", 0)
    r = client.post("/v1/predict", files=_wav_upload(huge))
    assert r.status_code == 422 and "magnitude 3e+38" in r.json()["error"]
    assert client.get("/metrics").json()["requests_by_status"]["422"] == before + 1


def test_non_finite_scores_are_422_and_engine_details_stay_in_the_log(rt, predictor, client, monkeypatch, caplog):
    monkeypatch.setattr(predictor.engine, "infer", lambda batch: np.full((len(batch["audio"]), 4), np.nan, np.float32))
    r = client.post("/v1/predict", files=_files(rt, "good0.wav", "x"))
    assert r.status_code == 422 and "not finite" in r.json()["error"] and "NaN" not in r.text.replace("(NaN", "")

    def boom(batch):
        raise RuntimeError("CUDA failure at /opt/secret/lib.so\nbanner line")

    monkeypatch.setattr(predictor.engine, "infer", boom)
    r = client.post("/v1/predict", files=_files(rt, "good0.wav", "x"))
    assert r.status_code == 500 and "secret" not in r.text and "details in the server log" in r.json()["error"]
    assert "secret" in caplog.text  # the detail is logged


def test_healthz_names_the_artifact_folder_not_its_path(rt, client):
    h = client.get("/healthz").json()
    assert h["path"] == rt.artifact.name and "/" not in h["path"]


def test_surrogate_bytes_in_text_are_refused_over_http(rt, client):
    files = _files(rt, "good0.wav", "x")
    files["text"] = (None, "bad \ud800 text".encode("utf-8", "surrogatepass"))  # CESU-style bytes: not UTF-8
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]


# ------------------------------------------------------------------------ limits over uvicorn (#12)

def _raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(data)
    return sock


def _until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    t0, chunks = time.monotonic(), []
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open for over {limit_s} s") from None
    return b"".join(chunks), time.monotonic() - t0


def _trickle(sock: socket.socket, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            sock.send(b"x")
        except OSError:
            return


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """270 KB of FLAC that decodes to 350 s x 8 channels at 96 kHz: 1.07 GB of float32."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=96000, channels=8, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((96000 * 10, 8), dtype=np.int16)
        for _ in range(35):
            f.write(block)
    return buf.getvalue()


def _open_length(flac: bytes) -> bytes:
    """The same FLAC with STREAMINFO's total-samples field zeroed: "length unknown" (streamed)."""
    data = bytearray(flac)
    data[8 + 13] &= 0xF0  # STREAMINFO starts at byte 8; total samples: 36 bits from byte 13's low nibble
    data[8 + 14:8 + 18] = b"\0\0\0\0"
    return bytes(data)


# Headers declaring 100 000 bytes, then the start of a file part: what follows is file data.
HEAD = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n\r\n")


def test_trickling_stalled_and_vanishing_clients_are_cut_off(rt):
    """A body trickling a byte per 0.3 s and a body that stops short of its Content-Length get 408
    at the 2 s request timeout while another request is served; headers trickling, or nothing
    sent at all, lose the connection at the 1 s header timeout; a client that leaves mid-body is
    counted as 499, not 500."""
    port = free_port()
    proc = _start_server(rt.artifact, port, options={"request_timeout_s": 2, "header_timeout_s": 1})
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    try:
        trickler, staller = _raw(port, HEAD), _raw(port, HEAD + b"RIFF")
        threading.Thread(target=_trickle, args=(trickler, stop, 0.3), daemon=True).start()
        slow_headers, silent = _raw(port, b"POST /v1/predict HTTP/1.1\r\n"), _raw(port, b"")
        threading.Thread(target=_trickle, args=(slow_headers, stop, 0.2), daemon=True).start()
        ok = httpx.post(f"{url}/v1/predict", files=_files(rt, "good0.wav", "served meanwhile"), timeout=30)
        assert ok.status_code == 200
        for sock in (slow_headers, silent):
            data, took = _until_closed(sock, 5)
            assert data == b"" and took < 3
        for sock in (trickler, staller):
            data, took = _until_closed(sock, 6)
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
            assert b"request body not received within 2 s" in data and took < 4
        leaver = _raw(port, HEAD + b"y" * 1000)
        time.sleep(0.3)
        leaver.close()
        time.sleep(0.5)
        counts = httpx.get(f"{url}/metrics", timeout=10).json()["requests_by_status"]
        assert counts == {"200": 1, "408": 2, "499": 1}, counts
    finally:
        stop.set()
        assert _stop(proc) in CLEAN_EXIT


def test_decompression_bombs_leave_the_server_rss_within_300_mb(rt, bomb):
    port = free_port()
    proc = _start_server(rt.artifact, port)
    url = f"http://127.0.0.1:{port}/v1/predict"
    try:
        assert httpx.post(url, files=_files(rt, "good0.wav", "warm"), timeout=30).status_code == 200
        start = _rss_mb(proc.pid)
        for payload in (bomb, bomb, bomb, _open_length(bomb), _open_length(bomb), _open_length(bomb)):
            t0 = time.monotonic()
            r = httpx.post(url, files={"audio": ("bomb.flac", payload), "text": (None, b"x")}, timeout=60)
            assert r.status_code == 400 and "longer than the 60.0 s maximum" in r.json()["error"], r.text
            assert time.monotonic() - t0 < 5
        grown = _rss_mb(proc.pid) - start
        assert grown < 300, f"RSS grew by {grown:.0f} MB"
    finally:
        assert _stop(proc) in CLEAN_EXIT


def test_busy_timeout_and_shutdown_answers_are_503_json(rt):
    """--max-queue 1: a second request while one waits gets 503 busy; --timeout 2: the waiting one
    (held by a 3 s batching window) gets 503 at 2 s; after SIGTERM, a request still waiting when
    --grace 0.5 runs out gets 503 "shutting down", and the server exits cleanly."""
    port = free_port()
    proc = _start_server(rt.artifact, port, "--max-queue", "1", "--max-wait-ms", "3000", "--timeout", "2",
                         "--grace", "0.5")
    url = f"http://127.0.0.1:{port}"
    send = lambda: httpx.post(f"{url}/v1/predict", files=_files(rt, "good0.wav", "x"), timeout=30)  # noqa: E731
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(send)
            time.sleep(0.5)
            busy = send()
            assert busy.status_code == 503 and "server busy" in busy.json()["error"]
            late = waiting.result(10)
        assert late.status_code == 503 and "no result within 2 s" in late.json()["error"]
        counts = httpx.get(f"{url}/metrics", timeout=10).json()["requests_by_status"]
        assert counts == {"503": 2}, counts
        time.sleep(1.5)  # the 3 s window of the timed-out request has passed (and skipped it)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(send)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            last = waiting.result(10)
        assert last.status_code == 503 and "shutting down" in last.json()["error"]
        assert time.monotonic() - t0 < 2
        assert proc.wait(30) in CLEAN_EXIT
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------ /v1/conversation limits (#22)

def _conversation_files(cues: int, seconds: float = 10.0) -> dict:
    from conftest_runtime import tone, wav_bytes

    segments = [{"start": (i % 90) / 10, "end": (i % 90) / 10 + 0.5, "text": f"cue {i}", "speaker": f"s{i}"}
                for i in range(cues)]
    return {"audio": ("call.wav", wav_bytes(tone(seconds, seed=2)), "audio/wav"),
            "transcript": ("call.json", json.dumps(segments).encode(), "application/json")}


def test_a_conversation_past_the_timeout_is_503_and_its_worker_stops(predictor, monkeypatch):
    """--timeout 1 and batches of 0.4 s: the answer is 503 at ~1 s (it was 200 after every
    batch ran), and the worker thread stops at its next batch instead of running on."""
    calls: list[float] = []
    real = predictor.engine.infer

    def slow(batch):
        calls.append(time.monotonic())
        time.sleep(0.4)
        return real(batch)

    monkeypatch.setattr(predictor.engine, "infer", slow)
    app = create_app(predictor, ServeOptions(request_timeout_s=1.0))
    with TestClient(app) as c:
        t0 = time.monotonic()
        r = c.post("/v1/conversation", files=_conversation_files(400))  # 13 batches of 32: over 5 s
        took = time.monotonic() - t0
        assert r.status_code == 503 and "no result within 1 s" in r.json()["error"], r.text[:300]
        assert took < 2.5
        answered = len(calls)
        time.sleep(1.5)
        assert len(calls) - answered <= 1, (answered, len(calls))  # at most the batch already running


def test_a_transcript_over_the_segment_limit_is_413_naming_it(predictor):
    with TestClient(create_app(predictor, ServeOptions(max_segments=5))) as c:
        assert c.post("/v1/conversation", files=_conversation_files(5)).status_code == 200
        r = c.post("/v1/conversation", files=_conversation_files(6))
    assert r.status_code == 413 and r.json()["error"] == "call.json: 6 segments, over this server's limit of 5 per request; split the recording"


@pytest.mark.parametrize("field, value", [("max_recording_seconds", float("nan")), ("request_timeout_s", float("inf")),
                                          ("grace_s", float("nan")), ("max_wait_ms", float("inf")),
                                          ("max_segments", 0), ("max_connections", 2.5)])
def test_serve_options_refuse_non_finite_and_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=f"{field} = {value!r} is invalid"):
        ServeOptions(**{field: value})
