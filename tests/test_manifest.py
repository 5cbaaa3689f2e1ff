"""dmf.data.manifest: CSV and JSONL corpora; every bad row reported at once with its line number."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dmf.data import DataError, ManifestError, load_corpus, load_manifest


def _wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.1 * np.sin(np.arange(8000) / 5.0), 16000, subtype="PCM_16")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _wav(tmp_path / "clips" / "a.wav")
    _wav(tmp_path / "clips" / "b.wav")
    (tmp_path / "clips" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    return tmp_path


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_good_rows_relative_and_absolute_paths(root):
    abs_b = root / "clips" / "b.wav"
    path = _csv(root / "m.csv", [
        "audio,text,label,speaker,session",
        "clips/a.wav,I went to the store.,neu,spk1,s1",
        f'{abs_b},"Well, that is great!",hap,spk2,s2',
    ])
    corpus = load_corpus(path)
    a, b = corpus.utterances
    assert a.audio_path == root / "clips" / "a.wav" and b.audio_path == abs_b
    assert (b.text, b.label, b.speaker, b.session) == ("Well, that is great!", "hap", "spk2", "s2")
    assert a.id == "m-line2" and b.id == "m-line3"
    assert corpus.counts() == {"total": 2, "by_label": {"neu": 1, "hap": 1, "sad": 0, "ang": 0},
                               "by_session": {"s1": 1, "s2": 1}, "speakers": ["spk1", "spk2"]}


def test_csv_all_bad_rows_reported_together(root):
    path = _csv(root / "bad.csv", [
        "id,audio,text,label,speaker,session",
        "u1,clips/a.wav,fine,neu,spk1,s1",
        "u2,clips/missing.wav,hello,neu,spk1,s1",
        "u3,clips/a.wav,hello,bored,spk1,s1",
        "u4,clips/a.wav,   ,sad,spk1,s1",
        "u5,clips/broken.wav,hello,ang,spk1,s1",
        "u6,clips/b.wav,hello",
        "u1,clips/b.wav,again,hap,spk2,s1",
    ])
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    err = info.value
    assert [p.split(":")[0] for p in err.problems] == ["line 3", "line 4", "line 5", "line 6", "line 7", "line 8"]
    assert "audio file not found" in err.problems[0] and "missing.wav" in err.problems[0]
    assert "unknown label 'bored'" in err.problems[1]
    assert err.problems[2] == "line 5: empty text"
    assert "unreadable audio" in err.problems[3] and "broken.wav" in err.problems[3]
    assert err.problems[4] == "line 7: missing label, speaker, session"
    assert "duplicate id 'u1'" in err.problems[5]
    assert "\n" not in str(err) and str(err).startswith(f"{path}: 6 bad row(s): line 3:")
    assert isinstance(err, DataError)


def test_csv_missing_column(root):
    path = _csv(root / "m.csv", ["audio,text,label,session", "clips/a.wav,hi,neu,s1"])
    with pytest.raises(ManifestError, match=r"line 1: missing column\(s\) speaker"):
        load_manifest(path)


def test_jsonl_good_and_bad_rows(root):
    rows = [
        {"audio": "clips/a.wav", "text": "I miss her.", "label": "sad", "speaker": "x", "session": "A"},
        "{not json",
        {"audio": "clips/b.wav", "text": "Hmm.", "label": "neu", "session": "A"},
        {"audio": "clips/nowhere.wav", "text": "ok", "label": "ang", "speaker": "x", "session": "A"},
        {"audio": "clips/b.wav", "text": 5, "label": "ang", "speaker": "x", "session": "A"},
        ["not", "an", "object"],
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path = root / "m.jsonl"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line 2 still counts
    with pytest.raises(ManifestError) as info:
        load_corpus(path)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 6", "line 7"]
    assert "malformed JSON" in problems[0]
    assert problems[1] == "line 4: missing speaker"
    assert "audio file not found" in problems[2]
    assert problems[3] == "line 6: text must be a string, got int"
    assert "expected an object" in problems[4]

    path.write_text(lines[0] + "\n")
    (utt,) = load_corpus(path).utterances
    assert (utt.label, utt.speaker, utt.audio_path) == ("sad", "x", root / "clips" / "a.wav")


def test_custom_label_set(root):
    path = root / "m.jsonl"
    rows = [{"id": "p1", "audio": "clips/a.wav", "text": "yes", "label": "positive", "speaker": "s", "session": "1"},
            {"id": "n1", "audio": "clips/b.wav", "text": "no", "label": "negative", "speaker": "s", "session": "2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match="unknown label 'positive'"):
        load_corpus(path)
    corpus = load_corpus(path, labels=("negative", "positive"))
    assert corpus.labels == ("negative", "positive")
    assert corpus.counts()["by_label"] == {"negative": 1, "positive": 1}
    assert [u.id for u in corpus.utterances] == ["p1", "n1"]


def test_json_array_and_empty_manifest(root):
    path = root / "m.json"
    path.write_text(json.dumps([{"audio": "clips/a.wav", "text": "hi", "label": "neu", "speaker": "s",
                                 "session": "1"}]))
    assert load_corpus(path).counts()["total"] == 1
    empty = _csv(root / "empty.csv", ["audio,text,label,speaker,session"])
    with pytest.raises(DataError, match="has no rows"):
        load_corpus(empty)
    latin1 = "audio,text,label,speaker,session\nclips/a.wav,caf\xe9,neu,s,1\n".encode("latin-1")
    (root / "latin1.csv").write_bytes(latin1)
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_corpus(root / "latin1.csv")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".ndjson", ".json"])
def test_load_corpus_reads_every_type_the_manifest_reader_reads(root, suffix):
    """One table of manifest types: load_corpus once refused a .tsv (and .ndjson) that
    load_manifest reads."""
    rows = [{"audio": "clips/a.wav", "text": "hello there", "label": "neu", "speaker": "spk1", "session": "s1"},
            {"audio": "clips/b.wav", "text": "so happy", "label": "hap", "speaker": "spk2", "session": "s2"}]
    path = root / f"m{suffix}"
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text("\n".join(sep.join(r.values()) for r in [dict(zip(rows[0], rows[0]))] + rows) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = load_corpus(path)
    assert [(u.audio_path.name, u.label, u.session) for u in corpus.utterances] == \
        [("a.wav", "neu", "s1"), ("b.wav", "hap", "s2")]
