"""The reliability probes behind the table in docs/reliability.md: bad inputs through the Python API, HTTP (the
ASGI app in-process) and `dmf predict --manifest`, each of which must be refused with a one-line
message and the right status, never crash (500 / an unexpected exception) and never hang.

`pytest -s tests/test_probes.py` prints the tally docs/reliability.md quotes (after the last probe)."""

from __future__ import annotations

import io
import json
import struct
import threading

import numpy as np
import pytest
import soundfile as sf

from conftest_runtime import BAD_AUDIO, BAD_TEXT, predictor, rt, tone  # noqa: F401

from dmf.preprocess import AudioError, AudioRangeError, TextError
from dmf.runtime import InputError
from dmf.runtime.predictor import ResultError

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from dmf.runtime import ServeOptions, create_app  # noqa: E402

TALLY: dict[str, dict[str, int]] = {}
REFUSED = (AudioError, TextError, InputError, ResultError)
TIME_LIMIT_S = 20  # an answer slower than this counts as a hang


def _sf(data: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


def _flac_frames(flac: bytes, frames: int) -> bytes:
    """STREAMINFO total samples (36 bits from the low nibble of byte 21) set to `frames`."""
    head = bytes([(flac[21] & 0xF0) | ((frames >> 32) & 0x0F)]) + (frames & 0xFFFFFFFF).to_bytes(4, "big")
    return _patched(flac, 21, head)


def _aiff(data: np.ndarray, rate: int) -> bytes:
    return _sf(data, rate, "AIFF", "PCM_16")


def audio_probes() -> dict[str, tuple[bytes, int, str]]:
    """Bad audio files as bytes, each with the HTTP status it must get (400: not usable audio,
    422: decodable but unusable samples) and a fragment of its one-line message: each must be
    refused wherever a file is accepted."""
    wav = _sf(tone(1.0), 16000, subtype="PCM_16")
    flac = _sf(tone(1.0, rate=8000), 8000, "FLAC", "PCM_16")
    aiff = _aiff(tone(2.0), 16000)
    rng = np.random.default_rng(0)
    big = np.full(16000, 3e38, np.float32)
    bad_format = (400, "not readable audio (format not recognised")
    return {
        "empty": (b"", 400, "empty (0 bytes)"), "plain text": (b"hello, not audio\n" * 50, *bad_format),
        "random bytes": (rng.bytes(4096), *bad_format),
        "MP3 sync word, then garbage": (b"\xff\xfb\x90\x64" + rng.bytes(4000), *bad_format),
        "RIFF, no WAVE": (b"RIFF\x10\x00\x00\x00JUNKJUNKJUNK", *bad_format),
        "cut inside fmt, 20 bytes": (wav[:20], 400, "truncated WAV: the fmt chunk"),
        "cut at 30 bytes": (wav[:30], 400, "truncated WAV"), "cut at 44 bytes": (wav[:44], 400, "truncated WAV"),
        "cut in half": (wav[:len(wav) // 2], 400, "truncated WAV"),
        "7 bits per sample": (_patched(wav, 34, struct.pack("<H", 7)), 400, "7 bits per sample"),
        "AIFF cut in half": (aiff[:len(aiff) // 2], 400, "truncated AIFF"),
        "AIFF cut inside COMM": (aiff[:24], 400, "truncated AIFF"),
        "0 Hz header": (_patched(wav, 24, struct.pack("<I", 0)), 400, "0 Hz"),
        "0 channels": (_patched(wav, 22, struct.pack("<H", 0)), 400, "0 channel(s)"),
        "500 kHz": (_sf(np.zeros(1600, np.float32), 500000), 400, "sample rate 500000 Hz is invalid"),
        "65 channels": (_sf(np.zeros((1600, 65), np.float32), 16000), 400, "65 channels"),
        "0.05 s": (_sf(tone(0.05), 16000), 400, "shorter than"), "61 s": (_sf(tone(61.0, rate=8000), 8000), 400, "longer than"),
        "FLAC says 350 s": (_flac_frames(flac, 350 * 8000), 400, "350.0 s long"),
        "FLAC of open length, 70 s": (_flac_frames(_sf(tone(70.0, rate=8000), 8000, "FLAC", "PCM_16"), 0), 400, "longer than"),
        "NaN": (_sf(np.full(16000, np.nan, np.float32), 16000), 422, "NaN"),
        "Inf": (_sf(np.full(16000, np.inf, np.float32), 16000), 422, "Inf"),
        "+3e38": (_sf(big, 16000), 422, "magnitude"), "-3e38": (_sf(-big, 16000), 422, "magnitude"),
        "1e10 stereo": (_sf(np.full((16000, 2), 1e10, np.float32), 16000), 422, "magnitude"),
        "silence then NaN": (_sf(np.concatenate([np.zeros(8000), [np.nan] * 10]).astype(np.float32), 16000), 422, "NaN"),
    }


AUDIO_PROBES = audio_probes()
def _closed_stream() -> io.BytesIO:
    stream = io.BytesIO(_sf(tone(1.0), 16000))
    stream.close()
    return stream


class _TextReader:
    """A file-like object opened in text mode, in effect: read() gives str."""

    def read(self, size: int = -1) -> str:
        return "RIFF...."


TEXT_PROBES = {"empty": "", "blank": " \t\n", "not UTF-8": b"caf\xe9 \xff", "surrogate bytes": b"\xed\xa0\x80x"}
API_ONLY = {  # (audio, text, sample_rate) that only the Python API can be given
    "channel-first array": (np.zeros((2, 32000), np.float32), "x", 16000),
    "3-D array": (np.zeros((10, 2, 2), np.float32), "x", 16000), "object array": (np.array(["a"] * 16000), "x", 16000),
    "array without rate": (tone(1.0), "x", None), "rate 0": (tone(1.0), "x", 0), "rate -1": (tone(1.0), "x", -1),
    "rate 16000.0": (tone(1.0), "x", 16000.0), "rate True": (tone(1.0), "x", True),
    "lone surrogate": (tone(1.0), "bad \ud800", 16000), "text None": (tone(1.0), None, 16000),
    "text int": (tone(1.0), 42, 16000), "audio None": (None, "x", 16000), "audio int": (7, "x", 16000),
    "a folder": (".", "x", None), "missing file": ("/nonexistent/clip.wav", "x", None),
    "0-d array": (np.array(0.5, np.float32), "x", 16000), "path with a NUL": ("clip\0.wav", "x", None),
    "closed BytesIO": (_closed_stream(), "x", None), "read() returns str": (_TextReader(), "x", None),
}


def _count(interface: str, refused: bool, finished: bool = True) -> None:
    row = TALLY.setdefault(interface, {"tried": 0, "refused": 0, "crashes": 0, "hangs": 0})
    row["tried"] += 1
    row["hangs" if not finished else "refused" if refused else "crashes"] += 1


def _timed(fn):
    """fn() in a thread; (result or exception, whether it finished within TIME_LIMIT_S)."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(_call(fn)), daemon=True)
    t.start()
    t.join(TIME_LIMIT_S)
    return (box[0] if box else None), bool(box)


def _call(fn):
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - every outcome is judged below
        return exc


def _api(predictor, audio, text, rate=None, fragment: str = "") -> None:
    outcome, finished = _timed(lambda: predictor.predict(audio, text, sample_rate=rate))
    ok = isinstance(outcome, REFUSED) and "\n" not in str(outcome) and fragment in str(outcome)
    _count("python API", ok, finished)
    assert ok, f"{audio!r:.80} / {text!r:.40}: {outcome!r}"


@pytest.fixture(scope="module")
def http(predictor):
    with TestClient(create_app(predictor, ServeOptions(max_upload_mb=2))) as client:
        yield client


def _post(http, status: int, fragment: str = "", **kwargs) -> None:
    """POST /v1/predict; the answer must be `status` with a one-line JSON error holding `fragment`."""
    outcome, finished = _timed(lambda: http.post("/v1/predict", **kwargs))
    ok = finished and not isinstance(outcome, BaseException) and outcome.status_code == status
    error = outcome.json().get("error", "\n") if ok else "\n"
    ok = ok and "\n" not in error and fragment in error
    _count("HTTP", ok, finished)
    assert ok, (status, fragment, outcome, getattr(outcome, "text", "")[:300])


@pytest.mark.parametrize("name", list(AUDIO_PROBES))
def test_bad_audio_files_are_refused_by_api_and_http(name, predictor, http):
    data, status, fragment = AUDIO_PROBES[name]
    outcome, _ = _timed(lambda: predictor.predict(data, "hello"))
    assert type(outcome) is (AudioRangeError if status == 422 else AudioError), outcome
    _api(predictor, data, "hello", fragment=fragment)
    _post(http, status, fragment, files={"audio": (f"{name}.wav", data), "text": (None, b"hello")})


@pytest.mark.parametrize("name", list(TEXT_PROBES))
def test_bad_text_is_refused_by_api_and_http(name, rt, predictor, http):
    wav, text = rt.clips["good0.wav"].read_bytes(), TEXT_PROBES[name]
    _api(predictor, wav, text)
    _post(http, 400, "text", files={"audio": ("a.wav", wav), "text": (None, text if isinstance(text, bytes) else text.encode())})


@pytest.mark.parametrize("name", list(API_ONLY))
def test_api_only_inputs_are_refused(name, predictor):
    audio, text, rate = API_ONLY[name]
    _api(predictor, audio, text, rate)


def _malformed_requests(wav: bytes) -> dict[str, tuple[int, dict]]:
    """name -> (the status a client must get, the request's httpx arguments)."""
    ok_text = (None, b"x")
    multipart = "multipart/form-data"
    return {
        "JSON body": (415, {"json": {"audio": "x", "text": "y"}}),
        "multipart without boundary": (400, {"content": b"--x\r\n", "headers": {"content-type": multipart}}),
        "wrong boundary": (400, {"content": b"--AAAB\r\n\r\n1\r\n--AAAA--",
                                 "headers": {"content-type": multipart + "; boundary=AAAA"}}),
        "part without a name": (400, {"content": b"--b\r\nContent-Type: x\r\n\r\n1\r\n--b--\r\n",
                                      "headers": {"content-type": multipart + "; boundary=b"}}),
        "no text field": (400, {"files": {"audio": ("a.wav", wav)}}),
        "no audio field": (400, {"files": {"text": ok_text}}),
        "text twice": (400, {"files": [("audio", ("a.wav", wav)), ("text", ok_text), ("text", ok_text)]}),
        "unknown field": (400, {"files": {"audio": ("a.wav", wav), "text": ok_text, "extra": ok_text}}),
        "ten fields": (400, {"files": [("audio", ("a.wav", wav))] + [(f"f{i}", ok_text) for i in range(9)]}),
        "audio as a plain field": (400, {"files": {"audio": (None, b"plain field"), "text": ok_text}}),
        "empty audio file": (400, {"files": {"audio": ("a.wav", b""), "text": ok_text}}),
        "upload over 2 MiB": (413, {"files": {"audio": ("a.wav", b"\0" * (3 << 20)), "text": ok_text}}),
        "text field over 64 KiB": (400, {"files": {"audio": ("a.wav", wav), "text": (None, b"w" * (80 << 10))}}),
        "chunked upload over 2 MiB": (413, {"content": iter([b"x" * (1 << 20)] * 3),
                                            "headers": {"content-type": multipart + "; boundary=b"}}),
    }


MALFORMED = list(_malformed_requests(b""))


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_requests_are_refused_over_http(name, rt, http):
    status, request = _malformed_requests(rt.clips["good0.wav"].read_bytes())[name]
    _post(http, status, **request)


def test_bad_manifest_rows_are_refused_by_the_cli(rt, tmp_path):
    import typer
    from typer.testing import CliRunner

    from dmf.runtime.cli import register

    (tmp_path / "dir.wav").mkdir()
    rows = [{"audio": "missing.wav", "text": "x"}, {"audio": str(tmp_path / "dir.wav"), "text": "x"},
            {"audio": "", "text": "x"}, {"text": "x"}, {"audio": str(rt.clips["good0.wav"])},
            {"audio": str(rt.clips["good0.wav"]), "text": ""}, {"audio": str(rt.clips["good0.wav"]), "text": 5},
            {"audio": str(rt.clips["good0.wav"]), "text": "x", "id": [1]}, ["not", "an", "object"]]
    lines = [json.dumps(r) for r in rows] + ["{not json", "[" * 5000 + "]" * 5000]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    result = CliRunner().invoke(app, ["predict", str(rt.artifact), "--manifest", str(manifest), "--out",
                                      str(tmp_path / "o.csv")])
    listed = [line for line in result.output.splitlines() if line.startswith("line ")]
    for n in range(1, len(lines) + 1):
        _count("dmf predict --manifest", any(line.startswith(f"line {n}: ") for line in listed))
    assert result.exit_code == 2 and len(listed) == len(lines), result.output
    assert not (tmp_path / "o.csv").exists()


@pytest.fixture(scope="module", autouse=True)
def tally():
    """After every probe of this module (in whatever order they ran): the table docs/reliability.md quotes
    (`pytest -s` shows it), and no crash or hang anywhere."""
    yield TALLY
    print("\n| interface | bad inputs tried | refused | crashes | hangs |\n|---|---|---|---|---|")
    for name, row in TALLY.items():
        print(f"| {name} | {row['tried']} | {row['refused']} | {row['crashes']} | {row['hangs']} |")
    assert all(row["crashes"] == row["hangs"] == 0 for row in TALLY.values())
