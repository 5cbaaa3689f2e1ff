"""Live sessions (#26): the VAD finds a generated conversation's utterances, each scored as the same
samples and text alone; text policies; any stream format; bounded memory over long streams;
`dmf listen` and `dmf bench --live`. Audio is fed as fast as taken (one test paces a short file)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import soundfile as sf
from conftest_runtime import predictor, rt  # noqa: F401 (fixtures)
from typer.testing import CliRunner

pytest.importorskip("webrtcvad", reason="the live extra (webrtcvad-wheels) is not installed")

from dmf.bench.live import boundary_error, long_stream, write_conversation  # noqa: E402
from dmf.runtime.conversation import read_transcript  # noqa: E402
from dmf.runtime.live import (LiveEvent, LiveOptions, LiveSession, StreamFormat, UnknownUtterance,  # noqa: E402
                              transcript_text)
from dmf.runtime.prediction import Prediction  # noqa: E402

RATE = 16000


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    """A conversation of 8 synthetic utterances: (folder, true segments, int16 samples)."""
    folder = tmp_path_factory.mktemp("live")
    truth = write_conversation(folder, utterances=8, seed=3)
    return folder, truth, sf.read(folder / "conv.wav", dtype="int16")[0]


def stub(samples, text):
    return Prediction("neu", {"neu": 1.0})


def feed_all(session: LiveSession, pcm: bytes, step: int = 640) -> list[LiveEvent]:
    events = []
    for i in range(0, len(pcm), step):
        events += session.feed(pcm[i:i + step])
    return events + session.finish()


def utterances(events):
    return [e for e in events if e.kind == "utterance"]


@pytest.fixture(scope="module")
def scored(conv, predictor):
    """The conversation through a session scored by the tiny model, with the transcript's text."""
    folder, truth, audio = conv
    window = predictor.artifact.input_samples / predictor.artifact.sample_rate
    session = LiveSession(lambda a, t: predictor.predict(a, t, RATE), StreamFormat(),
                          LiveOptions(max_utterance_s=window), text_span=transcript_text(truth))
    return feed_all(session, audio.tobytes())


def test_conversation_found_and_each_utterance_equals_its_clip_alone(conv, scored, predictor):
    folder, truth, audio = conv
    found = utterances(scored)
    assert boundary_error(found, truth) is not None and boundary_error(found, truth) <= 0.2
    assert [e.text for e in found] == [s.text for s in truth]
    assert [e.utterance_id for e in scored if e.kind == "speech_started"] == [e.utterance_id for e in found]
    for e in found:  # the event's samples are the stream's [start, end): scored alone, the same result
        alone = predictor.predict(audio[round(e.start_s * RATE):round(e.end_s * RATE)] / 32768.0, e.text, RATE)
        assert e.label == alone.label and e.probabilities == pytest.approx(alone.probabilities, abs=1e-6)


def test_labels_equal_the_offline_conversation_prediction(conv, scored, predictor):
    """`dmf predict --audio conv.wav --transcript` on the utterances' spans gives the same labels."""
    folder, truth, audio = conv
    found = utterances(scored)
    spans = [{"start": e.start_s, "end": e.end_s, "text": e.text} for e in found]
    offline = predictor.predict_conversation(folder / "conv.wav", spans)
    assert [t.prediction.label for t in offline.turns] == [e.label for e in found]


def test_any_format_chunking_and_rate_finds_the_same_utterances(conv):
    folder, truth, audio = conv
    base = utterances(feed_all(LiveSession(stub), audio.tobytes()))
    odd = utterances(feed_all(LiveSession(stub), audio.tobytes(), step=1001))  # splits samples across feeds
    assert [(e.start_s, e.end_s) for e in odd] == [(e.start_s, e.end_s) for e in base]
    import soxr

    stereo = soxr.resample(audio / 32768.0, RATE, 44100).astype("<f4")
    stereo = np.stack([stereo, 0.5 * stereo], axis=1)  # interleaved float32 at 44.1 kHz
    fmt = StreamFormat.from_dict({"sample_rate": 44100, "channels": 2, "sample_format": "float32"})
    resampled = utterances(feed_all(LiveSession(stub, fmt), stereo.tobytes(), step=44100 * 8 // 50))
    assert boundary_error(resampled, truth) is not None and boundary_error(resampled, truth) <= 0.2


@pytest.mark.parametrize("fields, message", [
    ({"sample_rate": 0}, "sample_rate 0 is invalid"),
    ({"channels": 2.0}, "channels 2.0 is invalid"),
    ({"sample_format": "int24"}, "sample_format 'int24' is invalid"),
    ({"rate": 16000}, "unknown field(s) ['rate']"),
])
def test_stream_format_names_the_bad_field(fields, message):
    with pytest.raises(ValueError, match=None) as err:
        StreamFormat.from_dict(fields)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fields, message", [
    ({"threshold": 0.0}, "threshold 0.0 is invalid"),
    ({"min_silence_s": float("nan")}, "min_silence_s nan is invalid"),
    ({"end_pad_s": 0.5}, "end_pad_s 0.5 is invalid"),
    ({"max_utterance_s": 0.2}, "max_utterance_s 0.2 is invalid"),
    ({"empty_text": "drop"}, "empty_text 'drop' is invalid"),
    ({"aggressiveness": 4}, "aggressiveness 4 is invalid"),
    ({"aggressiveness": True}, "aggressiveness True is invalid"),
])
def test_live_options_name_the_bad_field(fields, message):
    with pytest.raises(ValueError) as err:
        LiveOptions(**fields)
    assert message in str(err.value)


def test_bad_pcm_is_refused_in_one_line():
    session = LiveSession(stub, StreamFormat(sample_format="float32"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        session.feed(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected \(n,\) or \(n, 1\)"):
        session.feed(np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="expected bytes or a numpy array"):
        session.feed("pcm")
    session.finish()
    with pytest.raises(ValueError, match="finished"):
        session.feed(b"\0\0\0\0")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _first_utterance_audio(conv) -> bytes:
    folder, truth, audio = conv
    return audio[:round((truth[0].end + 0.6) * RATE)].tobytes()  # the first utterance and its silence


def test_text_wait_provide_text_and_expiry(conv):
    clock, seen = Clock(), []
    score = lambda a, t: (seen.append(t), Prediction("neu", {"neu": 1.0}))[1]  # noqa: E731
    session = LiveSession(score, options=LiveOptions(text_wait_s=2.0), clock=clock)
    events = session.feed(_first_utterance_audio(conv))
    assert [e.kind for e in events] == ["speech_started"] and session.pending == 1  # waiting for text
    clock.now = 1.0
    assert session.poll() == []
    done = session.provide_text(0, "thank you so much")
    assert done[0].text == "thank you so much" and seen == ["thank you so much"] and done[0].latency_s == 1.0
    with pytest.raises(UnknownUtterance, match="utterance 0 is unknown"):  # already scored
        session.provide_text(0, "again")
    session2 = LiveSession(score, options=LiveOptions(text_wait_s=2.0), clock=clock)
    session2.feed(_first_utterance_audio(conv))
    clock.now = 3.5
    expired = session2.poll()
    assert expired[0].text == "..." and expired[0].label == "neu"  # placeholder policy after the wait


def test_early_text_skip_policy_and_pending_bound(conv):
    session = LiveSession(stub, options=LiveOptions(empty_text="skip"))
    pcm = _first_utterance_audio(conv)
    started = [e for e in session.feed(pcm[:len(pcm) // 2]) if e.kind == "speech_started"]
    assert session.provide_text(started[0].utterance_id, "said early") == []  # open: kept until it closes
    assert utterances(session.feed(pcm[len(pcm) // 2:]))[0].text == "said early"
    folder, truth, audio = conv
    skipped = utterances(feed_all(LiveSession(stub, options=LiveOptions(empty_text="skip")), audio.tobytes()))
    assert all(e.label is None and "skip" in e.error for e in skipped)
    bounded = LiveSession(stub, options=LiveOptions(text_wait_s=60.0, max_pending=2), clock=Clock())
    events = bounded.feed(audio.tobytes())
    assert bounded.pending == 2 and len(utterances(events)) == len(truth) - 2  # the oldest were scored


def test_finish_closes_an_open_utterance_and_drops_a_short_burst(conv):
    folder, truth, audio = conv
    middle = round((truth[0].start + truth[0].end) / 2 * RATE)
    session = LiveSession(stub)
    events = session.feed(audio[:middle].tobytes()) + session.finish()
    assert [e.kind for e in events] == ["speech_started", "utterance"]
    assert truth[0].start - 0.2 <= events[1].start_s and events[1].end_s <= middle / RATE
    burst = audio[:round((truth[0].start + 0.15) * RATE)].tobytes()  # ~0.05 s of speech: under min_speech_s
    short = LiveSession(stub)
    assert short.feed(burst) + short.finish() == []


def test_long_streams_keep_memory_flat_cut_speech_and_lose_nothing(predictor):
    """Three minutes of speech without pauses and of silence (an hour each: docs/live.md)."""
    score = lambda a, t: predictor.predict(a, t, RATE)  # noqa: E731
    speech = long_stream(score, "speech", 180.0, max_utterance_s=5.0, sample_every_s=30.0)
    assert speech["ids_consistent"] and speech["scored"] == speech["utterances"]
    assert speech["cut"] >= 30 and speech["longest_s"] <= 5.0 + 1e-9
    assert speech["speech_covered_s"] >= 0.9 * speech["audio_s"]
    traced = [m["traced_kb"] for m in speech["memory"][1:]]
    # no growth past the first half minute: one 5 s utterance kept would be 320 KB
    assert max(traced) - min(traced) < 256, speech["memory"]
    silence = long_stream(score, "silence", 180.0, sample_every_s=30.0)
    assert silence["utterances"] == 0
    traced = [m["traced_kb"] for m in silence["memory"][1:]]
    assert max(traced) - min(traced) < 256, silence["memory"]


def _invoke(*args):
    from dmf.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_dmf_listen_writes_the_events_the_session_gives(conv, scored, rt, tmp_path):
    folder, truth, audio = conv
    out = tmp_path / "events.jsonl"
    result = _invoke("listen", rt.artifact, "--audio", folder / "conv.wav", "--transcript", folder / "conv.vtt",
                     "--out", out)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = [r for r in rows if r["type"] == "utterance"]
    want = utterances(scored)
    assert [(r["start_s"], r["end_s"], r["label"], r["text"]) for r in got] == \
        [(e.start_s, e.end_s, e.label, e.text) for e in want]
    assert want[-1].label in result.output  # the live table shows the turns


def test_dmf_listen_realtime_paces_the_file(conv, rt, tmp_path):
    folder, truth, audio = conv
    short = tmp_path / "short.wav"
    sf.write(short, audio[:round((truth[0].end + 0.5) * RATE)], RATE, subtype="PCM_16")
    seconds = sf.info(short).duration
    start = time.monotonic()
    result = _invoke("listen", rt.artifact, "--audio", short, "--realtime", "--out", tmp_path / "e.jsonl")
    assert result.exit_code == 0, result.output
    assert time.monotonic() - start >= 0.9 * seconds  # fed at the file's pace, not at once
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows] == ["speech_started", "utterance"] and rows[1]["text"] == "..."


def test_dmf_listen_refuses_bad_options_and_missing_sounddevice(conv, rt, tmp_path, monkeypatch):
    folder, truth, audio = conv
    for args, message in [((), "give --mic or --audio FILE"),
                          (("--audio", folder / "conv.wav", "--end-pad", "0.5"), "end_pad_s 0.5 is invalid"),
                          (("--audio", tmp_path / "missing.wav"), "missing.wav"),
                          (("--audio", folder / "conv.wav", "--transcript", folder / "conv.wav"), "unknown transcript format")]:
        result = _invoke("listen", rt.artifact, *args)
        assert result.exit_code == 2 and message in result.output, result.output
    monkeypatch.setitem(__import__("sys").modules, "sounddevice", None)  # import fails as when not installed
    result = _invoke("listen", rt.artifact, "--mic")
    assert result.exit_code == 2 and "--mic needs sounddevice" in result.output and "[mic]" in result.output
    monkeypatch.setitem(__import__("sys").modules, "webrtcvad", None)
    result = _invoke("listen", rt.artifact, "--audio", folder / "conv.wav")
    assert result.exit_code == 2 and "need webrtcvad" in result.output and "[live]" in result.output


def test_dmf_listen_mic_reads_sounddevice_blocks(conv, rt, tmp_path, monkeypatch):
    """--mic through a stand-in sounddevice whose stream delivers the conversation's first seconds."""
    import types

    folder, truth, audio = conv
    head = audio[:round((truth[0].end + 0.5) * RATE)]

    class InputStream:
        def __init__(self, samplerate, channels, dtype, callback, blocksize):
            assert (samplerate, channels, dtype) == (RATE, 1, "int16")
            self.callback, self.blocksize = callback, blocksize

        def __enter__(self):
            for i in range(0, len(head), self.blocksize):
                self.callback(head[i:i + self.blocksize].reshape(-1, 1), self.blocksize, None, None)
            return self

        def __exit__(self, *exc):
            return False

    fake = types.SimpleNamespace(InputStream=InputStream, PortAudioError=type("PortAudioError", (Exception,), {}))
    monkeypatch.setitem(__import__("sys").modules, "sounddevice", fake)
    out = tmp_path / "mic.jsonl"
    result = _invoke("listen", rt.artifact, "--mic", "--seconds", len(head) / RATE, "--out", out)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["type"] for r in rows] == ["speech_started", "utterance"]
    assert abs(rows[1]["start_s"] - truth[0].start) <= 0.2 and abs(rows[1]["end_s"] - truth[0].end) <= 0.2


def test_transcript_text_takes_the_overlapped_segments(conv):
    folder, truth, audio = conv
    text_span = transcript_text(read_transcript(folder / "conv.vtt"))
    assert text_span(truth[0].start - 0.03, truth[1].end + 0.1) == f"{truth[0].text} {truth[1].text}"
    assert text_span(truth[0].end + 0.01, truth[1].start - 0.01) is None  # the silence between them
    assert text_span(truth[0].start - 0.5, truth[0].start + 0.02) is None  # under the 50 ms overlap


def test_dmf_bench_live_reports_latency_and_real_time_factor(rt, tmp_path):
    result = _invoke("bench", rt.artifact, "--live", "--utterances", 4, "--threads", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "live.json").read_text())
    assert report["utterances_found"] == report["utterances_true"] == 4
    assert report["boundary_error_max_s"] <= 0.2
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert 0 < report["rtf_vad"] < report["rtf"]  # scoring costs on top of the VAD
    assert "cpu_line" in report["machine"] and "| p50 ms |" in result.output
    refused = _invoke("bench", rt.artifact, rt.artifact, "--live")
    assert refused.exit_code == 2 and "--live times one exported artifact" in refused.output


def test_the_live_path_imports_no_torch(tmp_path):
    """Live sessions, `dmf listen` and `dmf bench --live` (conversation included) run on a
    runtime-only install: nothing on their path loads torch."""
    import subprocess
    import sys

    code = ("import sys, dmf.runtime.live, dmf.runtime.live_cli, dmf.bench.live, dmf.bench.cli; "
            f"dmf.bench.live.write_conversation({str(tmp_path)!r}, 2); "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)
