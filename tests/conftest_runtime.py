"""Shared fixtures for the runtime tests: ONE tiny exported artifact per test session.

Imported by tests/test_runtime.py, tests/test_server.py and tests/test_runtime_torchfree.py
(`from conftest_runtime import ...`). The export runs at most once per session (module-level
cache), because it takes tens of seconds. Developer hook: DMF_TEST_ARTIFACT=<artifact dir>
(and DMF_TEST_CHECKPOINT=<its checkpoint dir>, for the parity test) reuses a prebuilt artifact.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

TEXTS = [
    "i am so happy today", "this is terrible news", "leave me alone right now", "what a wonderful surprise",
    "okay fine whatever", "i cannot believe you did that", "thank you so much", "i miss her every day",
]
SR = 16000


@dataclass(frozen=True)
class RuntimeFixture:
    artifact: Path
    checkpoint: Path | None
    clips: dict[str, Path]  # name -> file
    root: Path


_CACHE: dict[str, RuntimeFixture] = {}


def tone(seconds: float, rate: int = SR, freq: float = 220.0, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t)) + 0.02 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1)
    return x


def wav_bytes(data: np.ndarray, rate: int = SR, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _write_clips(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    clips: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        clips[name] = root / name
        clips[name].write_bytes(data)

    for i in range(8):  # distinct good clips (load test, batching)
        put(f"good{i}.wav", wav_bytes(tone(1.0 + 0.5 * i, freq=150.0 + 40 * i, seed=i)))
    put("long6s.wav", wav_bytes(tone(6.0, seed=11)))  # cropped to the first 5 s
    put("stereo.wav", wav_bytes(tone(2.0, seed=3, channels=2)))
    put("rate8k.wav", wav_bytes(tone(2.0, rate=8000, seed=4), rate=8000))
    put("rate44k.wav", wav_bytes(tone(2.0, rate=44100, seed=5), rate=44100))
    put("silence.wav", wav_bytes(np.zeros(SR * 2, dtype=np.float32)))
    nan = tone(1.0, seed=6)
    nan[100] = np.nan
    put("nan.wav", wav_bytes(nan, subtype="FLOAT"))
    inf = tone(1.0, seed=7)
    inf[200] = np.inf
    put("inf.wav", wav_bytes(inf, subtype="FLOAT"))
    whole = wav_bytes(tone(2.0, seed=8))
    put("truncated.wav", whole[: len(whole) // 2])
    put("notaudio.wav", b"this is plain text, not a RIFF file\n" * 20)
    put("empty.wav", b"")
    put("short.wav", wav_bytes(tone(0.05, seed=9)))  # under the 0.1 s minimum
    put("toolong.wav", wav_bytes(tone(61.0, rate=8000, seed=10), rate=8000))  # over the 60 s limit
    return clips


def _export(root: Path) -> tuple[Path, Path]:
    # no try/skip: a broken dmf.export must fail the runtime and server tests, not hide them
    from dmf.export import export_checkpoint
    from dmf.config import preset
    from dmf.model import DMFModel

    ckpt = DMFModel(preset("tiny"), texts=TEXTS, pretrained=False).save_pretrained(root / "ckpt")
    art = export_checkpoint(ckpt, root / "artifact", engine="onnx", precision="fp32", max_batch=32)
    return Path(art), ckpt


def runtime_fixture(tmp_path_factory) -> RuntimeFixture:
    if "rt" not in _CACHE:
        root = tmp_path_factory.mktemp("runtime")
        prebuilt = os.environ.get("DMF_TEST_ARTIFACT")
        if prebuilt:
            art = root / "artifact"
            shutil.copytree(prebuilt, art)
            ckpt_env = os.environ.get("DMF_TEST_CHECKPOINT")
            ckpt = Path(ckpt_env) if ckpt_env else None
        else:
            art, ckpt = _export(root)
        _CACHE["rt"] = RuntimeFixture(artifact=art, checkpoint=ckpt, clips=_write_clips(root / "clips"), root=root)
    return _CACHE["rt"]


@pytest.fixture(scope="session")
def rt(tmp_path_factory) -> RuntimeFixture:
    return runtime_fixture(tmp_path_factory)


@pytest.fixture(scope="session")
def predictor(rt):
    from dmf.runtime import Predictor

    if "predictor" not in _CACHE:
        _CACHE["predictor"] = Predictor.load(rt.artifact, threads=1)
    return _CACHE["predictor"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Inputs every interface must handle: name -> (clip name or None, text, expected).
# expected: "ok", or (error class name, substring of the message).
BAD_AUDIO = {
    "not_audio": ("notaudio.wav", "hello", ("AudioError", "not readable audio")),
    "truncated": ("truncated.wav", "hello", ("AudioError", "truncated WAV")),
    "empty_audio": ("empty.wav", "hello", ("AudioError", "empty")),
    "too_short": ("short.wav", "hello", ("AudioError", "shorter than")),
    "too_long": ("toolong.wav", "hello", ("AudioError", "longer than")),
    "nan": ("nan.wav", "hello", ("AudioError", "NaN")),
    "inf": ("inf.wav", "hello", ("AudioError", "Inf")),
}
BAD_TEXT = {
    "empty_text": ("good0.wav", "", ("TextError", "empty")),
    "blank_text": ("good0.wav", "   ", ("TextError", "empty")),
    "non_utf8": ("good0.wav", b"caf\xe9 \xff\xfe", ("TextError", "UTF-8")),
}
ACCEPTED = {
    "stereo": ("stereo.wav", "two channels"),
    "rate8k": ("rate8k.wav", "eight kilohertz"),
    "rate44k": ("rate44k.wav", "cd quality"),
    "silence": ("silence.wav", "..."),
    "long_text": ("good1.wav", "word " * 2000),  # 10 000 characters
    "long_clip": ("long6s.wav", "cropped to five seconds"),
}


def run_cli(*args) -> tuple[int, str]:
    """`dmf` with only the runtime's commands registered (as on a torch-free install), run in-process:
    (exit code, stdout and stderr interleaved)."""
    import typer
    from typer.testing import CliRunner

    from dmf.runtime.cli import register

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output
