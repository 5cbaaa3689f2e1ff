"""dmf.data.synth: deterministic, readable by the IEMOCAP reader, emotion audible; the data CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import typer
from typer.testing import CliRunner

from dmf.data import DataError, load_corpus
from dmf.data.cli import register
from dmf.data.synth import synthesize

LABELS = ("neu", "hap", "sad", "ang")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    return out, synthesize(out, seed=3, utterances=120)


@pytest.fixture
def cli() -> tuple[typer.Typer, CliRunner]:
    app = typer.Typer()
    register(app)
    return app, CliRunner()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(Path(synthesize(tmp_path / "a", seed=7, utterances=20)["path"]))
    b = _files(Path(synthesize(tmp_path / "b", seed=7, utterances=20)["path"]))
    c = _files(Path(synthesize(tmp_path / "c", seed=8, utterances=20)["path"]))
    assert a == b
    wavs = [k for k in a if k.endswith(".wav")]
    assert len(wavs) == 20 + 2 * 5  # labelled + one xxx and one fru per session
    assert any(a[k] != c.get(k) for k in wavs)


def test_reader_loads_all_classes_in_all_sessions(synth_dir):
    out, summary = synth_dir
    corpus = load_corpus(out)
    counts = corpus.counts()
    assert counts["total"] == 120 == summary["total"]
    assert counts["by_label"] == summary["by_label"] == {label: 30 for label in LABELS}
    assert counts["by_session"] == {f"Ses0{s}": 24 for s in range(1, 6)}
    assert counts["speakers"] == [f"Ses0{s}{g}" for s in range(1, 6) for g in "FM"]
    for session in corpus.sessions():
        utts = [u for u in corpus.utterances if u.session == session]
        assert {u.label for u in utts} == set(LABELS)
        assert {u.speaker[-1] for u in utts} == {"F", "M"}
    assert summary["dropped"] == 10 and sum(summary["modes"].values()) == 120
    assert all(n > 15 for n in summary["modes"].values())


def test_wav_format_and_quirks(synth_dir):
    out, _ = synth_dir
    corpus = load_corpus(out)
    for utt in corpus.utterances[:10]:
        info = sf.info(str(utt.audio_path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 1.5 <= info.duration <= 4.0
    evals = "".join(p.read_text() for p in out.glob("Session*/dialog/EmoEvaluation/*.txt"))
    trans = "".join(p.read_text() for p in out.glob("Session*/dialog/transcriptions/*.txt"))
    for code in ("\txxx\t", "\tfru\t", "\texc\t", "C-E1:", "A-E1:"):
        assert code in evals
    assert "_MXX0 [" in trans and "M: [BREATHING]" in trans


def _rms(path: Path) -> float:
    x, _ = sf.read(path)
    return float(np.sqrt(np.mean(x ** 2)))


def test_prosody_depends_on_class_only_when_audio_is_clear(synth_dir):
    out, _ = synth_dir
    meta = json.loads((out / "SYNTH.json").read_text())["utterances"]
    corpus = load_corpus(out)
    rms = {(mode, label): [] for mode in ("audio", "text") for label in LABELS}
    for u in corpus.utterances:
        if meta[u.id]["mode"] in ("audio", "text"):
            rms[meta[u.id]["mode"], u.label].append(_rms(u.audio_path))
    mean = {k: np.mean(v) for k, v in rms.items()}
    assert mean["audio", "ang"] > 2 * mean["audio", "neu"] > 2 * mean["audio", "sad"]
    text_means = [mean["text", label] for label in LABELS]  # class-agnostic prosody: no ordering
    assert max(text_means) < 2 * min(text_means)


def test_text_carries_the_label_only_when_text_is_clear(synth_dir):
    out, _ = synth_dir
    meta = json.loads((out / "SYNTH.json").read_text())["utterances"]
    corpus = load_corpus(out)
    words = {"ang": "furious outrageous dare stand lied unacceptable way",
             "sad": "miss hurts alone same lost wish apart"}
    for u in corpus.utterances:
        text = u.text.lower()
        hits = {label for label, ws in words.items() if any(w in text for w in ws.split())}
        if meta[u.id]["mode"] == "audio":
            assert not hits, u.text
        elif u.label in words:
            assert hits == {u.label}, u.text


def test_default_size_is_fast(tmp_path):
    start = time.perf_counter()
    summary = synthesize(tmp_path / "full")
    elapsed = time.perf_counter() - start
    assert summary["total"] == 400 and elapsed < 30, elapsed


def test_refuses_to_clobber_and_too_few(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        synthesize(tmp_path / "x", utterances=20)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    with pytest.raises(DataError, match="too few"):
        synthesize(tmp_path / "y", utterances=10)
    assert not list(tmp_path.glob(".y.*"))  # no staging folder left behind


def test_cli_stats_json_matches_summary(synth_dir, cli):
    out, summary = synth_dir
    app, runner = cli
    result = runner.invoke(app, ["data", "stats", str(out), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert set(stats) == {"total", "by_label", "by_session", "speakers"}
    assert stats["total"] == summary["total"] and stats["by_label"] == summary["by_label"]
    assert stats["by_session"] == summary["by_session"] and stats["speakers"] == summary["speakers"]

    table = runner.invoke(app, ["data", "stats", str(out), "--labels", "sad,ang"])
    assert table.exit_code == 0 and "Ses05" in table.stdout and "ang" in table.stdout


def test_cli_errors_exit_2_with_one_line(tmp_path, cli):
    app, runner = cli
    result = runner.invoke(app, ["data", "stats", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error:") and "nope" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert runner.invoke(app, ["data", "stats", str(tmp_path), "--labels", "neu"]).exit_code == 2


def test_cli_synth(tmp_path, cli):
    app, runner = cli
    result = runner.invoke(app, ["synth", str(tmp_path / "demo"), "--seed", "1", "--utterances", "20"])
    assert result.exit_code == 0, result.output
    assert "wrote 20 utterances" in result.stdout
    assert load_corpus(tmp_path / "demo").counts()["total"] == 20
    again = runner.invoke(app, ["synth", str(tmp_path / "demo"), "--utterances", "20"])
    assert again.exit_code == 2 and "not empty" in again.stderr
