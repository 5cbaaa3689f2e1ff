"""Runtime hardening (#12) through the Python API and `dmf predict`: bounded decoding, no silent
garbage (non-finite inputs and scores refused), artifacts that do not match their model refused at
load, and manifest output that is checked first, written as it goes and safe in a spreadsheet.
The HTTP side of the same items is in tests/test_server.py."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest_runtime import TEXTS, predictor, rt, tone  # noqa: F401
from conftest_runtime import run_cli as _invoke

from dmf.preprocess import (AudioError, AudioRangeError, TextError, load_audio, prepare_audio, preprocess_audio,
                            validate_text)
from dmf.runtime import ArtifactError, EngineError, MicroBatcher, Predictor
from dmf.runtime.predictor import ResultError


def _flac(data: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _declare_frames(flac: bytes, frames: int) -> bytes:
    """`flac` with STREAMINFO's 36-bit total-samples field set to `frames` (0: length unknown)."""
    data = bytearray(flac)
    at = 8 + 13  # STREAMINFO data starts at byte 8; the field starts in byte 13's low nibble
    data[at] = (data[at] & 0xF0) | ((frames >> 32) & 0x0F)
    data[at + 1:at + 5] = (frames & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def _wav(data: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- decoding

def test_a_clip_over_the_limit_is_refused_from_its_header_before_decoding():
    lie = _declare_frames(_flac(tone(1.0, rate=8000), 8000), 350 * 8000)  # header: 350 s
    with pytest.raises(AudioError, match=r"<bytes>: audio is 350\.0 s long, longer than the 60 s maximum"):
        preprocess_audio(lie, max_seconds=60)


def test_a_stream_of_unknown_length_is_counted_in_blocks_and_refused_past_the_limit():
    long = _declare_frames(_flac(tone(70.0, rate=8000), 8000), 0)
    assert sf.info(io.BytesIO(long)).frames > 2**62  # libsndfile: length unknown
    with pytest.raises(AudioError, match="longer than the 60 s maximum"):
        preprocess_audio(long, max_seconds=60)
    short = tone(9.0, rate=8000, seed=2)
    open_length = preprocess_audio(_declare_frames(_flac(short, 8000), 0), max_seconds=60)
    np.testing.assert_array_equal(open_length, preprocess_audio(_flac(short, 8000), max_seconds=60))


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_decoding_only_the_window_gives_the_same_arrays_as_decoding_everything(rate):
    clip = tone(9.0, rate=rate, channels=2, seed=rate)
    full, full_rate = load_audio(_wav(clip, rate))  # (frames, 2), all 9 s
    assert full.shape == (9 * rate, 2)
    np.testing.assert_array_equal(preprocess_audio(_wav(clip, rate)), prepare_audio(full, full_rate))


def test_a_long_many_channel_file_is_decoded_in_bounded_memory(tmp_path):
    path = tmp_path / "long.wav"  # 40 s x 8 channels x 48 kHz: 61 MB as float32
    with sf.SoundFile(path, "w", samplerate=48000, channels=8, subtype="PCM_16") as f:
        for _ in range(40):
            f.write(np.full((48000, 8), 1000, dtype=np.int16))
    tracemalloc.start()
    try:
        x = preprocess_audio(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.shape == (80000,) and peak < 16e6, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("make, fragment", [
    (lambda: np.full(16000, 3e38, np.float32) * np.resize([1, -1], 16000).astype(np.float32), "magnitude 3e+38"),
    (lambda: np.full((16000, 2), 1e10, np.float32), "magnitude 1e+10"),
])
def test_huge_finite_samples_are_refused_not_scored(predictor, make, fragment):
    data = make()
    for source, rate in ((_wav(data), None), (data, 16000)):
        with pytest.raises(AudioRangeError, match=re.escape(fragment)):
            predictor.predict(source, "hello", sample_rate=rate)
    int16_scaled = (tone(1.0) * 32767).astype(np.float32)  # floats in int16 range are still audio
    assert predictor.predict(int16_scaled, "hello", sample_rate=16000).label in predictor.labels


def test_clear_messages_for_odd_sources(predictor, tmp_path):
    with pytest.raises(AudioError, match=r"shape \(2, 32000\): channel-first\? .* data\.T"):
        predictor.predict(np.zeros((2, 32000), np.float32), "x", sample_rate=16000)
    with pytest.raises(AudioError, match="is a folder, not an audio file"):
        predictor.predict(tmp_path, "x")
    zero_hz = bytearray(_wav(tone(1.0), subtype="PCM_16"))
    zero_hz[24:28] = struct.pack("<I", 0)  # fmt chunk's sample rate
    with pytest.raises(AudioError, match="WAV header declares 1 channel\\(s\\) at 0 Hz"):
        predictor.predict(bytes(zero_hz), "x")
    with pytest.raises(TextError, match=r"lone surrogate \(U\+D800\) at character 4") as info:
        validate_text("bad \ud800 text")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- scores

def test_non_finite_scores_are_refused_alone(rt, predictor, monkeypatch):
    real_infer = predictor.engine.infer

    def nan_second_row(batch):
        out = real_infer(batch)
        out[1:2] = np.nan
        return out

    monkeypatch.setattr(predictor.engine, "infer", nan_second_row)
    with pytest.raises(ResultError, match=r"items\[1\]: .*not finite"):
        predictor.predict_batch([(rt.clips["good0.wav"], "a"), (rt.clips["good1.wav"], "b")])
    with MicroBatcher(predictor, max_batch=2, max_wait_ms=500) as mb:
        first, second = mb.submit(rt.clips["good0.wav"], "a"), mb.submit(rt.clips["good1.wav"], "b")
        assert first.result(30).label in predictor.labels
        error = second.exception(30)
    assert isinstance(error, ResultError)
    assert error.__traceback__ is None and error.__context__ is None  # nothing pins the request's frames


def test_a_rejected_request_keeps_no_traceback(rt, predictor):
    with MicroBatcher(predictor, max_batch=2, max_wait_ms=1) as mb:
        error = mb.submit(rt.clips["nan.wav"].read_bytes(), "x").exception(30)
    assert isinstance(error, AudioRangeError) and error.__traceback__ is None


# ----------------------------------------------------------------------------------- artifacts

class _FakeEngine:
    """An engine stand-in: records each batch, returns `out` (or its shape of zeros)."""

    name, providers, max_batch = "fake", ["none"], None

    def __init__(self, out: np.ndarray) -> None:
        self.out, self.calls, self.closed = out, [], False

    def infer(self, batch):
        self.calls.append({k: (v.shape, v.dtype) for k, v in batch.items()})
        return self.out

    def close(self):
        self.closed = True


def test_warm_up_runs_one_batch_1_inference_and_refuses_a_mismatched_model(rt):
    from dmf.runtime import load_artifact

    art = load_artifact(rt.artifact)
    ok = _FakeEngine(np.full((1, len(art.labels)), -np.log(len(art.labels)), np.float32))  # uniform log-probs
    Predictor(art, ok)
    assert ok.calls == [{s.name: ((1, s.shape[1]), np.dtype(s.dtype)) for s in art.inputs}]
    for out, fragment in ((np.zeros((1, 5), np.float32), r"returns shape \(1, 5\)"),
                          (np.full((1, 4), np.nan, np.float32), "non-finite scores")):
        engine = _FakeEngine(out)
        with pytest.raises(ArtifactError, match=fragment):
            Predictor(art, engine)
        assert engine.closed


def _edit_meta(art: Path, edit) -> None:
    from dmf.contract import seal

    meta = json.loads((art / "dmf.json").read_text())
    edit(meta)
    (art / "dmf.json").write_text(json.dumps(seal(meta)))  # resealed: the edit must reach the model checks


def test_labels_and_output_shape_edited_together_fail_at_load(rt, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(rt.artifact, art)

    def five_labels(meta):
        meta["labels"] = meta["labels"] + ["fru"]
        meta["label_names"] = meta["label_names"] + ["frustrated"]  # consistent: only the model can tell
        meta["outputs"][0]["shape"] = ["batch", 5]

    _edit_meta(art, five_labels)
    # The engine's check of dmf.json against the model, or else the warm-up inference, refuses it.
    with pytest.raises((ArtifactError, EngineError), match=r"4.*5") as info:
        Predictor.load(art)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case, write, fragment", [
    ("nested", lambda p: p.write_text("[" * 100000 + "]" * 100000), "invalid JSON: nested too deeply"),
    ("digits", lambda p: p.write_text('{"format": ' + "9" * 5000 + "}"), "invalid JSON: Exceeds the limit"),
    ("huge", lambda p: p.write_text(" " * (2 << 20) + "{}"), "over the 1048576 byte limit"),
])
def test_malformed_dmf_json_is_one_line(rt, tmp_path, case, write, fragment):
    art = tmp_path / "art"
    shutil.copytree(rt.artifact, art)
    write(art / "dmf.json")
    with pytest.raises(ArtifactError, match=fragment) as info:
        Predictor.load(art)
    assert "\n" not in str(info.value)


def test_symlinks_out_of_the_artifact_are_refused(rt, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(rt.artifact, art)
    outside = tmp_path / "elsewhere.json"
    shutil.move(art / "tokenizer.json", outside)
    (art / "tokenizer.json").symlink_to(outside)  # same bytes, same sha256: only the link is wrong
    with pytest.raises(ArtifactError, match="symlink leading out of the artifact folder"):
        Predictor.load(art)
    inside = art / "sub"
    inside.mkdir()
    shutil.move(outside, inside / "tok.json")
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(inside / "tok.json")  # a link within the folder is fine
    assert Predictor.load(art).labels


# ----------------------------------------------------------------------------------------- CLI

def _manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "audio", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cli_json_never_prints_nan(rt, monkeypatch):
    monkeypatch.setattr(Predictor, "infer", lambda self, items: np.full((len(items), 4), np.nan, np.float32))
    code, out = _invoke("predict", rt.artifact, "--audio", rt.clips["good0.wav"], "--text", "x", "--json")
    assert code == 2 and "not finite" in out and "NaN" not in out.replace("(NaN", "")


def test_cli_refuses_a_bomb_and_huge_samples(rt, tmp_path):
    bomb = tmp_path / "bomb.flac"
    bomb.write_bytes(_declare_frames(_flac(tone(1.0, rate=8000), 8000), 350 * 8000))
    code, out = _invoke("predict", rt.artifact, "--audio", bomb, "--text", "x")
    assert code == 2 and "350.0 s long, longer than" in out
    huge = tmp_path / "huge.wav"
    huge.write_bytes(_wav(np.full(16000, -3e38, np.float32)))
    code, out = _invoke("predict", rt.artifact, "--audio", huge, "--text", "x", "--json")
    assert code == 2 and "magnitude 3e+38" in out


def test_cli_out_is_checked_before_any_prediction(rt, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the predictor was loaded")

    monkeypatch.setattr(Predictor, "load", no_load)
    manifest = _manifest(tmp_path / "m.csv", [{"id": "a", "audio": str(rt.clips["good0.wav"]), "text": "x"}])
    before = manifest.read_bytes()
    (tmp_path / "sub").mkdir()
    os.link(manifest, tmp_path / "same.csv")
    for out, fragment in ((manifest, "is the manifest itself"), (tmp_path / "sub" / ".." / "m.csv", "itself"),
                          (tmp_path / "same.csv", "itself"), (tmp_path / "nowhere" / "o.csv", "does not exist"),
                          (tmp_path, "unknown output type")):
        code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", out)
        assert code == 2 and "error:" in text, text
        assert fragment is None or fragment in text, text
    assert manifest.read_bytes() == before


def test_cli_interrupt_keeps_the_rows_written_so_far(rt, tmp_path, monkeypatch):
    rows = [{"id": f"u{i}", "audio": str(rt.clips[f"good{i}.wav"]), "text": TEXTS[i]} for i in range(5)]
    manifest = _manifest(tmp_path / "m.csv", rows)
    real_infer, calls = Predictor.infer, []

    def interrupted(self, items):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_infer(self, items)

    monkeypatch.setattr(Predictor, "infer", interrupted)
    out = tmp_path / "pred.csv"
    code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", out, "--batch-size", 2,
                         "--no-progress")
    assert code == 130 and "interrupted: 2 of 5 rows written to" in text and not out.exists()
    partial = list(csv.DictReader((tmp_path / "pred.csv.partial").open()))
    assert [r["id"] for r in partial] == ["u0", "u1"] and all(r["label"] for r in partial)


def test_cli_csv_output_is_safe_in_a_spreadsheet_and_oversize_fields_are_row_errors(rt, tmp_path):
    rows = [{"id": "=cmd|' /C calc'!A0", "audio": str(rt.clips["good0.wav"]), "text": "x"},
            {"id": "+1", "audio": str(rt.clips["good1.wav"]), "text": "y"},
            {"id": "plain", "audio": str(rt.clips["good2.wav"]), "text": "z"}]
    manifest = _manifest(tmp_path / "m.csv", rows)
    code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", tmp_path / "o.csv", "--no-progress")
    assert code == 0, text
    ids = [r["id"] for r in csv.DictReader((tmp_path / "o.csv").open())]
    assert ids == ["'=cmd|' /C calc'!A0", "'+1", "plain"]
    code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", tmp_path / "o.jsonl", "--no-progress")
    assert [json.loads(line)["id"] for line in (tmp_path / "o.jsonl").read_text().splitlines()][0] == rows[0]["id"]
    big = _manifest(tmp_path / "big.csv", rows[2:] + [{"id": "big", "audio": str(rt.clips["good3.wav"]),
                                                        "text": "w" * 200_000}])
    code, text = _invoke("predict", rt.artifact, "--manifest", big, "--out", tmp_path / "b.csv")
    assert code == 2 and "line 3: unreadable CSV record (field larger than field limit" in text
    assert not (tmp_path / "b.csv").exists()
