"""dmf.data.iemocap on a hand-made tree with the release's quirks; load_corpus format detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dmf.data import DataError, load_corpus, load_iemocap
from dmf.data.iemocap import speaker_of

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
ANNOTATORS = "C-E1:\tNeutral;\t()\nC-E3:\tAnger; Frustration;\t(heated)\nC-F1:\tNeutral;\t()\n" \
             "A-E1:\tval 3; act 2; dom  2;\t()\nA-F1:\tval 2; act 3; dom  3;\t()\n\n"

# dialog -> [(utterance id, code, transcript, has wav)]
DIALOGS = {
    "Ses01F_impro01": [
        ("Ses01F_impro01_F000", "neu", "Excuse me.", True),
        ("Ses01F_impro01_M000", "exc", "Oh, that's great!", True),
        ("Ses01F_impro01_F001", "xxx", "Whatever.", False),  # dropped: a missing wav is no problem
        ("Ses01F_impro01_M001", "fru", "Ugh, again?", True),
        ("Ses01F_impro01_M002", "ang", "Get out of here.", True),
    ],
    "Ses01M_script01_1": [
        ("Ses01M_script01_1_F000", "sad", "I miss him.", True),
        ("Ses01M_script01_1_M000", "hap", "We did it!", True),
        ("Ses01M_script01_1_M001", "sur", "Really?", True),
    ],
    "Ses02F_impro02": [
        ("Ses02F_impro02_F000", "ang", "How dare you.", True),
        ("Ses02F_impro02_M000", "neu", "I went to the store.", True),
        ("Ses02F_impro02_F001", "exc", "Yes! Finally.", True),
    ],
}


def _wav(path: Path, rate: int = 16000, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = 0.1 * np.sin(np.arange(rate // 2) / 7.0)
    sf.write(path, np.stack([data] * channels, axis=1) if channels > 1 else data, rate, subtype="PCM_16")


def make_tree(root: Path) -> Path:
    for dialog, utts in DIALOGS.items():
        session = root / f"Session{int(dialog[3:5])}"
        evals, trans = [HEADER], []
        for n, (utt, code, text, has_wav) in enumerate(utts):
            evals.append(f"[{n * 3 + 1.5:.4f} - {n * 3 + 3.25:.4f}]\t{utt}\t{code}\t[2.5000, 3.0000, 2.0000]\n")
            evals.append(ANNOTATORS)
            trans.append(f"{utt} [{n * 3 + 1.5:08.4f}-{n * 3 + 3.25:08.4f}]: {text}\n")
            if has_wav:  # Session 2 is recorded at 44.1 kHz stereo: allowed, preprocessing converts it
                stereo = dialog.startswith("Ses02")
                _wav(session / "sentences" / "wav" / dialog / f"{utt}.wav", 44100 if stereo else 16000,
                     2 if stereo else 1)
        trans.insert(1, f"{dialog}_MXX0 [000.5000-001.0000]: Mm-hmm.\n")
        trans.append("M: [BREATHING]\n")
        trans.append(f"{dialog[:6]}_{dialog[7:]}_M_XX? [050.0000-051.0000]: [LAUGHTER]\n")
        for sub, text in (("EmoEvaluation", "".join(evals)), ("transcriptions", "".join(trans))):
            (session / "dialog" / sub).mkdir(parents=True, exist_ok=True)
            (session / "dialog" / sub / f"{dialog}.txt").write_text(text)
    (root / "Session1" / "dialog" / "EmoEvaluation" / "Categorical").mkdir()  # release has subfolders
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "IEMOCAP_full_release")


def test_exact_counts_on_quirky_tree(tree):
    corpus = load_corpus(tree)
    assert corpus.labels == ("neu", "hap", "sad", "ang")
    assert corpus.counts() == {
        "total": 8,
        "by_label": {"neu": 2, "hap": 3, "sad": 1, "ang": 2},
        "by_session": {"Ses01": 5, "Ses02": 3},
        "speakers": ["Ses01F", "Ses01M", "Ses02F", "Ses02M"],
    }
    assert corpus.sessions() == ["Ses01", "Ses02"]


def test_utterance_fields(tree):
    by_id = {u.id: u for u in load_iemocap(tree).utterances}
    assert set(by_id) == {"Ses01F_impro01_F000", "Ses01F_impro01_M000", "Ses01F_impro01_M002",
                          "Ses01M_script01_1_F000", "Ses01M_script01_1_M000", "Ses02F_impro02_F000",
                          "Ses02F_impro02_M000", "Ses02F_impro02_F001"}
    u = by_id["Ses01F_impro01_M002"]
    assert (u.label, u.session, u.speaker, u.text) == ("ang", "Ses01", "Ses01M", "Get out of here.")
    assert u.audio_path == tree / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M002.wav"
    assert by_id["Ses01M_script01_1_F000"].speaker == "Ses01F"  # dialog prefix 'M' is not the speaker
    assert by_id["Ses01F_impro01_M000"].label == "hap"  # exc merged


def test_speaker_of():
    assert speaker_of("Ses01F_impro01_M003") == ("Ses01", "Ses01M")
    assert speaker_of("Ses05M_script02_2_F014") == ("Ses05", "Ses05F")
    with pytest.raises(DataError, match="does not look like"):
        speaker_of("Ses01F")


def test_label_subset(tree):
    corpus = load_corpus(tree, labels=("neu", "ang"))
    assert corpus.counts()["by_label"] == {"neu": 2, "ang": 2} and corpus.counts()["total"] == 4
    with pytest.raises(DataError, match="no class 'fear'"):
        load_corpus(tree, format="iemocap", labels=("neu", "fear"))


def test_missing_transcript_and_wav_reported_together(tree):
    (tree / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav").unlink()
    (tree / "Session2/sentences/wav/Ses02F_impro02/Ses02F_impro02_M000.wav").write_bytes(b"not audio")
    trans = tree / "Session1/dialog/transcriptions/Ses01M_script01_1.txt"
    trans.write_text("".join(l for l in trans.read_text().splitlines(True) if "_F000" not in l))
    with pytest.raises(DataError) as info:
        load_corpus(tree)
    msg = str(info.value)
    assert "\n" not in msg and "3 labelled utterance(s) unusable" in msg
    assert "Ses01F_impro01_F000.wav: no wav file" in msg
    assert "Ses01M_script01_1_F000: no transcript line" in msg
    assert "Ses02F_impro02_M000.wav: unreadable audio" in msg


def test_not_a_corpus(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(DataError, match="is not a corpus: expected an IEMOCAP tree"):
            load_corpus(path)
    with pytest.raises(DataError, match="no such file"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown corpus format"):
        load_corpus(tmp_path, format="kaldi")
