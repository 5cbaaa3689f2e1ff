"""Hostile input, round two (#22): paths that are not files, cut and odd headers, JSON that breaks
the parser, CSV quotes that swallow rows, options that cannot hold, transcripts that lie about
time or drive the terminal, a segment whose windows would all sit in memory, and SIGTERM during a
manifest. Each table row is one class of input; each must be refused with a one-line message (or,
where the input is valid, handled correctly), never hang, never crash."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest_runtime import SR, predictor, rt, tone, wav_bytes  # noqa: F401 (fixtures)
from conftest_runtime import run_cli as _cli

from dmf.contract import AUDIO_INPUT
from dmf.data import ManifestError
from dmf.data.manifest import load_prediction_rows
from dmf.preprocess import AudioError, load_audio, preprocess_audio
from dmf.runtime import InputError, MicroBatcher, Predictor
from dmf.runtime.conversation import Segment, TranscriptError, read_transcript

HANG_S = 10  # an answer slower than this is a hang


def _one_line_error(code: int, output: str, fragment: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and fragment in errors[0], (code, output[-800:])
    assert "Traceback" not in output


# -------------------------------------------------------------- 1. paths that are not regular files

def _release(fifo: Path) -> None:
    """Give a reader blocked in open(fifo) its writer and EOF, so a failing test cannot leave a
    thread holding libsndfile's lock (which would hang every later test)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting


def _outcome(fn, fifo: Path | None = None):
    """fn()'s result or exception, or "hang" if it does not return within HANG_S."""
    box: list = []

    def run():
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_S)
    if not box and fifo is not None:
        _release(fifo)
        thread.join(HANG_S)
        return "hang"
    return box[0] if box else "hang"


def _fifo_manifest(fifo: Path) -> None:
    manifest = fifo.parent / "m.jsonl"
    manifest.write_text(json.dumps({"audio": str(fifo), "text": "x"}) + "\n")
    load_prediction_rows(manifest)


NOT_A_FILE = {  # name -> (call given (predictor, fifo path), the error it must raise, message fragment)
    "FIFO to predict": (lambda p, f: p.predict(str(f), "x"), AudioError, "not a regular file"),
    "FIFO as a Path": (lambda p, f: p.predict(f, "x"), AudioError, "not a regular file"),
    "/dev/zero to predict": (lambda p, f: p.predict("/dev/zero", "x"), AudioError, "not a regular file"),
    "FIFO as a recording": (lambda p, f: p.predict_conversation(str(f), [Segment(0.0, 1.0, "x")]), AudioError,
                            "not a regular file"),
    "FIFO as a transcript": (lambda p, f: read_transcript(f.with_suffix(".json")), TranscriptError,
                             "{fifo}: is not a regular file"),
    "NUL in a transcript path": (lambda p, f: read_transcript(str(f.parent / "t\0.json")), TranscriptError,
                                 "the path contains a NUL character"),
    "FIFO in a manifest": (lambda p, f: _fifo_manifest(f), ManifestError, "not a regular file"),
    "/dev/zero in load_audio": (lambda p, f: load_audio("/dev/zero"), AudioError, "not a regular file"),
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("name", list(NOT_A_FILE))
def test_a_path_that_is_not_a_regular_file_is_refused_without_blocking(name, predictor, rt, tmp_path):
    call, error, fragment = NOT_A_FILE[name]
    fifo = tmp_path / "fifo.wav"
    os.mkfifo(fifo)
    os.mkfifo(fifo.with_suffix(".json"))
    outcome = _outcome(lambda: call(predictor, fifo), fifo)
    _release(fifo.with_suffix(".json"))
    fragment = fragment.replace("{fifo}", str(fifo.with_suffix(".json")))
    assert isinstance(outcome, error) and str(outcome).count(fragment) == 1, outcome
    assert str(outcome).count(str(fifo.with_suffix(".json"))) <= 1, outcome  # named once
    # and the process still decodes: nothing holds libsndfile's lock
    assert _outcome(lambda: predictor.predict(str(rt.clips["good0.wav"]), "x").label) in predictor.labels


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_the_cli_refuses_a_fifo_audio_path(rt, tmp_path):
    fifo = tmp_path / "fifo.wav"
    os.mkfifo(fifo)
    outcome = _outcome(lambda: _cli("predict", rt.artifact, "--audio", fifo, "--text", "x"), fifo)
    assert outcome != "hang"
    _one_line_error(*outcome, "not a regular file")


# --------------------------------------------------------------------------- 2. batcher options

@pytest.mark.parametrize("wait", [math.inf, math.nan, -1.0, 1e300, "5", True])
def test_the_batcher_refuses_a_wait_it_cannot_keep(wait):
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(lambda items: items, max_wait_ms=wait)


def test_dmf_serve_refuses_a_batch_wait_the_batcher_cannot_keep(rt, monkeypatch):
    import dmf.runtime.server as server

    def no_serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(server, "serve", no_serve)
    _one_line_error(*_cli("serve", rt.artifact, "--max-wait-ms", "100000"), "--max-wait-ms 100000 is invalid")


@pytest.mark.parametrize("args", [(), ("clip.wav",), ("clip.wav", "x", 16000, "extra")], ids=len)
def test_submit_with_the_wrong_arguments_raises_input_error_at_once(predictor, args):
    with MicroBatcher(predictor) as batcher:
        with pytest.raises(InputError, match=r"submit\(.*expected \(audio, text, \[sample_rate\]\)"):
            batcher.submit(*args)


# ------------------------------------------------------------------ 3. a cut header in a manifest

def test_a_manifest_batch_with_a_cut_wav_writes_its_valid_rows(rt, tmp_path):
    cut = tmp_path / "cut.wav"
    cut.write_bytes(rt.clips["good0.wav"].read_bytes()[:20])  # ends inside the fmt chunk
    rows = [{"audio": str(rt.clips["good1.wav"]), "text": "a", "id": "ok1"}, {"audio": str(cut), "text": "b", "id": "cut"},
            {"audio": str(rt.clips["good2.wav"]), "text": "c", "id": "ok2"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, output = _cli("predict", rt.artifact, "--manifest", manifest, "--out", tmp_path / "o.jsonl",
                        "--no-progress")
    assert code == 2 and "Traceback" not in output, output
    written = {r["id"]: r for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    assert written["ok1"]["label"] in rt_labels(rt) and written["ok2"]["label"] in rt_labels(rt)
    assert written["cut"]["label"] is None and "truncated WAV" in written["cut"]["error"]


def rt_labels(rt) -> list[str]:
    return json.loads((rt.artifact / "dmf.json").read_text())["labels"]


# ----------------------------------------------------------------- 4-6. JSON that breaks the parser

HUGE_NUMBER = "9" * 5000
DEEP = "[" * 100_000 + "]" * 100_000


def _manifest_problems(tmp_path: Path, line: str) -> list[str]:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(line + "\n")
    with pytest.raises(ManifestError) as err:
        load_prediction_rows(manifest)
    return err.value.problems


BAD_JSON = {  # name -> (how it is read, given tmp_path -> the one-line message it must give)
    "manifest line with a 5000-digit id": lambda tmp: _manifest_problems(
        tmp, '{"audio": "a.wav", "text": "x", "id": %s}' % HUGE_NUMBER)[0],
    "manifest array with a 5000-digit id": lambda tmp: _manifest_problems(
        tmp, '[{"audio": "a.wav", "text": "x", "id": %s}]' % HUGE_NUMBER)[0],
    "transcript with a 5000-digit time": lambda tmp: str(_outcome(lambda: read_transcript(
        ('[{"start": %s, "end": 1, "text": "x"}]' % HUGE_NUMBER).encode(), name="t.json"))),
    "transcript nested 100 000 deep": lambda tmp: str(_outcome(lambda: read_transcript(DEEP.encode(), name="t.json"))),
}


@pytest.mark.parametrize("name", list(BAD_JSON))
def test_json_that_breaks_the_parser_is_a_one_line_problem(name, tmp_path):
    message = BAD_JSON[name](tmp_path)
    assert "malformed JSON" in message or "unparseable JSON" in message, message
    assert "set_int_max_str_digits" not in message and "\n" not in message


def test_a_deeply_nested_transcript_is_refused_by_the_cli_and_http(rt, predictor, tmp_path):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from dmf.runtime import ServeOptions, create_app

    transcript = tmp_path / "deep.json"
    transcript.write_text(DEEP)
    _one_line_error(*_cli("predict", rt.artifact, "--audio", rt.clips["good0.wav"], "--transcript", transcript),
                    "nested too deeply")
    with TestClient(create_app(predictor, ServeOptions())) as client:
        r = client.post("/v1/conversation", files={"audio": ("a.wav", rt.clips["good0.wav"].read_bytes()),
                                                   "transcript": ("t.json", DEEP.encode())})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"], r.text


# ---------------------------------------------------------------------- 7. streamed FLAC's last block

def _open_length_flac(data: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="FLAC", subtype="PCM_16")
    flac = bytearray(buf.getvalue())
    flac[21] &= 0xF0  # STREAMINFO's 36-bit total-samples field = 0: length not known
    flac[22:26] = b"\0\0\0\0"
    return bytes(flac)


@pytest.mark.parametrize("seconds", [0.5, 1.0, 1.5, 2.3])
def test_a_streamed_flac_decodes_to_its_last_frame(seconds):
    clip = tone(seconds, seed=3)
    data, rate = load_audio(_open_length_flac(clip, SR))
    assert sf.info(io.BytesIO(_open_length_flac(clip, SR))).frames > 2**62  # libsndfile: length open
    assert rate == SR and data.shape == clip.shape
    np.testing.assert_allclose(data, clip, atol=1 / 2**15)


# -------------------------------------------------------------------- 8. a CSV quote never closed

@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_an_unclosed_csv_quote_is_a_problem_not_a_swallowed_row(rt, tmp_path, suffix, sep):
    clip = rt.clips["good0.wav"]
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text(f"audio{sep}text\n{clip}{sep}\"hello\n{clip}{sep}two\n{clip}{sep}three\n")
    with pytest.raises(ManifestError) as err:
        load_prediction_rows(manifest)
    assert err.value.problems == [f"line 2: unreadable CSV record: a quoted field opened here is never closed "
                                  f"(lines 2-4 would be one field)"]


# ------------------------------------------------------- 10. raw exceptions from the conversation API

BAD_SEGMENTS = {  # name -> (segments, fragment of the TranscriptError)
    "text None": ([Segment(0.0, 1.0, None)], "text must be a string, got NoneType"),
    "text int": ([Segment(0.0, 1.0, 5)], "text must be a string, got int"),
    "NaN start": ([Segment(math.nan, 1.0, "x")], "start nan is not a finite number"),
    "string end": ([Segment(0.0, "1.0", "x")], "end '1.0' is not a finite number"),
    "dict speaker": ([Segment(0.0, 1.0, "x", {"name": "Eve"})], "speaker must be a string or null, got dict"),
    "an int segment": ([7], "expected a Segment or a dict"),
    "a dict without end": ([{"start": 0.0, "text": "x"}], "missing field(s) end"),
    "one dict, not a list": ({"start": 0.0, "end": 1.0, "text": "x"}, "expected a list of segments, got dict"),
    "a number": (42, "expected a list of segments, got int"),
}


@pytest.mark.parametrize("name", list(BAD_SEGMENTS))
def test_bad_segments_from_the_api_raise_transcript_error(name, predictor, rt):
    segments, fragment = BAD_SEGMENTS[name]
    with pytest.raises(TranscriptError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        predictor.predict_conversation(str(rt.clips["good2.wav"]), segments)


def test_dict_segments_are_read_as_a_json_transcript_is(predictor, rt):
    as_dicts = predictor.predict_conversation(str(rt.clips["good2.wav"]),
                                              [{"start": 0.0, "end": 1.5, "text": "hi there", "speaker": "Ann"}])
    as_segments = predictor.predict_conversation(str(rt.clips["good2.wav"]), [Segment(0.0, 1.5, "hi there", "Ann")])
    assert as_dicts.to_dict() == as_segments.to_dict()


@pytest.mark.parametrize("items", [None, 5, "clip.wav", {"audio": "a", "text": "b"}], ids=repr)
def test_predict_batch_refuses_what_is_not_a_list_of_items(predictor, items):
    with pytest.raises(InputError, match="items: expected a list"):
        predictor.predict_batch(items)


# ------------------------------------------------------------------------- 11. limits that cannot hold

@pytest.mark.parametrize("option, value", [("min_clip_seconds", -1.0), ("min_clip_seconds", math.nan),
                                           ("max_clip_seconds", 0), ("max_clip_seconds", math.nan),
                                           ("max_clip_seconds", math.inf), ("max_clip_seconds", -5),
                                           ("max_clip_seconds", 0.05), ("max_text_chars", 0), ("max_text_chars", 2.5)])
def test_predictor_limits_that_cannot_hold_are_refused_before_loading(option, value, tmp_path):
    # a folder with no artifact: the option is judged before anything is read
    with pytest.raises(ValueError, match=option):
        Predictor.load(tmp_path, **{option: value})


@pytest.mark.parametrize("option", ["--max-recording-seconds", "--max-clip-seconds"])
@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_the_cli_refuses_a_length_limit_that_cannot_hold(rt, option, value, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([{"start": 0, "end": 1, "text": "x"}]))
    code, output = _cli("predict", rt.artifact, "--audio", rt.clips["good1.wav"], "--transcript",
                        tmp_path / "t.json", option, value)
    _one_line_error(code, output, option)


# ----------------------------------------------------------------------------------- 12. audio odds

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32])
def test_integer_pcm_arrays_of_any_signedness_are_scaled_to_full_scale(dtype):
    info = np.iinfo(dtype)
    zero, scale = (info.max // 2 + 1, info.max // 2 + 1) if info.min == 0 else (0, -info.min)  # offset-binary
    pcm = np.round(tone(1.0, seed=5) * 0.9 * scale + zero).astype(dtype)
    as_float = ((pcm.astype(np.float64) - zero) / scale).astype(np.float32)
    np.testing.assert_array_equal(preprocess_audio(pcm, SR), preprocess_audio(as_float, SR))


def test_a_uint8_array_reads_as_its_8_bit_wav_file_does():
    pcm = np.round(tone(1.0, seed=6) * 100 + 128).astype(np.uint8)
    buf = io.BytesIO()
    sf.write(buf, (pcm.astype(np.float64) - 128) / 128, SR, format="WAV", subtype="PCM_U8")  # exact: k / 128
    np.testing.assert_array_equal(preprocess_audio(pcm, SR), preprocess_audio(buf.getvalue()))


def _mp3(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate=rate), rate, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()


ID3_TAG = b"ID3\x03\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10  # an empty 10-byte ID3v2.3 tag
MPEG_GARBAGE = {  # name -> bytes that start like MPEG audio and are not
    "MPEG-1 sync word, then random bytes": b"\xff\xfb\x90\x64" + np.random.default_rng(1).bytes(4000),
    "MPEG-2 sync word, then zeros": b"\xff\xf3\x88\xc4" + bytes(3000),
    "ID3 tag, then a sync word and random bytes": ID3_TAG + b"\xff\xfb\x90\x64" + np.random.default_rng(2).bytes(3000),
}


@pytest.mark.parametrize("name", list(MPEG_GARBAGE))
@pytest.mark.parametrize("through", ["preprocess_audio", "Predictor.predict"])
def test_mpeg_garbage_is_refused_without_decoder_noise_on_stderr(name, through, predictor, capfd):
    call = preprocess_audio if through == "preprocess_audio" else lambda data: predictor.predict(data, "hello")
    capfd.readouterr()
    with pytest.raises(AudioError, match="not readable audio \\(format not recognised"):
        call(MPEG_GARBAGE[name])
    err = capfd.readouterr().err  # what the C decoder writes to fd 2 lands here too
    assert err == "", err


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
@pytest.mark.parametrize("tagged", [False, True], ids=["bare", "ID3"])
def test_a_valid_mp3_is_still_decoded(rate, tagged):
    data, got_rate = load_audio((ID3_TAG if tagged else b"") + _mp3(1.0, rate))
    assert got_rate == rate and abs(len(data) - rate) < rate * 0.1


# -------------------------------------------------------------------------------- 13. transcripts

NEGATIVE_TIMES = {
    "SRT start": ("t.srt", "1\n-00:00:01,000 --> 00:00:02,000\nhello\n"),
    "SRT end": ("t.srt", "1\n00:00:01,000 --> -00:00:02,000\nhello\n"),
    "VTT start": ("t.vtt", "WEBVTT\n\n-00:01.000 --> 00:02.000\nhello\n"),
    "VTT spaced minus": ("t.vtt", "WEBVTT\n\n- 00:00:01.000 --> 00:00:02.000\nhello\n"),
}


@pytest.mark.parametrize("name", list(NEGATIVE_TIMES))
def test_a_negative_cue_time_is_refused_not_read_as_positive(name):
    filename, text = NEGATIVE_TIMES[name]
    with pytest.raises(TranscriptError, match=r"line \d: negative cue time"):
        read_transcript(text.encode(), name=filename)


@pytest.mark.parametrize("as_file", [False, True], ids=["bytes", "file"])
def test_a_transcript_that_is_not_utf8_names_the_byte(tmp_path, as_file):
    raw = "1\n00:00:01,000 --> 00:00:02,000\ncaf\u00e9\n".encode("latin-1")  # é as the single byte 0xe9
    (tmp_path / "t.srt").write_bytes(raw)
    with pytest.raises(TranscriptError, match=r"t\.srt: not UTF-8 text \(byte 35\)$"):
        read_transcript(tmp_path / "t.srt") if as_file else read_transcript(raw, name="t.srt")


@pytest.mark.parametrize("speaker", ["\x1b[31mEve", "Eve\x07", "\u202eEve"])
def test_control_characters_in_a_speaker_never_reach_the_terminal(rt, tmp_path, speaker):
    transcript = tmp_path / "t.json"
    transcript.write_text(json.dumps([{"start": 0.0, "end": 1.0, "text": "hello", "speaker": speaker}]))
    code, output = _cli("predict", rt.artifact, "--audio", rt.clips["good1.wav"], "--transcript", transcript)
    assert code == 0, output
    shown = ascii(speaker[0])[1:-1] if not speaker[0].isalpha() else ascii(speaker[-1])[1:-1]
    assert shown in output and not any(ch in output for ch in "\x1b\x07\u202e"), output


@pytest.mark.parametrize("flag, name", [("--out", "turns.csv"), ("--plot", "timeline.png")])
def test_a_conversation_output_in_a_missing_folder_is_refused_before_predicting(rt, tmp_path, monkeypatch, flag, name):
    transcript = tmp_path / "t.json"
    transcript.write_text(json.dumps([{"start": 0.0, "end": 1.0, "text": "hello"}]))
    if flag == "--plot":
        pytest.importorskip("matplotlib")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(Predictor, "load", no_load)
    code, output = _cli("predict", rt.artifact, "--audio", rt.clips["good1.wav"], "--transcript", transcript,
                        flag, tmp_path / "missing" / name)
    _one_line_error(code, output, f"folder {tmp_path / 'missing'} does not exist")


# ------------------------------------------------------------------- 14. one long segment, in windows

def _long_recording(tmp_path: Path, seconds: float) -> Path:
    path = tmp_path / "long.flac"
    sf.write(path, np.tile(tone(10.0, seed=1), int(np.ceil(seconds / 10)))[:int(seconds * SR)], SR, subtype="PCM_16")
    return path


@pytest.mark.parametrize("batch_size", [1, 3])
def test_policy_windows_holds_one_batch_of_windows_however_long_the_segment(predictor, tmp_path, monkeypatch,
                                                                             batch_size):
    recording = _long_recording(tmp_path, 90.0)  # one segment of 18 windows
    sizes, infer = [], predictor.infer
    monkeypatch.setattr(predictor, "infer", lambda items: sizes.append(len(items)) or infer(items))
    tracemalloc.start()
    try:
        result = predictor.predict_conversation(recording, [Segment(0.0, 90.0, "a long monologue")],
                                                policy="windows", batch_size=batch_size, max_recording_seconds=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.turns[0].windows == 18 and sum(sizes) == 18 and max(sizes) == batch_size, sizes
    # a window is 80 000 float32 (320 kB) prepared plus its 6 s read: 18 of them would be > 10 MB
    assert peak < (2 + batch_size) * 2**20, f"peak Python allocations {peak / 2**20:.1f} MiB"


def test_streamed_windows_average_each_segments_own_windows(predictor, tmp_path, monkeypatch):
    """Whatever the batch, a segment's prediction is the mean of its own windows' rows. The tiny
    model answers nearly the same for any audio, so rows come from a stand-in that makes each
    window's row from its own samples: a window counted twice, dropped or given to another
    segment changes the mean."""
    recording = tmp_path / "talk.wav"
    sf.write(recording, tone(23.0, seed=4), SR, subtype="FLOAT")  # noise: no two windows alike
    data, _ = sf.read(recording, dtype="float32")
    monkeypatch.setattr(predictor, "infer", lambda items: np.stack([it[AUDIO_INPUT][1000:1004] for it in items]))
    segments = [Segment(0.0, 13.0, "three windows"), Segment(13.0, 23.0, "two windows")]
    expected = [np.mean([predictor.preprocess(data[int((s.start + k * 5) * SR):int(min(s.start + k * 5 + 6, s.end) * SR)],
                                              s.text, SR, max_clip_seconds=None)[AUDIO_INPUT][1000:1004] for k in range(n)],
                        axis=0) for s, n in zip(segments, (3, 2))]
    for batch_size in (1, 2, 4, 8):
        result = predictor.predict_conversation(recording, segments, policy="windows", batch_size=batch_size)
        assert [t.windows for t in result.turns] == [3, 2]
        for turn, mean in zip(result.turns, expected):
            np.testing.assert_allclose(turn.prediction.log_probs, mean, rtol=1e-6)


# --------------------------------------------------------------------------- 16. SIGTERM, manifest

@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_a_manifest_keeps_the_partial_file_and_says_so(rt, tmp_path):
    rows = [{"audio": str(rt.clips[f"good{i % 8}.wav"]), "text": "x", "id": f"r{i}"} for i in range(4000)]
    manifest, out = tmp_path / "m.jsonl", tmp_path / "o.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen([sys.executable, "-m", "dmf.runtime.cli", "predict", str(rt.artifact), "--manifest",
                             str(manifest), "--out", str(out), "--batch-size", "1", "--no-progress", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.stat().st_size > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be terminated"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 143, stderr
    message = " ".join(stderr.split())
    assert f"of {len(rows)} rows written to {partial}" in message and message.startswith("terminated:"), stderr
    written = int(message.split()[1])
    assert 0 < written < len(rows) and len(partial.read_text().splitlines()) == written
    assert not out.exists()
