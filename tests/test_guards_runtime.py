"""Runtime behaviours no other test could see break (issue 24, rows 6-10 and 12).

- the `truncated` flag of a clip given as a stream (decoding moves the stream's position, so the
  flag must be read from the header first), and of a clip exactly as long as the window (not
  truncated: the model reads all of it);
- Inf scores refused like NaN ones (+Inf and -Inf, alone in a batch and at warm-up);
- every CSV formula prefix (OWASP's list, written out here) escaped, in bulk and conversation CSVs;
- the upload limit on the running total of a chunked body without Content-Length;
- a conversation segment at 44.1 kHz prepared exactly as the same samples given alone (the
  resampler needs samples past the window's end: at 16 kHz nothing is resampled, so only another
  rate shows whether they were read).
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import soundfile as sf
from conftest_runtime import SR, predictor, rt, tone, wav_bytes  # noqa: F401 (fixtures)
from conftest_runtime import run_cli as _invoke

from dmf.runtime.predictor import Predictor, ResultError

WINDOW_S = 5.0  # the tiny artifact reads 80 000 samples at 16 kHz
RATE_44K = 44100
# OWASP "CSV injection": a cell starting with any of these is read as a formula by a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@pytest.fixture(scope="module")
def window_s(predictor) -> float:
    a = predictor.artifact
    assert a.input_samples / a.sample_rate == WINDOW_S  # the clip lengths below are built around it
    return WINDOW_S


# --------------------------------------------------------------------- rows 6 and 12: truncated

@pytest.mark.parametrize("kind", ["BytesIO", "file object"])
def test_a_long_stream_is_reported_truncated(rt, predictor, tmp_path, kind):
    """predict() and predict_batch() on streams: the flag comes from the header, read before the
    decoder moves the stream to its end; the prediction is the path's."""
    long6 = rt.clips["long6s.wav"]

    def stream():
        return io.BytesIO(long6.read_bytes()) if kind == "BytesIO" else open(long6, "rb")

    expected = predictor.predict(long6, "x")
    with stream() as fh:
        got = predictor.predict(fh, "x")
    assert got.truncated is True and got.label == expected.label
    assert got.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    with stream() as a, stream() as b:
        fh = io.BytesIO(rt.clips["good0.wav"].read_bytes())
        batch = predictor.predict_batch([(a, "x"), (fh, "y"), {"audio": b, "text": "z"}])
    assert [p.truncated for p in batch] == [True, False, True]


def _exact_clips(rate: int) -> dict[str, bytes]:
    """WAVs of exactly the window, one frame more, and one frame less, at `rate`."""
    frames = int(WINDOW_S * rate)
    assert frames / rate == WINDOW_S  # exactly representable
    return {f"{n:+d} frame": wav_bytes(tone((frames + n) / rate, rate=rate, seed=2), rate=rate) for n in (0, 1, -1)}


@pytest.mark.parametrize("rate", [SR, RATE_44K])
def test_a_clip_exactly_as_long_as_the_window_is_not_truncated(predictor, window_s, tmp_path, rate):
    clips = _exact_clips(rate)
    expected = {"+0 frame": False, "+1 frame": True, "-1 frame": False}
    for name, data in clips.items():
        path = tmp_path / f"{rate}{name}.wav"
        path.write_bytes(data)
        assert sf.info(path).frames == int(WINDOW_S * rate) + int(name[:2])
        for audio in (path, data, io.BytesIO(data)):
            assert predictor.is_truncated(audio) is expected[name], (name, type(audio))
        assert predictor.predict(path, "x").truncated is expected[name], name
    array = tone(WINDOW_S, rate=rate)
    assert array.shape[0] == int(WINDOW_S * rate)
    assert predictor.is_truncated(array, rate) is False
    assert predictor.is_truncated(np.concatenate([array, array[:1]]), rate) is True


def test_a_conversation_segment_exactly_as_long_as_the_window_is_not_truncated(predictor, window_s, tmp_path):
    from dmf.runtime.conversation import Segment

    recording = tmp_path / "call.wav"
    sf.write(recording, tone(12.0, seed=4), SR, subtype="PCM_16")
    segments = [Segment(1.0, 1.0 + window_s, "exactly the window", "A"),
                Segment(6.5, 6.5 + window_s + 0.01, "ten milliseconds more", "B")]
    result = predictor.predict_conversation(recording, segments)
    assert [t.truncated for t in result.turns] == [False, True]
    assert [t.windows for t in result.turns] == [1, 1]


# ---------------------------------------------------------------------------------- row 7: Inf

def _row(bad: float, where: int = 1) -> np.ndarray:
    row = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    row[where] = bad
    return row


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", [0, 2])
def test_postprocess_refuses_every_non_finite_score(predictor, bad, where):
    with pytest.raises(ResultError, match="not finite"):
        predictor.postprocess(_row(bad, where))
    with pytest.raises(ResultError, match="not finite"):
        predictor.postprocess(_row(bad, where).astype(np.float32))


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_inf_scores_are_refused_in_a_batch_and_at_warm_up(rt, predictor, monkeypatch, bad):
    real_infer = predictor.engine.infer

    def inf_second_row(batch):
        out = np.array(real_infer(batch), copy=True)
        out[1, 2] = bad
        return out

    monkeypatch.setattr(predictor.engine, "infer", inf_second_row)
    with pytest.raises(ResultError, match=r"items\[1\]: .*not finite"):
        predictor.predict_batch([(rt.clips["good0.wav"], "a"), (rt.clips["good1.wav"], "b")])
    monkeypatch.undo()

    from dmf.runtime import load_artifact
    from dmf.runtime.artifact import ArtifactError

    class InfEngine:
        name, providers, max_batch = "fake", ["none"], None

        def infer(self, batch):
            out = np.zeros((1, 4), np.float32)
            out[0, 0] = bad
            return out

        def close(self):
            pass

    with pytest.raises(ArtifactError, match="non-finite scores"):
        Predictor(load_artifact(rt.artifact), InfEngine())


# -------------------------------------------------------------------------- row 8: CSV formulas

def _read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_every_formula_start_is_escaped_in_the_bulk_csv(rt, tmp_path):
    """`dmf predict --manifest --out x.csv`: an id starting with each formula character comes back
    with a ' in front; the same characters later in an id are left alone. (The manifest reader
    strips white space around ids, so tab and CR cannot lead one: the conversation test has them.)"""
    ids = [f"{start}{k}+1" for k, start in enumerate(FORMULA_STARTS[:4])] + ["a=1", "plain"]
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "audio", "text"])
        writer.writeheader()
        writer.writerows({"id": i, "audio": str(rt.clips[f"good{k % 3}.wav"]), "text": "x"} for k, i in enumerate(ids))
    out = tmp_path / "o.csv"
    code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", out, "--no-progress",
                         "--threads", 1)
    assert code == 0, text
    got = [r["id"] for r in _read_csv(out)]
    assert got == ["'" + i for i in ids[:4]] + ["a=1", "plain"], got


def test_every_formula_start_is_escaped_in_the_conversation_csv(rt, tmp_path):
    """`dmf predict --transcript --out turns.csv`: speakers (kept as written) and texts (stripped of
    surrounding white space, so tab and CR cannot lead them) starting with a formula character.
    A CR inside a cell stays inside it (a CSV written with bare-LF rows left it unquoted: the row
    split and its second half, a formula, started a row of its own)."""
    import json

    recording = tmp_path / "call.wav"
    sf.write(recording, tone(2.0 + len(FORMULA_STARTS), seed=8), SR, subtype="PCM_16")
    segments = [{"start": k + 0.5, "end": k + 1.5, "text": f"{start}SUM(A1)", "speaker": f"{start}Eve"}
                for k, start in enumerate(FORMULA_STARTS)]
    segments.append({"start": 6.5, "end": 6.9, "text": "fine\r=HYPERLINK(1)", "speaker": "Mal\r@SUM(1)"})
    transcript = tmp_path / "call.json"
    transcript.write_text(json.dumps(segments), encoding="utf-8")
    out = tmp_path / "turns.csv"
    code, text = _invoke("predict", rt.artifact, "--audio", recording, "--transcript", transcript, "--out", out,
                         "--threads", 1)
    assert code == 0, text
    rows = _read_csv(out)
    assert [r["speaker"] for r in rows] == [f"'{start}Eve" for start in FORMULA_STARTS] + ["Mal\r@SUM(1)"]
    assert [r["text"] for r in rows] == [f"'{start}SUM(A1)" if start.strip() else "SUM(A1)"
                                         for start in FORMULA_STARTS] + ["fine\r=HYPERLINK(1)"]


# ------------------------------------------------------------------ row 9: chunked upload limit

LIMIT_MB = 0.05  # 52 428 bytes


def _multipart(audio: bytes, text: bytes, boundary: str = "guardb") -> tuple[bytes, dict]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + audio + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n").encode() + text + (
        f"\r\n--{boundary}--\r\n").encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def _post_chunked(app, body: bytes, headers: dict, chunk: int = 4096) -> tuple[int, dict]:
    """POST /v1/predict to the ASGI app as a server hands it a chunked request: no Content-Length,
    the body in `chunk`-byte pieces. (httpx's test transport joins a streamed body into one piece,
    where a per-piece check and a running total cannot be told apart.)"""
    import asyncio
    import json

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"test"), (b"transfer-encoding", b"chunked")]
             + [(k.encode(), v.encode()) for k, v in headers.items()]}
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    messages = iter([{"type": "http.request", "body": p, "more_body": True} for p in pieces]
                    + [{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[dict] = []

    async def run() -> None:
        answered = asyncio.Event()

        async def receive() -> dict:
            message = next(messages, None)
            if message is None:  # the body is over: the client then waits for the answer
                await answered.wait()
                return {"type": "http.disconnect"}
            return message

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered.set()

        await asyncio.wait_for(app(scope, receive, send), timeout=60)

    asyncio.run(run())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.mark.parametrize("limit_mb,status", [(LIMIT_MB, 413), (1.0, 200)])
def test_a_chunked_upload_over_the_limit_is_413(predictor, limit_mb, status):
    """1.7 s of 16-bit audio (~54 KB) plus a text field, in 4 KB pieces without Content-Length:
    each piece is far under the 52 KB limit, their total is over it. The same body under a 1 MB
    limit is answered 200 with the clip's prediction."""
    from dmf.runtime import ServeOptions, create_app

    audio = wav_bytes(tone(1.7, seed=5))
    body, headers = _multipart(audio, b"hello there")
    assert len(body) > LIMIT_MB * 1024 * 1024 > 4096
    app = create_app(predictor, ServeOptions(max_batch=2, max_wait_ms=1, max_upload_mb=limit_mb))
    try:
        got, answer = _post_chunked(app, body, headers)
    finally:
        app.state.batcher.close()
    assert got == status, answer
    if status == 413:
        assert "limit" in answer["error"]
    else:
        assert answer["label"] == predictor.predict(audio, "hello there").label


def test_http_truncated_flag_for_a_long_and_an_exact_clip(predictor, window_s):
    from starlette.testclient import TestClient

    from dmf.runtime import ServeOptions, create_app

    clips = _exact_clips(SR)
    app = create_app(predictor, ServeOptions(max_batch=2, max_wait_ms=1))
    with TestClient(app) as client:
        for name, truncated in (("+0 frame", False), ("+1 frame", True)):
            r = client.post("/v1/predict", files={"audio": ("a.wav", clips[name]), "text": (None, b"x")})
            assert r.status_code == 200 and r.json()["truncated"] is truncated, (name, r.text)


# -------------------------------------------------------------- row 10: 44.1 kHz conversations

def test_a_44k_segment_is_prepared_as_the_same_samples_alone(predictor, window_s, tmp_path, monkeypatch):
    """A 12 s recording at 44.1 kHz; segment 1.0-8.0 s is longer than the window. What the model
    gets for it equals what `preprocess` makes of those 7 s given alone (a file of its own)."""
    from dmf.runtime.conversation import Segment

    audio = tone(12.0, rate=RATE_44K, seed=6, freq=3000.0)
    recording = tmp_path / "call44k.wav"
    sf.write(recording, audio, RATE_44K, subtype="PCM_16")
    decoded, _ = sf.read(recording, dtype="float32")
    alone = tmp_path / "segment.wav"
    sf.write(alone, decoded[RATE_44K * 1:RATE_44K * 8], RATE_44K, subtype="FLOAT")
    expected = predictor.preprocess(alone, "a long turn")["audio"]
    fed = []
    real_infer = Predictor.infer

    def recording_infer(self, items):
        fed.extend(item["audio"].copy() for item in items)
        return real_infer(self, items)

    monkeypatch.setattr(Predictor, "infer", recording_infer)
    result = predictor.predict_conversation(recording, [Segment(1.0, 8.0, "a long turn", "A")])
    assert len(fed) == 1 and result.turns[0].truncated
    assert np.abs(fed[0] - expected).max() <= 1e-6, np.abs(fed[0] - expected).max()
