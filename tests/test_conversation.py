"""Conversations (#13): a recording + a time-stamped transcript -> one prediction per segment.

The recording is made of the runtime fixture's clips concatenated with silent gaps; every segment's
prediction must equal predicting that clip alone. Bad transcripts are refused with a message naming
the segment, through the API, the CLI and HTTP; a long recording is read segment by segment.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
from conftest_runtime import SR, predictor, rt, tone, wav_bytes  # noqa: F401 (fixtures)
from conftest_runtime import run_cli as _invoke

from dmf.runtime import conversation as conv
from dmf.runtime.conversation import Segment, TranscriptError, read_transcript
from dmf.runtime.outputs import write_turns

# (clip, speaker, text): 1.0, 1.5, 2.0, 2.5 and 6.0 s (the last longer than the 5 s window)
PARTS = [("good0.wav", "Alice", "i am so happy today"), ("good1.wav", "Bob", "this is terrible news"),
         ("good2.wav", "Alice", "leave me alone right now"), ("good3.wav", "Bob", "what a wonderful surprise"),
         ("long6s.wav", "Alice", "okay fine whatever")]
GAP_S = 0.5


def _ts(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def vtt(segments) -> str:
    cues = [f"{_ts(s.start, '.')} --> {_ts(s.end, '.')}\n<v {s.speaker}>{s.text}</v>\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def srt(segments) -> str:
    cues = [f"{i + 1}\n{_ts(s.start, ',')} --> {_ts(s.end, ',')}\n{s.speaker}: {s.text}\n" for i, s in enumerate(segments)]
    return "\n".join(cues)


def as_json(segments) -> str:
    return json.dumps([{"start": s.start, "end": s.end, "text": s.text, "speaker": s.speaker} for s in segments])


@pytest.fixture(scope="module")
def call(rt, tmp_path_factory):
    """call.wav (the clips with 0.5 s of silence before each) and its segments."""
    root = tmp_path_factory.mktemp("call")
    pieces, segments, t = [], [], 0.0
    for clip, speaker, text in PARTS:
        data, rate = sf.read(rt.clips[clip], dtype="float32")
        assert rate == SR
        pieces += [np.zeros(int(GAP_S * SR), np.float32), data]
        t += GAP_S
        segments.append(Segment(round(t, 3), round(t + len(data) / SR, 3), text, speaker))
        t += len(data) / SR
    pieces.append(np.zeros(int(GAP_S * SR), np.float32))
    audio = root / "call.wav"
    sf.write(audio, np.concatenate(pieces), SR, subtype="PCM_16")
    for name, writer in (("call.vtt", vtt), ("call.srt", srt), ("call.json", as_json)):
        (root / name).write_text(writer(segments), encoding="utf-8")
    return root, segments


@pytest.mark.parametrize("transcript", ["call.vtt", "call.srt", "call.json"])
def test_each_segment_equals_its_clip_alone(call, rt, predictor, transcript):
    root, expected = call
    segments = read_transcript(root / transcript)
    assert segments == expected  # times, text and speaker (voice tag, "Name:" prefix, JSON field)
    result = predictor.predict_conversation(root / "call.wav", segments)
    assert len(result.turns) == len(PARTS)
    for turn, (clip, _, text) in zip(result.turns, PARTS):
        alone = predictor.predict(rt.clips[clip], text)
        assert turn.prediction.label == alone.label
        for lab, p in alone.probabilities.items():
            assert turn.prediction.probabilities[lab] == pytest.approx(p, abs=1e-5)
        assert turn.truncated == alone.truncated == (clip == "long6s.wav")
    assert set(result.summary) == {"Alice", "Bob"}
    for shares in result.summary.values():
        assert sum(shares.values()) == pytest.approx(1.0)
    alice = [t.prediction.label for t in result.turns if t.segment.speaker == "Alice"]
    assert result.summary["Alice"][alice[0]] == pytest.approx(alice.count(alice[0]) / 3)


def test_single_clip_truncated_flag(rt, predictor):
    assert predictor.predict(rt.clips["long6s.wav"], "x").to_dict()["truncated"] is True
    assert predictor.predict(rt.clips["good0.wav"], "x").to_dict()["truncated"] is False
    batch = predictor.predict_batch([(rt.clips["long6s.wav"], "x"), (tone(2.0), "y", SR)])
    assert [p.truncated for p in batch] == [True, False]


def test_windows_policy_averages_log_probs(call, predictor):
    root, segments = call
    long_seg = segments[-1]
    result = predictor.predict_conversation(root / "call.wav", [long_seg], policy="windows")
    turn = result.turns[0]
    assert turn.truncated and turn.windows == 2  # 6 s = a 5 s window + a 1 s tail
    data, _ = sf.read(root / "call.wav", dtype="float32", start=int(long_seg.start * SR), stop=int(long_seg.end * SR))
    w = 5 * SR
    rows = [predictor.predict(data[:w + SR], long_seg.text, SR).log_probs, predictor.predict(data[w:], long_seg.text, SR).log_probs]
    expected = predictor.postprocess(np.mean(rows, axis=0))
    assert turn.prediction.label == expected.label
    for lab, p in expected.probabilities.items():
        assert turn.prediction.probabilities[lab] == pytest.approx(p, abs=1e-5)
    first = predictor.predict_conversation(root / "call.wav", [long_seg]).turns[0]
    assert first.windows == 1 and first.truncated


def _bad_cases(call):
    root, segs = call
    s0 = segs[0]
    return {
        "unknown_format": ("call.txt", "hello", "unknown transcript format '.txt'"),
        "unparseable_vtt": ("bad.vtt", "this is not a subtitle file\n", "no segments found"),
        "unparseable_json": ("bad.json", "[{\"start\": 0,", "unparseable JSON"),
        "end_before_start": ("bad.json", as_json([Segment(2.0, 1.0, "x", "A")]), "segment 0 (2.000-1.000 s): ends before it starts"),
        "outside_audio": ("bad.srt", srt([s0, Segment(30.0, 31.0, "late", "A")]), "segment 1 (30.000-31.000 s): outside the audio"),
        "empty_text": ("bad.json", as_json([s0, Segment(3.0, 4.0, "  ", "A")]), "segment 1 (3.000-4.000 s): empty text"),
    }


BAD_CASES = ["unknown_format", "unparseable_vtt", "unparseable_json", "end_before_start", "outside_audio", "empty_text"]


def _write_bad(call, folder, case):
    """The bad transcript `case` written under `folder` -> (its path, the expected message)."""
    name, content, message = _bad_cases(call)[case]
    (folder / name).write_text(content)
    return folder / name, message


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_transcripts_refused_via_api(call, predictor, tmp_path, case):
    root, _ = call
    path, message = _write_bad(call, tmp_path, case)
    with pytest.raises(TranscriptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predictor.predict_conversation(root / "call.wav", path)


def test_recording_over_the_limit_and_overlaps(call, predictor):
    root, segs = call
    with pytest.raises(TranscriptError, match="longer than the 5 s maximum"):
        predictor.predict_conversation(root / "call.wav", segs, max_recording_seconds=5)
    overlap = [segs[0], Segment(segs[0].start + 0.2, segs[0].end, segs[0].text, "Alice"),
               Segment(segs[0].start + 0.2, segs[0].end, segs[0].text, "Bob")]
    result = predictor.predict_conversation(root / "call.wav", overlap)
    assert len(result.turns) == 3
    assert len(result.warnings) == 1 and "segment 1" in result.warnings[0] and "'Alice'" in result.warnings[0]


def test_segment_too_short_names_the_segment(call, predictor):
    root, segs = call
    with pytest.raises(ValueError, match=r"segment 0 \(0\.500-0\.550 s\): .*shorter than"):
        predictor.predict_conversation(root / "call.wav", [Segment(0.5, 0.55, "hi", "A")])


def test_long_recording_is_read_segment_by_segment(predictor, tmp_path, monkeypatch):
    """10 minutes at 8 kHz, a 3 s turn every 10 s: reads are per segment and never the whole file,
    and Python-side allocations (4 segments at a time) stay far below the decoded recording
    (19 MB as float32)."""
    rate, minutes = 8000, 10
    audio = tmp_path / "long.wav"
    with sf.SoundFile(audio, "w", rate, 1, subtype="PCM_16") as out:
        for k in range(minutes * 6):
            out.write(tone(10.0, rate=rate, freq=150 + 10 * (k % 7), seed=k))
    segments = [Segment(10.0 * k + 1, 10.0 * k + 4, f"turn {k}", "AB"[k % 2]) for k in range(minutes * 6)]
    reads = []
    real_read = conv._Recording.read
    monkeypatch.setattr(conv._Recording, "read", lambda self, s, n: reads.append(n) or real_read(self, s, n))
    tracemalloc.start()
    try:
        result = predictor.predict_conversation(audio, segments, batch_size=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result.turns) == len(segments) and len(reads) == len(segments)
    assert max(reads) == pytest.approx(3.0)
    assert peak < 8 * 2**20, f"peak Python allocations {peak / 2**20:.1f} MiB"


def test_outputs_and_plot(call, predictor, tmp_path):
    root, segs = call
    result = predictor.predict_conversation(root / "call.wav", segs)
    write_turns(result, tmp_path / "turns.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [t.prediction.label for t in result.turns]
    assert rows[-1]["truncated"] is True and rows[0]["speaker"] == "Alice"
    formula = dataclasses.replace(result.turns[0], segment=dataclasses.replace(segs[0], text="=1+1"))
    write_turns(dataclasses.replace(result, turns=[formula] + result.turns[1:]), tmp_path / "turns.csv")
    lines = (tmp_path / "turns.csv").read_text().splitlines()
    assert len(lines) == len(segs) + 1 and lines[0].startswith("start,end,speaker,text,label,truncated")
    assert ",'=1+1," in lines[1]  # shown as text by a spreadsheet, not run as a formula
    with pytest.raises(ValueError, match="batch_size 0 is invalid"):
        predictor.predict_conversation(root / "call.wav", segs, batch_size=0)
    pytest.importorskip("matplotlib")
    conv.plot_timeline(result, tmp_path / "timeline.png")
    png = (tmp_path / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline.png", "turns.csv", "turns.jsonl"]  # no temp files


# ------------------------------------------------------------------------------------------- CLI

def test_cli_conversation_writes_turns_plot_and_summary(call, rt, predictor, tmp_path):
    root, segs = call
    out, plot = tmp_path / "turns.jsonl", tmp_path / "timeline.png"
    args = [rt.artifact, "--audio", root / "call.wav", "--transcript", root / "call.vtt", "--out", out, "--threads", 1]
    if conv._has_matplotlib():
        args += ["--plot", plot]
    code, output = _invoke("predict", *args)
    assert code == 0, output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = predictor.predict_conversation(root / "call.wav", segs)
    assert [r["label"] for r in rows] == [t.prediction.label for t in expected.turns]
    assert "Alice:" in output and "Bob:" in output and "1 segment(s) longer than the model's window" in output
    if conv._has_matplotlib():
        assert plot.stat().st_size > 5000
    code, output = _invoke("predict", rt.artifact, "--audio", root / "call.wav", "--transcript", root / "call.srt",
                           "--policy", "windows", "--threads", 1)
    assert code == 0, output
    assert len([line for line in output.splitlines() if "Alice" in line and "." in line]) >= 3  # turns on stdout


@pytest.mark.parametrize("name", ["turns.csv", "turns.jsonl", "turns.ndjson"])
def test_cli_conversation_takes_every_output_type_a_manifest_takes(call, rt, tmp_path, name):
    """One table of output types for both commands: --transcript once refused .ndjson."""
    root, segs = call
    code, output = _invoke("predict", rt.artifact, "--audio", root / "call.wav", "--transcript", root / "call.json",
                           "--out", tmp_path / name, "--threads", 1, "--no-progress")
    assert code == 0, output
    lines = (tmp_path / name).read_text().splitlines()
    assert len(lines) == len(segs) + (name.endswith(".csv"))
    if not name.endswith(".csv"):
        assert [json.loads(line)["text"] for line in lines] == [s.text for s in segs]


def test_cli_conversation_writes_parquet_with_the_csv_columns(call, rt, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow (the [ray] extra)")
    root, segs = call
    for name in ("turns.csv", "turns.parquet"):
        code, output = _invoke("predict", rt.artifact, "--audio", root / "call.wav", "--transcript", root / "call.json",
                               "--out", tmp_path / name, "--threads", 1, "--no-progress")
        assert code == 0, output
    table = pq.read_table(tmp_path / "turns.parquet")
    header = (tmp_path / "turns.csv").read_text().splitlines()[0].split(",")
    assert table.column_names == header and table.num_rows == len(segs)
    assert table.column("text").to_pylist() == [s.text for s in segs]
    assert str(table.schema.field("start").type) == "double" and str(table.schema.field("truncated").type) == "bool"


@pytest.mark.parametrize("case", BAD_CASES)
def test_cli_bad_transcripts_exit_2_and_write_nothing(call, rt, tmp_path, case):
    root, _ = call
    path, message = _write_bad(call, tmp_path, case)
    out = tmp_path / "out" / "turns.jsonl"
    out.parent.mkdir()
    code, output = _invoke("predict", rt.artifact, "--audio", root / "call.wav", "--transcript", path,
                           "--out", out, "--threads", 1)
    assert code == 2 and "error:" in output and message in " ".join(output.split()), output
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--policy", "middle"], "--policy 'middle' is invalid"),
    (["--out", "turns.txt"], "unknown output type '.txt'"),
    (["--text", "hello"], "--transcript goes with --audio RECORDING only"),
    (["--max-recording-seconds", "5"], "longer than the 5 s maximum"),
])
def test_cli_bad_options_exit_2(call, rt, tmp_path, extra, message):
    root, _ = call
    code, output = _invoke("predict", rt.artifact, "--audio", root / "call.wav", "--transcript", root / "call.json",
                           "--threads", 1, *extra)
    assert code == 2 and message in " ".join(output.split()), output


# ------------------------------------------------------------------------------------------ HTTP

@pytest.fixture(scope="module")
def client(predictor):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from dmf.runtime import ServeOptions, create_app

    with TestClient(create_app(predictor, ServeOptions(max_recording_seconds=60))) as c:
        yield c


def _post(client, root, transcript_name, transcript: bytes, **data):
    audio = (root / "call.wav").read_bytes()
    return client.post("/v1/conversation", data=data,
                       files={"audio": ("call.wav", audio, "audio/wav"), "transcript": (transcript_name, transcript)})


def test_http_conversation_matches_the_api(call, predictor, client):
    root, segs = call
    r = _post(client, root, "call.vtt", (root / "call.vtt").read_bytes(), policy="windows")
    assert r.status_code == 200, r.text
    body = r.json()
    expected = predictor.predict_conversation(root / "call.wav", segs, policy="windows")
    assert body["policy"] == "windows" and set(body["summary"]) == {"Alice", "Bob"}
    for got, exp in zip(body["turns"], expected.turns, strict=True):
        assert got["label"] == exp.prediction.label and got["truncated"] == exp.truncated
        assert got["speaker"] == exp.segment.speaker and got["windows"] == exp.windows
        for lab, p in exp.prediction.probabilities.items():
            assert got["probabilities"][lab] == pytest.approx(p, abs=1e-5)


@pytest.mark.parametrize("case", BAD_CASES)
def test_http_bad_transcripts_are_400_with_the_message(call, client, case):
    root, _ = call
    name, content, message = _bad_cases(call)[case]
    r = _post(client, root, name, content.encode())
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_http_recording_limit_and_bad_forms(call, client, predictor):
    root, segs = call
    from dmf.runtime import ServeOptions, create_app
    from starlette.testclient import TestClient

    with TestClient(create_app(predictor, ServeOptions(max_recording_seconds=5))) as small:
        r = _post(small, root, "call.json", as_json(segs).encode())
    assert r.status_code == 400 and "longer than the 5 s maximum" in r.json()["error"]
    r = _post(client, root, "call.json", as_json(segs).encode(), policy="middle")
    assert r.status_code == 400 and "policy 'middle' is invalid" in r.json()["error"]
    r = client.post("/v1/conversation", files={"audio": ("call.wav", b"RIFF")})
    assert r.status_code == 400 and "'transcript'" in r.json()["error"]


def test_cli_serve_refuses_a_bad_recording_limit(rt):
    code, output = _invoke("serve", rt.artifact, "--max-recording-seconds", 0)
    assert code == 2 and "max_recording_seconds = 0.0 is invalid" in output, output


def test_the_timeline_key_shows_the_opacity_its_bars_use():
    """The legend explains opacity with the same mapping the bars use: chance faint, certain solid."""
    key = conv.opacity_key(0.25)
    assert [p for p, _ in key] == [0.25, 0.625, 1.0]
    assert [a for _, a in key] == [conv.opacity(p, 0.25) for p, _ in key] == [0.25, 0.625, 1.0]
    assert conv.opacity(0.1, 0.25) == 0.25  # below chance is never more transparent than the key's faintest
