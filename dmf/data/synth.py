"""A synthetic IEMOCAP-layout corpus for demos and tests (no dataset download needed).

Each utterance is a voiced synthetic signal (harmonic source on an f0 contour, syllable-like
amplitude bursts, breath noise) plus a transcript. Emotion shows in the prosody (pitch level and
range, energy, speaking rate, voice quality) and/or in the wording, and each utterance is one of:
  audio-clear (~35%): emotional prosody, neutral text shared by all classes;
  text-clear  (~35%): emotional text, prosody drawn from a class-agnostic distribution;
  both        (~30%): emotional prosody and emotional text.
So each modality alone explains only part of the labels and fusion should beat both unimodal
models clearly. Output is deterministic per seed (byte-identical files). A few utterances carry
codes the reader drops (xxx, fru), and transcripts have id-less and `MXX0` lines, as the release does.
`SYNTH.json` at the root records every utterance's mode and label (the reader ignores it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from dmf.data.records import IEMOCAP_LABELS, Corpus, DataError, Utterance

SAMPLE_RATE = 16000
SESSIONS = 5
MODES = ("audio", "text", "both")
MODE_P = (0.35, 0.35, 0.30)
DROPPED_CODES = ("xxx", "fru")  # one of each per session: exercises the reader's filtering
MIN_UTTERANCES = 4 * SESSIONS  # every session gets all four classes

# Prosody per class (means). pitch: x speaker base f0; range: f0 swing in semitones; energy: peak
# amplitude; rate: syllables/s; tilt: harmonic roll-off (low = harsh/rich); breath: noise ratio.
# Per-clip normalisation removes the energy level, so every class also differs in pitch, rate and timbre.
PROSODY = {
    "neu": dict(pitch=1.00, range=2.0, energy=0.20, rate=4.0, tilt=1.6, breath=0.08),
    "hap": dict(pitch=1.35, range=8.0, energy=0.32, rate=5.5, tilt=1.2, breath=0.06),
    "sad": dict(pitch=0.80, range=1.0, energy=0.07, rate=2.5, tilt=2.4, breath=0.35),
    "ang": dict(pitch=1.15, range=4.0, energy=0.55, rate=6.0, tilt=0.6, breath=0.04),
}
PARAMS = tuple(PROSODY["neu"])

# Wording per class; NEUTRAL is shared by all classes (the text of audio-clear utterances).
PHRASES = {
    "neu": ["okay, that is fine with me", "sure, we can look at it later", "I think so, yes",
            "alright, let me check", "that sounds reasonable", "fine, whatever works for you"],
    "hap": ["that is wonderful news", "I am so happy", "this is the best day ever", "I love it",
            "we did it, this is amazing", "I can't wait to see you", "congratulations, that is fantastic"],
    "sad": ["I miss her so much", "it hurts", "I feel so alone", "nothing will ever be the same",
            "I lost everything", "I wish he were still here", "everything is falling apart"],
    "ang": ["this is outrageous", "I am furious", "how dare you do this to me", "I can't stand this anymore",
            "get out of my way", "you lied to me again", "this is completely unacceptable"],
}
NEUTRAL = ["I went to the store on Tuesday", "the meeting is at three o'clock", "we need to pick up the car",
           "can you pass me the paper", "the train leaves from platform two", "I put the keys on the table",
           "my brother lives in Chicago", "the form has to be signed by Friday", "she called about the flight"]
FILLERS = ["", "", "well, ", "you know, ", "honestly, ", "look, ", "so "]
VAD = {"neu": (2.5, 2.5, 2.5), "hap": (4.0, 3.5, 3.0), "sad": (1.5, 2.0, 2.0), "ang": (1.5, 4.0, 4.0)}


@dataclass(frozen=True)
class _Item:
    """One planned utterance: where it goes and what it carries."""

    index: int
    session: int  # 1..5
    dialog: str
    utt_id: str
    code: str  # label as written in EmoEvaluation (hap may be written exc; dropped codes too)
    label: str | None  # reader's class, None for dropped codes
    mode: str
    gender: str
    text: str
    start: float
    duration: float


# ----------------------------------------------------------------------------------------- planning


def _text(label: str | None, mode: str, rng: np.random.Generator) -> str:
    """Emotional wording for text-clear/both, shared neutral wording otherwise."""
    if label is None or mode == "audio":
        parts = [NEUTRAL[rng.integers(len(NEUTRAL))]]
    else:
        pool = PHRASES[label]
        parts = [pool[i] for i in rng.choice(len(pool), size=rng.integers(1, 3), replace=False)]
    sentence = FILLERS[rng.integers(len(FILLERS))] + ", ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def _session_codes(n: int, rng: np.random.Generator) -> list[tuple[str, str | None]]:
    """(code, label) for n labelled utterances (balanced classes, shuffled) plus the dropped ones."""
    labels = [IEMOCAP_LABELS[i % 4] for i in range(n)]
    rng.shuffle(labels)
    codes = [("exc" if lab == "hap" and rng.random() < 0.4 else lab, lab) for lab in labels]
    codes += [(code, None) for code in DROPPED_CODES]
    order = rng.permutation(len(codes))
    return [codes[i] for i in order]


def _plan(seed: int, utterances: int) -> list[_Item]:
    rng = np.random.default_rng(seed)
    per_session = [utterances // SESSIONS + (s < utterances % SESSIONS) for s in range(SESSIONS)]
    items: list[_Item] = []
    for s, n in enumerate(per_session, start=1):
        dialogs = [f"Ses{s:02d}F_impro01", f"Ses{s:02d}M_script01_1", f"Ses{s:02d}F_impro02"]
        clock = {d: 0.0 for d in dialogs}
        turns: dict[tuple[str, str], int] = {}
        for j, (code, label) in enumerate(_session_codes(n, rng)):
            dialog, gender = dialogs[j % len(dialogs)], "FM"[j % 2]
            number = turns[dialog, gender] = turns.get((dialog, gender), -1) + 1
            mode = MODES[rng.choice(3, p=MODE_P)] if label else "audio"
            duration = round(float(rng.uniform(1.5, 4.0)), 4)
            start = round(clock[dialog] + float(rng.uniform(0.3, 1.5)), 4)
            clock[dialog] = start + duration
            items.append(_Item(len(items), s, dialog, f"{dialog}_{gender}{number:03d}", code, label, mode,
                               gender, _text(label, mode, rng), start, duration))
    return items


# ---------------------------------------------------------------------------------------- rendering


def _speaker_traits(seed: int, session: int, gender: str) -> dict:
    """Per-speaker offsets: base f0 (F higher than M), loudness and tempo habits."""
    rng = np.random.default_rng([seed, session, ord(gender)])
    base = rng.uniform(190, 235) if gender == "F" else rng.uniform(100, 135)
    return dict(f0=base, energy=rng.uniform(0.85, 1.15), rate=rng.uniform(0.9, 1.1))


def _prosody(item: _Item, rng: np.random.Generator) -> dict:
    """Prosody parameters: the class's (audio-clear, both) or a class-agnostic draw (text-clear,
    dropped codes: each parameter uniform over the span of the class means), then jitter."""
    if item.label is not None and item.mode != "text":
        params = dict(PROSODY[item.label])
    else:
        params = {k: rng.uniform(min(p[k] for p in PROSODY.values()), max(p[k] for p in PROSODY.values()))
                  for k in PARAMS}
    return {k: v * float(np.exp(rng.normal(0.0, 0.08))) for k, v in params.items()}


def _f0_contour(t: np.ndarray, base: float, semitones: float, rng: np.random.Generator) -> np.ndarray:
    """f0 in Hz per sample: two slow swings scaled to the pitch range, plus declination."""
    phase = rng.uniform(0, 2 * np.pi, size=2)
    swing = 0.6 * np.sin(2 * np.pi * rng.uniform(0.4, 0.9) * t + phase[0]) \
        + 0.4 * np.sin(2 * np.pi * rng.uniform(1.5, 2.5) * t + phase[1])
    return base * 2.0 ** ((semitones * swing - 0.8 * t) / 12.0)


def _envelope(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Syllable-like bursts: sin^2 bumps at `rate` per second with jittered onsets and stress."""
    env = np.zeros(n)
    step = SAMPLE_RATE / rate
    onset = 0.1 * SAMPLE_RATE
    while onset < n - 0.05 * SAMPLE_RATE:
        length = int(step * rng.uniform(0.6, 0.9))
        stop = min(n, int(onset) + length)
        x = np.arange(stop - int(onset)) / max(length, 1)
        env[int(onset):stop] += rng.uniform(0.55, 1.0) * np.sin(np.pi * x) ** 2
        onset += step * rng.uniform(0.8, 1.25)
    return env


def _render(item: _Item, seed: int) -> np.ndarray:
    """The utterance's waveform: (round(duration * 16000),) int16."""
    rng = np.random.default_rng([seed, 1_000_003, item.index])
    p, spk = _prosody(item, rng), _speaker_traits(seed, item.session, item.gender)
    n = int(round(item.duration * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    f0 = _f0_contour(t, spk["f0"] * p["pitch"], p["range"], rng)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = np.zeros(n)
    for k in range(1, 25):  # harmonics below 7.5 kHz only (no aliasing at 16 kHz)
        voiced += np.where(k * f0 < 7500, k ** -p["tilt"], 0.0) * np.sin(k * phase)
    voiced /= np.sqrt(np.mean(voiced ** 2)) + 1e-9
    env = _envelope(n, p["rate"] * spk["rate"], rng)
    source = voiced + 3.0 * p["breath"] * rng.standard_normal(n)
    x = p["energy"] * spk["energy"] * env * source / (1 + 3.0 * p["breath"])
    x += 0.002 * rng.standard_normal(n)  # room noise, so pauses are not digital silence
    return np.round(np.clip(x, -1.0, 1.0) * 32767).astype(np.int16)


def _wav_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ writing


def _eval_block(item: _Item) -> str:
    """One EmoEvaluation entry: the label line, then per-annotator lines (not labels)."""
    v, a, d = VAD.get(item.label or "neu")
    name = {"neu": "Neutral", "hap": "Happiness", "exc": "Excited", "sad": "Sadness", "ang": "Anger",
            "fru": "Frustration", "xxx": "Other"}[item.code]
    return (f"[{item.start:.4f} - {item.start + item.duration:.4f}]\t{item.utt_id}\t{item.code}\t"
            f"[{v:.4f}, {a:.4f}, {d:.4f}]\n"
            f"C-E1:\t{name};\t()\nC-E2:\t{name}; Neutral;\t()\nC-F1:\t{name};\t()\n"
            f"A-E1:\tval {round(v)}; act {round(a)}; dom  {round(d)};\t()\n\n")


def _dialog_files(items: list[_Item]) -> tuple[str, str]:
    """(EmoEvaluation text, transcription text) of one dialog, with the release's quirks."""
    evals = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"]
    trans = []
    for item in items:
        evals.append(_eval_block(item))
        end = item.start + item.duration
        trans.append(f"{item.utt_id} [{item.start:08.4f}-{end:08.4f}]: {item.text}\n")
    dialog, end = items[0].dialog, items[-1].start + items[-1].duration
    trans.append(f"{dialog}_MXX0 [{end + 0.5:08.4f}-{end + 1.1:08.4f}]: Mm-hmm.\n")  # id with no label
    trans.append("M: [BREATHING]\n")  # line without an utterance id
    return "".join(evals), "".join(trans)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_tree(stage: Path, items: list[_Item], seed: int,
                progress: Callable[[int, int], None] | None) -> None:
    dialogs: dict[tuple[int, str], list[_Item]] = {}
    for item in items:
        dialogs.setdefault((item.session, item.dialog), []).append(item)
    for (s, dialog), group in sorted(dialogs.items()):
        evals, trans = _dialog_files(sorted(group, key=lambda i: i.start))
        _write(stage / f"Session{s}" / "dialog" / "EmoEvaluation" / f"{dialog}.txt", evals.encode())
        _write(stage / f"Session{s}" / "dialog" / "transcriptions" / f"{dialog}.txt", trans.encode())
    for done, item in enumerate(items, start=1):
        wav = stage / f"Session{item.session}" / "sentences" / "wav" / item.dialog / f"{item.utt_id}.wav"
        _write(wav, _wav_bytes(_render(item, seed)))
        if progress:
            progress(done, len(items))
    meta = {"seed": seed, "sample_rate": SAMPLE_RATE,
            "utterances": {i.utt_id: {"code": i.code, "label": i.label, "mode": i.mode} for i in items}}
    _write(stage / "SYNTH.json", json.dumps(meta, indent=1, sort_keys=True).encode())


def _not_empty(out_dir: Path) -> DataError:
    return DataError(f"{out_dir}: already exists and is not empty (pass overwrite / --overwrite to replace it)")


def _publish(stage: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished tree into place: readers never see a half-written corpus."""
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        elif overwrite and out_dir.is_dir():
            shutil.rmtree(out_dir)
        else:
            raise _not_empty(out_dir)
    os.replace(stage, out_dir)


def synthesize(out_dir: str | Path, seed: int = 0, utterances: int = 400, *, overwrite: bool = False,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a synthetic IEMOCAP tree with `utterances` labelled utterances (plus 2 dropped-code
    ones per session) to `out_dir`. Returns the corpus summary: Corpus.counts() plus `path`,
    `seed`, `dropped` and `modes` (labelled utterances per mode). `progress(done, total)` is
    called after each wav."""
    out_dir = Path(out_dir)
    if utterances < MIN_UTTERANCES:
        raise DataError(f"utterances = {utterances} is too few: expected at least {MIN_UTTERANCES}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:  # fail before minutes of work
        raise _not_empty(out_dir)
    items = _plan(seed, utterances)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        _write_tree(stage, items, seed, progress)
        _publish(stage, out_dir, overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return _summary(out_dir, items, seed)


def _summary(out_dir: Path, items: list[_Item], seed: int) -> dict:
    wav = out_dir / "Session{}" / "sentences" / "wav"
    kept = [Utterance(i.utt_id, Path(str(wav).format(i.session)) / i.dialog / f"{i.utt_id}.wav", i.text,
                      i.label, f"Ses{i.session:02d}", f"Ses{i.session:02d}{i.gender}") for i in items if i.label]
    summary = Corpus(sorted(kept, key=lambda u: u.id), IEMOCAP_LABELS).counts()
    modes = [i.mode for i in items if i.label]
    summary.update(path=str(out_dir), seed=seed, dropped=len(items) - len(kept),
                   modes={m: modes.count(m) for m in MODES})
    return summary
