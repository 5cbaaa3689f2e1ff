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
import math
import os
import re
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import soundfile as sf

from dmf.fileio import atomic_write
# the same stream opening and header checks as single clips get (one definition, in dmf.preprocess)
from dmf.preprocess import (RESAMPLE_MARGIN_S, AudioError, check_seconds, header_problem, libsndfile_words,
                            open_binary, source_name)

from .prediction import Prediction

MAX_RECORDING_SECONDS = 4 * 3600.0  # longest accepted recording (a long meeting); callers may lower it
TRANSCRIPT_FORMATS = {".vtt": "vtt", ".srt": "srt", ".json": "json"}  # suffix -> reader
POLICIES = ("first", "windows")
_VOICE_TAG = re.compile(r"<v(?:\.[^\s>]*)?\s+([^>]+)>")  # WebVTT voice span: <v Alice> or <v.loud Bob>
# a cue timing with a minus sign before either time: pysubs2 drops the sign (-1 s would read as 1 s)
_NEGATIVE_TIME = re.compile(r"(?:^|-->)\s*-\s*\d")
_NAME_PREFIX = re.compile(r"^\s*([^\s:][^:\n]{0,39}?):\s+(\S.*)$", re.S)  # "Alice: text" (name <= 40 chars)


class Scorer(Protocol):
    """What a conversation needs of a `Predictor` (typed here so this module does not import the
    predictor, whose `predict_conversation` imports this one)."""

    artifact: Any  # .input_samples, .sample_rate: the model's window
    labels: tuple[str, ...]
    max_batch: int
    min_clip_seconds: float

    def preprocess(self, audio: Any, text: Any, sample_rate: int | None = None, *,
                   min_clip_seconds: float | None = None, max_clip_seconds: float | None = None) -> dict[str, np.ndarray]: ...

    def infer(self, items: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray: ...

    def postprocess(self, log_probs: np.ndarray) -> Prediction: ...


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
    prediction: Prediction
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
        raw = source if isinstance(source, bytes) else _read_regular_file(Path(source))
        text = raw.decode("utf-8-sig")
    except OSError as exc:
        raise TranscriptError(f"{name}: cannot read transcript: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TranscriptError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    segments = _parse_json(text, name) if kind == "json" else _parse_subtitles(text, kind, name)
    if not segments:
        raise TranscriptError(f"{name}: no segments found: not a {kind.upper()} transcript, or an empty one")
    return segments


def _read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file; a FIFO (its open would block with no writer) or a device
    (/dev/zero never ends) is refused from its opened, non-blocking descriptor."""
    if "\0" in str(path):
        raise TranscriptError(f"{str(path)!r}: the path contains a NUL character")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
            raise TranscriptError(f"{path}: is {what}, not a transcript file")
        os.set_blocking(fd, True)
        return fh.read()


def _parse_subtitles(text: str, kind: str, name: str) -> list[Segment]:
    import pysubs2

    _check_cue_times(text, name)
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


def _check_cue_times(text: str, name: str) -> None:
    for n, line in enumerate(text.splitlines(), start=1):
        if "-->" in line and _NEGATIVE_TIME.search(line):
            raise TranscriptError(f"{name}: line {n}: negative cue time in {line.strip()[:80]!r}: "
                                  "times count from the start of the recording")


def _parse_json(text: str, name: str) -> list[Segment]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TranscriptError(f"{name}: unparseable JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise TranscriptError(f"{name}: unparseable JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer over Python's 4300-digit limit for str -> int
        raise TranscriptError(f"{name}: unparseable JSON ({_first_clause(exc)})") from None
    if isinstance(items, dict) and isinstance(items.get("segments"), list):
        items = items["segments"]  # the shape many speech recognisers write
    if not isinstance(items, list):
        raise TranscriptError(f"{name}: expected a JSON list of segments, got {type(items).__name__}")
    return [_json_segment(item, f"{name}: segment {i}") for i, item in enumerate(items)]


def _is_seconds(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_clause(exc: BaseException) -> str:
    """A message without Python's advice (int's digit-limit error names sys.set_int_max_str_digits)."""
    return str(exc).split(";")[0].strip()


def _json_segment(item: Any, where: str) -> Segment:
    if not isinstance(item, dict):
        raise TranscriptError(f"{where}: expected an object with start, end, text, got {type(item).__name__}")
    missing = [k for k in ("start", "end", "text") if k not in item]
    if missing:
        raise TranscriptError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("start", "end"):
        if not _is_seconds(item[key]):
            raise TranscriptError(f"{where}: {key} {_short(item[key])} is not a finite number of seconds")
    speaker = item.get("speaker")
    if not isinstance(item["text"], str):
        raise TranscriptError(f"{where}: text must be a string, got {type(item['text']).__name__}")
    if not (speaker is None or isinstance(speaker, str)):
        raise TranscriptError(f"{where}: speaker must be a string or null, got {type(speaker).__name__}")
    return Segment(float(item["start"]), float(item["end"]), item["text"].strip(), speaker or None)


# ------------------------------------------------------------------------------------ validation

def as_segments(segments: Any, name: str = "transcript") -> list[Segment]:
    """The segments a caller gave: a list of `Segment`s or of JSON-style dicts (start, end, text,
    speaker), each checked as a JSON transcript's are. Raises TranscriptError naming the segment."""
    if isinstance(segments, (str, bytes, dict)) or not isinstance(segments, Sequence):
        raise TranscriptError(f"{name}: expected a list of segments, got {type(segments).__name__}")
    out = []
    for i, seg in enumerate(segments):
        where = f"{name}: segment {i}"
        if isinstance(seg, Segment):
            seg = {"start": seg.start, "end": seg.end, "text": seg.text, "speaker": seg.speaker}
        elif not isinstance(seg, dict):
            raise TranscriptError(f"{where}: expected a Segment or a dict with start, end, text, "
                                  f"got {type(seg).__name__}")
        out.append(_json_segment(seg, where))
    return out


def check_segments(segments: Sequence[Segment], duration: float, name: str = "transcript",
                   max_recording_seconds: float | None = MAX_RECORDING_SECONDS) -> list[str]:
    """Refuse (TranscriptError, naming the segment by index and time) a recording over
    `max_recording_seconds`, a segment ending before it starts, reaching past the audio, or with empty text.
    Returns warnings: segments of one speaker that overlap (allowed: crosstalk, recogniser slop)."""
    limit = check_seconds("max_recording_seconds", max_recording_seconds, allow_none=True)
    if limit is not None and duration > limit:
        raise TranscriptError(f"the recording is {duration:.1f} s long, longer than the {limit:g} s maximum")
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

def predict_conversation(predictor: Scorer, audio: Any, segments: Sequence[Segment], *,
                         policy: str = "first", name: str = "transcript",
                         max_recording_seconds: float | None = MAX_RECORDING_SECONDS, batch_size: int | None = None,
                         progress: Callable[[int], None] | None = None) -> Conversation:
    """audio: a path, bytes or a seekable binary file. One prediction per segment (see the module
    docstring); `progress(n)` is called as segments finish. `batch_size` (default and cap: the
    predictor's max_batch) windows are prepared and scored at a time: memory follows it, not the
    recording's or a segment's length. `segments`: `Segment`s or JSON-style dicts (`as_segments`).
    Raises TranscriptError for a bad transcript and AudioError / TextError / ResultError (prefixed
    with the segment) for bad audio, text or scores."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is invalid: expected one of {POLICIES}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size {batch_size!r} is invalid: expected an integer >= 1")
    check_seconds("max_recording_seconds", max_recording_seconds, allow_none=True)
    segments = as_segments(segments, name)
    batch = min(batch_size or predictor.max_batch, predictor.max_batch)
    with _Recording(audio) as rec:
        warnings = check_segments(segments, rec.duration, name, max_recording_seconds)
        turns = []
        for chunk in _chunks(range(len(segments)), batch):
            turns += _predict_chunk(predictor, rec, segments, chunk, policy, batch)
            if progress:
                progress(len(chunk))
    return Conversation(turns, speaker_summary(turns), warnings, policy)


def _chunks(indices: range, size: int) -> Iterator[range]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def _predict_chunk(predictor: Scorer, rec: "_Recording", segments: Sequence[Segment],
                   chunk: range, policy: str, batch: int) -> list[Turn]:
    """Score the chunk's segments, `batch` windows per `infer`, and average each segment's
    log-probabilities over its windows. Windows are prepared as they are scored, so memory follows
    the batch, never a segment's length (policy "windows" over an hour is 720 windows)."""
    a = predictor.artifact
    window = a.input_samples / a.sample_rate  # s the model reads
    sums = {i: np.zeros(len(predictor.labels)) for i in chunk}  # float64 running sums of log-probs
    counts: Counter[int] = Counter()
    pending: list[dict] = []
    owner: list[int] = []  # the segment each pending window belongs to

    def run_pending() -> None:
        if not pending:
            return
        for i, row in zip(owner, predictor.infer(pending)):
            sums[i] += row
            counts[i] += 1
        pending.clear()
        owner.clear()

    for i in chunk:
        s = segments[i]
        for samples in rec.windows(s, window, policy, predictor.min_clip_seconds):
            pending.append(_prepare(predictor, samples, s, i, rec.rate))
            owner.append(i)
            if len(pending) >= batch:
                run_pending()
    run_pending()
    return [_turn(predictor, segments[i], i, sums[i] / counts[i], counts[i], window) for i in chunk]


def _prepare(predictor: Scorer, samples: np.ndarray, s: Segment, i: int, rate: int) -> dict:
    try:
        return predictor.preprocess(samples, s.text, rate, max_clip_seconds=None)
    except (AudioError, ValueError) as exc:  # AudioError, TextError, InputError
        raise type(exc)(f"segment {i} ({s.start:.3f}-{s.end:.3f} s): {exc}") from None


def _turn(predictor: Scorer, s: Segment, i: int, mean: np.ndarray, windows: int, window: float) -> Turn:
    try:
        prediction = predictor.postprocess(mean)
    except ValueError as exc:  # ResultError: scores not finite
        raise type(exc)(f"segment {i} ({s.start:.3f}-{s.end:.3f} s): {exc}") from None
    return Turn(s, prediction, truncated=s.end - s.start > window, windows=windows)


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
        self.name = source_name(source)
        self._fh, self._owned = open_binary(source)  # AudioError names the source
        try:
            problem = header_problem(self._fh)
            if problem:
                raise AudioError(f"{self.name}: {problem}")
            self._snd = sf.SoundFile(self._fh)
        except AudioError:
            self.close()
            raise
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            self.close()
            raise AudioError(f"{self.name}: not readable audio ({libsndfile_words(exc)})") from None
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


# ------------------------------------------------------------------------------------------ plot

def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> None:
    """Checked before a run that will plot, so a missing package does not waste the run."""
    if not _has_matplotlib():
        raise ImportError("--plot needs matplotlib (`pip install matplotlib`; it is not a runtime dependency)")


def opacity(probability: float, chance: float) -> float:
    """A turn's bar opacity: 0.25 at chance (a label the model barely prefers looks faint) to 1 when certain."""
    sure = (probability - chance) / (1.0 - chance) if chance < 1 else 1.0
    return 0.25 + 0.75 * min(max(sure, 0.0), 1.0)


def opacity_key(chance: float) -> list[tuple[float, float]]:
    """The timeline legend's opacity key: (probability, opacity) at chance, halfway and certain."""
    return [(prob, opacity(prob, chance)) for prob in (chance, (chance + 1.0) / 2, 1.0)]


def plot_timeline(conversation: Conversation, path: str | Path) -> None:
    """An emotion timeline PNG: time on x, one lane per speaker, a bar per turn coloured by its
    label, opacity by its probability (chance: faint, 1: solid); a legend of labels and of opacity
    (opacity_key). Written atomically."""
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
        ax.barh(lane, t.segment.end - t.segment.start, left=t.segment.start, height=0.7,
                color=colours[p.label], alpha=opacity(p.probabilities[p.label], chance), edgecolor="none")
        if t.segment.end - t.segment.start > span / 60:  # wide enough to name its label
            ax.text((t.segment.start + t.segment.end) / 2, lane, p.label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(speakers)), speakers)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title("emotion by turn (opacity: confidence, from chance to certain)")
    key = [Patch(color="grey", alpha=alpha, label=f"p {prob:.2f}") for prob, alpha in opacity_key(chance)]
    ax.legend(handles=[Patch(color=colours[x], label=x) for x in labels] + key, loc="upper left",
              bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
