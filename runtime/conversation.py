"""Conversations: one emotion prediction per segment of a time-stamped transcript of a long recording.

Torch-free. A transcript is WebVTT (.vtt), SRT (.srt), both read with pysubs2, or JSON (.json):

    [{"start": 0.0, "end": 1.5, "text": "i am so happy today", "speaker": "Alice"}, ...]

`start` / `end` are seconds from the start of the recording (numbers, end > start), `text` a
non-empty string, `speaker` optional (a string or null); other keys are ignored (speech
recognisers add confidences, word lists). A WebVTT voice tag (`<v Alice>...`) or a "Name: " prefix
on a VTT/SRT cue gives its speaker.

The recording is never decoded whole: each segment is read by seeking in the file
(`sf.SoundFile.seek`) and reading only its frames (for the default policy only the model's window
plus the resampler margin, as a single clip would be), then prepared by `Predictor.preprocess`
exactly as a single clip at the file's rate would be, and run in batches through `Predictor.infer`.
So a segment cut from the recording gets the same prediction as the same samples given alone.

A segment longer than the model's window (input_samples / sample_rate) is `truncated`:
policy "first" (default) scores the model's first window, as a single clip would be;
policy "windows" scores every window of the segment and averages the log-probabilities
(a last window shorter than the minimum clip length is dropped, unless it is the only one).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import soundfile as sf

from dmf.preprocess import RESAMPLE_MARGIN_S, AudioError
# the same stream opening and WAV header check as single clips get (one definition, in dmf.preprocess)
from dmf.preprocess import _open_binary, _source_name, _wav_problem

if TYPE_CHECKING:
    from .predictor import Prediction, Predictor

MAX_RECORDING_SECONDS = 4 * 3600.0  # longest accepted recording (a long meeting); callers may lower it
TRANSCRIPT_FORMATS = {".vtt": "vtt", ".srt": "srt", ".json": "json"}  # suffix -> reader
POLICIES = ("first", "windows")
_VOICE_TAG = re.compile(r"<v(?:\.[^\s>]*)?\s+([^>]+)>")  # WebVTT voice span: <v Alice> or <v.loud Bob>
_NAME_PREFIX = re.compile(r"^\s*([^\s:][^:\n]{0,39}?):\s+(\S.*)$", re.S)  # "Alice: text" (name <= 40 chars)


class TranscriptError(ValueError):
    """A transcript that cannot be used; the one-line message names the file and the segment."""


@dataclass(frozen=True)
class Segment:
    """One transcript segment: seconds from the start of the recording, its text and speaker."""

    start: float  # s
    end: float  # s, > start
    text: str
    speaker: str | None = None  # None: the transcript does not say


@dataclass(frozen=True)
class Turn:
    """One segment's prediction. `windows`: how many model windows were scored for it."""

    segment: Segment
    prediction: "Prediction"
    truncated: bool  # the segment is longer than the model's window
    windows: int = 1

    def to_dict(self) -> dict[str, Any]:
        s = self.segment
        return {"start": s.start, "end": s.end, "speaker": s.speaker, "text": s.text,
                "label": self.prediction.label, "probabilities": dict(self.prediction.probabilities),
                "truncated": self.truncated, "windows": self.windows}


@dataclass(frozen=True)
class Conversation:
    """Every segment's prediction, in transcript order, and each speaker's share of each label."""

    turns: list[Turn]
    summary: dict[str, dict[str, float]]  # speaker ("?" when unknown) -> label -> share of its turns
    warnings: list[str] = field(default_factory=list)  # e.g. overlapping segments of one speaker
    policy: str = "first"

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "turns": [t.to_dict() for t in self.turns],
                "summary": self.summary, "warnings": list(self.warnings)}


# --------------------------------------------------------------------------------------- reading

def read_transcript(source: str | Path | bytes, name: str | None = None) -> list[Segment]:
    """A transcript file (or its bytes, with `name` giving the suffix) -> segments, in file order.
    Raises TranscriptError for an unknown suffix, an unreadable or unparseable file, or bad fields."""
    name = str(name or source)
    kind = TRANSCRIPT_FORMATS.get(Path(name).suffix.lower())
    if kind is None:
        raise TranscriptError(f"{name}: unknown transcript format {Path(name).suffix or '(no suffix)'!r}: "
                              f"expected {', '.join(TRANSCRIPT_FORMATS)}")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as exc:
        raise TranscriptError(f"{name}: cannot read transcript: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TranscriptError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    segments = _parse_json(text, name) if kind == "json" else _parse_subtitles(text, kind, name)
    if not segments:
        raise TranscriptError(f"{name}: no segments found: not a {kind.upper()} transcript, or an empty one")
    return segments


def _parse_subtitles(text: str, kind: str, name: str) -> list[Segment]:
    import pysubs2

    # pysubs2 drops tags, voice spans included: turn them into the "Name: " prefix first
    text = _VOICE_TAG.sub(lambda m: f"{m.group(1).strip()}: ", text).replace("</v>", "")
    try:
        subs = pysubs2.SSAFile.from_string(text, format_=kind)
    except Exception as exc:  # pysubs2 raises its own types and ValueError for malformed files
        raise TranscriptError(f"{name}: unparseable {kind.upper()} file: {exc}") from None
    segments = []
    for event in subs:
        if event.is_comment:
            continue
        body = event.plaintext.strip()
        match = _NAME_PREFIX.match(body)
        speaker, body = (match.group(1).strip(), match.group(2).strip()) if match else (event.name or None, body)
        segments.append(Segment(event.start / 1000.0, event.end / 1000.0, body, speaker))
    return segments


def _parse_json(text: str, name: str) -> list[Segment]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TranscriptError(f"{name}: unparseable JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(items, dict) and isinstance(items.get("segments"), list):
        items = items["segments"]  # the shape many speech recognisers write
    if not isinstance(items, list):
        raise TranscriptError(f"{name}: expected a JSON list of segments, got {type(items).__name__}")
    return [_json_segment(item, f"{name}: segment {i}") for i, item in enumerate(items)]


def _json_segment(item: Any, where: str) -> Segment:
    if not isinstance(item, dict):
        raise TranscriptError(f"{where}: expected an object with start, end, text, got {type(item).__name__}")
    missing = [k for k in ("start", "end", "text") if k not in item]
    if missing:
        raise TranscriptError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("start", "end"):
        value = item[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise TranscriptError(f"{where}: {key} {value!r} is not a number of seconds")
    speaker = item.get("speaker")
    if not isinstance(item["text"], str) or not (speaker is None or isinstance(speaker, str)):
        raise TranscriptError(f"{where}: text and speaker must be strings")
    return Segment(float(item["start"]), float(item["end"]), item["text"].strip(), speaker or None)


# ------------------------------------------------------------------------------------ validation

def check_segments(segments: Sequence[Segment], duration: float, name: str = "transcript",
                   max_seconds: float | None = MAX_RECORDING_SECONDS) -> list[str]:
    """Refuse (TranscriptError, naming the segment by index and time) a recording over
    `max_seconds`, a segment ending before it starts, reaching past the audio, or with empty text.
    Returns warnings: segments of one speaker that overlap (allowed: crosstalk, recogniser slop)."""
    if max_seconds is not None and duration > max_seconds:
        raise TranscriptError(f"the recording is {duration:.1f} s long, longer than the {max_seconds:g} s maximum")
    if not segments:
        raise TranscriptError(f"{name}: no segments")
    for i, s in enumerate(segments):
        where = f"{name}: segment {i} ({s.start:.3f}-{s.end:.3f} s)"
        if s.start < 0 or s.end <= s.start:
            raise TranscriptError(f"{where}: ends before it starts (start must be >= 0 and < end)")
        if s.end > duration + 1e-3:  # 1 ms: subtitle timestamps are rounded to milliseconds
            raise TranscriptError(f"{where}: outside the audio, which is {duration:.3f} s long")
        if not s.text.strip():
            raise TranscriptError(f"{where}: empty text")
    return _overlaps(segments, name)


def _overlaps(segments: Sequence[Segment], name: str) -> list[str]:
    warnings, last = [], {}  # speaker -> (index, segment) ending last so far
    for i, s in sorted(enumerate(segments), key=lambda p: p[1].start):
        prev = last.get(s.speaker)
        if s.speaker is not None and prev is not None and s.start < prev[1].end:
            warnings.append(f"{name}: segment {i} ({s.start:.3f}-{s.end:.3f} s) overlaps segment {prev[0]} "
                            f"({prev[1].start:.3f}-{prev[1].end:.3f} s) of the same speaker {s.speaker!r}")
        if prev is None or s.end > prev[1].end:
            last[s.speaker] = (i, s)
    return warnings


# ------------------------------------------------------------------------------------ prediction

def predict_conversation(predictor: "Predictor", audio: Any, segments: Sequence[Segment], *,
                         policy: str = "first", name: str = "transcript",
                         max_seconds: float | None = MAX_RECORDING_SECONDS, batch_size: int | None = None,
                         progress: Callable[[int], None] | None = None) -> Conversation:
    """audio: a path, bytes or a seekable binary file. One prediction per segment (see the module
    docstring); `progress(n)` is called as segments finish. `batch_size` segments (default and cap:
    the predictor's max_batch) are held at once: memory follows it, not the recording's length.
    Raises TranscriptError for a bad transcript and AudioError / TextError / ResultError (prefixed
    with the segment) for bad audio, text or scores."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is invalid: expected one of {POLICIES}")
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size {batch_size!r} is invalid: expected an integer >= 1")
    with _Recording(audio) as rec:
        warnings = check_segments(segments, rec.duration, name, max_seconds)
        turns = []
        for chunk in _chunks(range(len(segments)), min(batch_size or predictor.max_batch, predictor.max_batch)):
            turns += _predict_chunk(predictor, rec, segments, chunk, policy)
            if progress:
                progress(len(chunk))
    return Conversation(turns, speaker_summary(turns), warnings, policy)


def _chunks(indices: range, size: int) -> Iterator[range]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def _predict_chunk(predictor: "Predictor", rec: "_Recording", segments: Sequence[Segment],
                   chunk: range, policy: str) -> list[Turn]:
    """Prepare every window of the chunk's segments, run them in one `infer`, average per segment."""
    a = predictor.artifact
    window = a.input_samples / a.sample_rate  # s the model reads
    items, owner = [], []  # prepared windows and the segment each belongs to
    for i in chunk:
        s = segments[i]
        for samples in rec.windows(s, window, policy, predictor.min_seconds):
            try:
                items.append(predictor.preprocess(samples, s.text, rec.rate, max_seconds=None))
            except (AudioError, ValueError) as exc:  # AudioError, TextError, InputError
                raise type(exc)(f"segment {i} ({s.start:.3f}-{s.end:.3f} s): {exc}") from None
            owner.append(i)
    rows, owner = predictor.infer(items), np.asarray(owner)
    turns = []
    for i in chunk:
        s, mine = segments[i], rows[owner == i]  # (windows, C) log-probs
        try:
            prediction = predictor.postprocess(mine.mean(axis=0))
        except ValueError as exc:  # ResultError: scores not finite
            raise type(exc)(f"segment {i} ({s.start:.3f}-{s.end:.3f} s): {exc}") from None
        turns.append(Turn(s, prediction, truncated=s.end - s.start > window, windows=len(mine)))
    return turns


def speaker_summary(turns: Sequence[Turn]) -> dict[str, dict[str, float]]:
    """speaker -> label -> share of that speaker's turns ("?" for turns without a speaker)."""
    by_speaker: dict[str, Counter] = defaultdict(Counter)
    for t in turns:
        by_speaker[t.segment.speaker or "?"][t.prediction.label] += 1
    labels = list(turns[0].prediction.probabilities) if turns else []
    return {spk: {lab: counts[lab] / sum(counts.values()) for lab in labels} for spk, counts in by_speaker.items()}


class _Recording:
    """An open recording read segment by segment: only the frames asked for are decoded."""

    def __init__(self, source: Any) -> None:
        self.name = _source_name(source)
        try:
            self._fh, self._owned = _open_binary(source)
        except OSError as exc:
            raise AudioError(f"{self.name}: cannot open audio file: {exc.strerror or exc}") from None
        try:
            problem = _wav_problem(self._fh)
            if problem:
                raise AudioError(f"{self.name}: {problem}")
            self._snd = sf.SoundFile(self._fh)
        except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
            self.close()
            raise AudioError(f"{self.name}: not readable audio ({str(exc).split(':')[-1].strip()})") from None
        except AudioError:
            self.close()
            raise
        self.rate, self.frames = self._snd.samplerate, self._snd.frames
        if not self._snd.seekable():
            self.close()
            raise AudioError(f"{self.name}: the audio format cannot seek; convert it to WAV or FLAC")
        self.duration = self.frames / self.rate
        self.reads: list[tuple[int, int]] = []  # (first frame, frames) of every read, for tests

    def read(self, start_s: float, seconds: float) -> np.ndarray:
        """(frames, channels) float32 from start_s for `seconds` (clipped to the file)."""
        first = int(round(start_s * self.rate))
        count = max(0, min(int(round((start_s + seconds) * self.rate)), self.frames) - first)
        self._snd.seek(first)
        self.reads.append((first, count))
        try:
            return self._snd.read(count, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"{self.name}: cannot decode {start_s:.3f}-{start_s + seconds:.3f} s: {exc}") from None

    def windows(self, s: Segment, window: float, policy: str, min_seconds: float) -> Iterator[np.ndarray]:
        """The samples to score for segment `s`: policy "first" its start (the model's window plus
        the resampler margin, as a single clip is decoded); "windows" each window in turn."""
        length = s.end - s.start
        if policy == "first":
            yield self.read(s.start, min(length, window + RESAMPLE_MARGIN_S))
            return
        count = max(1, int(np.ceil(length / window - 1e-9)))
        for k in range(count):
            left = s.end - (s.start + k * window)
            if k and left < min_seconds:
                return  # a short tail cannot be scored alone
            # the margin beyond the window feeds the resampler only; never past the segment end
            yield self.read(s.start + k * window, min(left, window + RESAMPLE_MARGIN_S))

    def close(self) -> None:
        if getattr(self, "_snd", None) is not None:
            self._snd.close()
        if self._owned:
            self._fh.close()

    def __enter__(self) -> "_Recording":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------- outputs

OUTPUT_KINDS = {".jsonl": "jsonl", ".csv": "csv"}  # --out suffix -> writer


def output_kind(path: str | Path) -> str:
    """The writer for an --out path, checked before anything runs (nothing is written on error)."""
    kind = OUTPUT_KINDS.get(Path(path).suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown output type {Path(path).suffix or '(no suffix)'!r}: expected .jsonl or .csv")
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder, expected a file")
    return kind


def write_turns(conversation: Conversation, path: str | Path) -> None:
    """One line (JSONL) or row (CSV, a p_<label> column per label) per turn, written atomically."""
    import csv
    import io

    from .bulk import safe_cell

    kind, buf = output_kind(path), io.StringIO()
    rows = [t.to_dict() for t in conversation.turns]
    if kind == "jsonl":
        buf.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    else:
        labels = list(rows[0]["probabilities"]) if rows else []
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["start", "end", "speaker", "text", "label", "truncated", "windows"]
                        + [f"p_{x}" for x in labels])
        for r in rows:  # speaker and text as text in a spreadsheet, never a formula (as manifest CSVs)
            writer.writerow([r["start"], r["end"], safe_cell(r["speaker"] or ""), safe_cell(r["text"]), r["label"],
                             r["truncated"], r["windows"]] + [f"{r['probabilities'][x]:.6f}" for x in labels])
    _atomic_write(Path(path), lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """write(tmp) to a hidden sibling of `path`, then rename it over `path` (same filesystem)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> None:
    """Checked before a run that will plot, so a missing package does not waste the run."""
    if not _has_matplotlib():
        raise ImportError("--plot needs matplotlib (`pip install matplotlib`; it is not a runtime dependency)")


def plot_timeline(conversation: Conversation, path: str | Path) -> None:
    """An emotion timeline PNG: time on x, one lane per speaker, a bar per turn coloured by its
    label, opacity by its probability (chance: faint, 1: solid); a legend of labels. Written atomically."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    turns = conversation.turns
    speakers = list(dict.fromkeys(t.segment.speaker or "?" for t in turns))
    labels = list(turns[0].prediction.probabilities) if turns else []
    colours = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.6 * len(speakers)))
    chance = 1.0 / max(len(labels), 1)
    span = max((t.segment.end for t in turns), default=1.0)
    for t in turns:
        lane, p = speakers.index(t.segment.speaker or "?"), t.prediction
        # opacity spans chance (faint) .. certain (solid): a label the model barely prefers looks it
        sure = (p.probabilities[p.label] - chance) / (1.0 - chance) if chance < 1 else 1.0
        ax.barh(lane, t.segment.end - t.segment.start, left=t.segment.start, height=0.7,
                color=colours[p.label], alpha=0.25 + 0.75 * sure, edgecolor="none")
        if t.segment.end - t.segment.start > span / 60:  # wide enough to name its label
            ax.text((t.segment.start + t.segment.end) / 2, lane, p.label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(speakers)), speakers)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title("emotion by turn (opacity: confidence, from chance to certain)")
    ax.legend(handles=[Patch(color=colours[x], label=x) for x in labels], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    try:
        _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
