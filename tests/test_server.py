"""dmf.runtime.server: in-process (fastapi TestClient) and over a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest_runtime import ACCEPTED, BAD_AUDIO, BAD_TEXT, TEXTS, free_port, predictor, rt  # noqa: E402,F401

from dmf.runtime import ServeOptions, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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
    assert set(body) == {"label", "probabilities"} and body["label"] == expected.label
    assert np.allclose([body["probabilities"][k] for k in predictor.labels],
                       [expected.probabilities[k] for k in predictor.labels], atol=1e-5)
    # text as a plain form field works too
    r = client.post("/v1/predict", files={"audio": ("a.wav", rt.clips["good1.wav"].read_bytes())},
                    data={"text": "hello there"})
    assert r.status_code == 200 and r.json()["label"] == expected.label


@pytest.mark.parametrize("case", sorted({**BAD_AUDIO, **BAD_TEXT}))
def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(rt, client, case):
    clip, text, (_, fragment) = {**BAD_AUDIO, **BAD_TEXT}[case]
    r = client.post("/v1/predict", files=_files(rt, clip, text))
    assert r.status_code == 400, r.text
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
    assert r.status_code == 400 and "too many form fields" in r.json()["error"]
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/healthz").status_code == 200


def test_health_and_metrics(rt, predictor, client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["labels"] == list(predictor.labels)
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

def _start_server(artifact: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dmf.runtime.cli", "serve", str(artifact), "--port", str(port),
           "--threads", "1", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stdout.read()[-3000:]}")
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
            assert bad.status_code == 400 and fragment in bad.json()["error"], (case, bad.text)

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
        assert metrics["requests_by_status"]["200"] == 256 and metrics["requests_by_status"]["400"] == len(bad_cases)
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
