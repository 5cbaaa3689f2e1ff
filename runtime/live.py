"""Live sessions: PCM chunks in as they arrive, one emotion event per spoken utterance out.

Torch-free. A `LiveSession` takes the client's PCM (any rate, int16 or float32, mono or
interleaved channels: `StreamFormat`), mixes it down to mono, resamples it to 16 kHz with soxr's
streaming resampler, and runs a voice activity detector (VAD) over 30 ms frames. A small state
machine turns the VAD's per-frame speech probabilities into utterances (`LiveOptions`: threshold,
minimum speech, minimum silence, padding, maximum length). Each utterance's 16 kHz samples and
its text go to `score` (for example `lambda a, t: predictor.predict(a, t, 16000)`), so an
utterance gets exactly the prediction a single clip of the same samples and text gets.

The VAD is webrtcvad (the `live` extra): Silero's model, tried first, gives the synthetic corpus's
speech a probability near 0 (it was trained on real speech), so it could not be tested here;
docs/live.md has the measurements. Its per-frame probability is the share of the frame's three
10 ms sub-frames webrtcvad calls speech (0, 1/3, 2/3 or 1), so `threshold` keeps its usual meaning.

Text: `text_for(utterance_id, samples)` (the application's speech recogniser) or
`text_span(start_s, end_s)` (a transcript) is asked when the utterance closes; a client may also
send it with `provide_text`, before or after the utterance closes. An utterance without text waits
up to `text_wait_s`; then the empty-text policy applies (`empty_text`: score it with
`placeholder_text`, or "skip": an event without a label). Scoring runs inside feed / provide_text
/ poll / finish, synchronously: a server calls them from a worker thread.

Memory is bounded: the open utterance (at most `max_utterance_s` plus the padding), one VAD frame,
and at most `max_pending` closed utterances waiting for text (past that, the oldest is scored).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dmf import install_hint

from .conversation import Segment
from .prediction import Prediction

RATE = 16000  # Hz: what the VAD and `score` get
FRAME = 480  # samples: one 30 ms VAD frame at 16 kHz
SUB_FRAMES = 3  # webrtcvad decides per 10 ms; the frame's probability is their share of speech
SAMPLE_FORMATS = {"int16": np.dtype("<i2"), "float32": np.dtype("<f4")}
EMPTY_TEXT_POLICIES = ("placeholder", "skip")
MAX_CHANNELS = 64  # as dmf.preprocess accepts for files
MIN_OVERLAP_S = 0.05  # s: a transcript segment gives its text to an utterance it overlaps by this much
MAX_STREAM_RATE = 384000  # Hz, the highest rate soxr's presets are measured for in dmf.preprocess


class UnknownUtterance(LookupError):
    """Text sent for an utterance id the session does not hold (never started, or already scored)."""


@dataclass(frozen=True)
class StreamFormat:
    """What the client's PCM is. Channels are interleaved when > 1 and mixed down to mono (their
    mean, as a file's are); samples are little-endian."""

    sample_rate: int = 16000  # Hz of the client's PCM
    channels: int = 1  # interleaved when > 1; mixed down to mono
    sample_format: str = "int16"  # "int16" | "float32" (little-endian)

    def __post_init__(self) -> None:
        rate, channels = self.sample_rate, self.channels
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 1000 <= rate <= MAX_STREAM_RATE:
            raise ValueError(f"sample_rate {rate!r} is invalid: expected an integer from 1000 to {MAX_STREAM_RATE}")
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or not 1 <= channels <= MAX_CHANNELS:
            raise ValueError(f"channels {channels!r} is invalid: expected an integer from 1 to {MAX_CHANNELS}")
        if self.sample_format not in SAMPLE_FORMATS:
            raise ValueError(f"sample_format {self.sample_format!r} is invalid: expected one of "
                             f"{', '.join(SAMPLE_FORMATS)}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "StreamFormat":
        """A client's JSON format message (unknown keys refused, missing keys default)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"stream format: expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"sample_rate", "channels", "sample_format"})
        if unknown:
            raise ValueError(f"stream format: unknown field(s) {unknown}: expected sample_rate, channels, sample_format")
        return cls(**d)

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample frame (all channels)."""
        return self.channels * SAMPLE_FORMATS[self.sample_format].itemsize


@dataclass(frozen=True)
class LiveOptions:
    """The VAD's knobs and the text policy (docs/live.md)."""

    threshold: float = 0.5  # a frame is speech when the VAD's probability >= this
    min_speech_s: float = 0.25  # shorter speech is dropped (a click, a cough): no event at all
    min_silence_s: float = 0.25  # this much silence ends an utterance
    speech_pad_s: float = 0.1  # audio kept before the first speech frame (webrtcvad calls an onset late)
    end_pad_s: float = 0.03  # audio kept after the last speech frame (<= min_silence_s; webrtcvad's own
    #   hangover already keeps 50-150 ms)
    max_utterance_s: float = 20.0  # speech is cut here (the event says cut); dmf listen uses the model's window
    text_wait_s: float = 0.0  # how long a closed utterance without text waits for provide_text
    empty_text: str = "placeholder"  # no text after the wait: "placeholder" scores with placeholder_text, "skip" does not score
    placeholder_text: str = "..."  # the text an utterance without one is scored with
    max_pending: int = 16  # utterances waiting for text; past this the oldest is scored at once
    aggressiveness: int = 2  # webrtcvad's mode, 0 (keeps most speech) .. 3 (drops most non-speech)

    def __post_init__(self) -> None:
        for name in ("threshold", "min_speech_s", "min_silence_s", "speech_pad_s", "end_pad_s", "max_utterance_s",
                     "text_wait_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} {value!r} is invalid: expected a finite number >= 0")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold {self.threshold!r} is invalid: expected a number in (0, 1]")
        if self.end_pad_s > self.min_silence_s:
            raise ValueError(f"end_pad_s {self.end_pad_s!r} is invalid: it must not exceed min_silence_s "
                             f"({self.min_silence_s!r}), the silence seen before an utterance closes")
        if self.max_utterance_s < max(self.min_speech_s, FRAME / RATE) + self.speech_pad_s + self.end_pad_s:
            raise ValueError(f"max_utterance_s {self.max_utterance_s!r} is invalid: expected at least "
                             f"min_speech_s + speech_pad_s + end_pad_s")
        if self.empty_text not in EMPTY_TEXT_POLICIES:
            raise ValueError(f"empty_text {self.empty_text!r} is invalid: expected one of {', '.join(EMPTY_TEXT_POLICIES)}")
        if not isinstance(self.placeholder_text, str) or not self.placeholder_text.strip():
            raise ValueError(f"placeholder_text {self.placeholder_text!r} is invalid: expected non-blank text")
        if isinstance(self.max_pending, bool) or not isinstance(self.max_pending, int) or self.max_pending < 0:
            raise ValueError(f"max_pending {self.max_pending!r} is invalid: expected an integer >= 0")
        if isinstance(self.aggressiveness, bool) or self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness {self.aggressiveness!r} is invalid: expected 0, 1, 2 or 3")


@dataclass(frozen=True)
class LiveEvent:
    """One event. Times are seconds of the stream from its first sample."""

    kind: str  # "speech_started" | "utterance"
    utterance_id: int
    start_s: float
    end_s: float | None  # None for speech_started
    text: str | None = None  # the text the utterance was scored with
    label: str | None = None  # None: not scored (empty-text policy "skip", or `error`)
    probabilities: dict | None = None
    cut: bool = False  # speech reached max_utterance_s and was cut
    latency_s: float | None = None  # from the VAD's end-of-utterance decision to this event (clock)
    error: str | None = None  # why an utterance has no label (one line)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"type": kind, ...}; a speech_started event carries its id and start only."""
        if self.kind == "speech_started":
            return {"type": self.kind, "utterance_id": self.utterance_id, "start_s": self.start_s}
        out = {"type": self.kind, **asdict(self)}
        del out["kind"]
        return out


@dataclass
class _Utterance:
    """A closed utterance: its 16 kHz samples and, once known, its text."""

    uid: int
    start: int  # first sample (16 kHz, from the stream's start)
    end: int  # one past the last sample
    samples: np.ndarray = field(repr=False)
    cut: bool
    decided: float  # clock() when the VAD closed it
    text: str | None = None
    deadline: float = math.inf  # clock() after which it is scored with the text it has


class WebrtcVad:
    """webrtcvad over 30 ms frames of 16 kHz float32: probability = share of speech sub-frames."""

    frame = FRAME

    def __init__(self, aggressiveness: int = 2) -> None:
        try:
            import webrtcvad
        except ImportError:
            raise ImportError(f"live sessions need webrtcvad: {install_hint('live')}") from None
        self._vad = webrtcvad.Vad(aggressiveness)

    def __call__(self, frame: np.ndarray) -> float:
        """frame: (480,) float32 in [-1, 1] -> speech probability in {0, 1/3, 2/3, 1}."""
        pcm = np.clip(np.rint(frame * 32768.0), -32768, 32767).astype("<i2").tobytes()
        step = len(pcm) // SUB_FRAMES
        return sum(self._vad.is_speech(pcm[i:i + step], RATE) for i in range(0, len(pcm), step)) / SUB_FRAMES


class _Audio:
    """The last samples of the 16 kHz stream, in one preallocated array: at most `capacity`."""

    def __init__(self, capacity: int) -> None:
        self._buf = np.zeros(2 * capacity, dtype=np.float32)  # twice: a shift moves data once per capacity samples
        self._capacity = capacity
        self.first = 0  # stream index of _buf[0]
        self.stop = 0  # stream index one past the last sample held

    def append(self, frame: np.ndarray, keep_from: int) -> None:
        """Add samples; everything before stream index `keep_from` may be dropped."""
        used = self.stop - self.first
        if used + len(frame) > len(self._buf):
            keep_from = max(keep_from, self.stop + len(frame) - self._capacity)
            drop = min(max(0, keep_from - self.first), used)
            self._buf[:used - drop] = self._buf[drop:used]
            self.first, used = keep_from, used - drop
        self._buf[used:used + len(frame)] = frame
        self.stop += len(frame)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """A copy of stream samples [start, stop) (clipped to what is held)."""
        start = max(start, self.first)
        return self._buf[start - self.first:stop - self.first].copy()


class LiveSession:
    """One stream: feed PCM, get events. Not thread-safe: one caller at a time."""

    def __init__(self, score: Callable[[np.ndarray, str], Prediction], stream: StreamFormat = StreamFormat(),
                 options: LiveOptions = LiveOptions(),
                 text_for: Callable[[int, np.ndarray], str | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 text_span: Callable[[float, float], str | None] | None = None,
                 vad: Callable[[np.ndarray], float] | None = None) -> None:
        """score(samples (n,) float32 16 kHz mono, text) -> Prediction. text_span(start_s, end_s):
        text for an utterance from its times (a transcript). vad: (480,) float32 frame -> speech
        probability (default: webrtcvad with `options.aggressiveness`)."""
        self.stream, self.options = stream, options
        self._score, self._text_for, self._text_span, self._clock = score, text_for, text_span, clock
        self._vad = vad or WebrtcVad(options.aggressiveness)
        self._resampler = None if stream.sample_rate == RATE else _resampler(stream.sample_rate)
        pad, self._end_pad = _samples(options.speech_pad_s), _samples(options.end_pad_s)
        self._pad, self._min_speech = pad, _samples(options.min_speech_s)
        self._min_silence, self._max_len = _samples(options.min_silence_s), _samples(options.max_utterance_s)
        self._audio = _Audio(self._max_len + pad + self._end_pad + FRAME)
        self._bytes_rest = b""  # a sample frame split between two feeds
        self._rest = np.zeros(0, dtype=np.float32)  # 16 kHz samples short of a VAD frame
        self._t = 0  # 16 kHz samples through the VAD so far
        self._speech_start: int | None = None  # first speech frame of the open utterance
        self._utt_start = 0  # the open utterance's first sample (padding included)
        self._last_speech = 0  # one past the last speech frame
        self._last_end = 0  # end of the last closed utterance: the next never overlaps it
        self._open_id: int | None = None  # set once speech_started was sent
        self._early_text: dict[int, str] = {}  # provide_text before the utterance closed
        self._pending: OrderedDict[int, _Utterance] = OrderedDict()
        self._next_id = 0
        self.finished = False

    # ------------------------------------------------------------------------------------ API
    def feed(self, pcm: bytes | bytearray | memoryview | np.ndarray) -> list[LiveEvent]:
        """PCM in the stream's format (bytes, or an array of samples: (n,) or (n, channels));
        returns the events it completes. Raises ValueError for malformed or non-finite samples."""
        if self.finished:
            raise ValueError("the stream is finished: no more audio is accepted")
        mono = self._decode(pcm)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        return self._run(mono) + self.poll()

    def provide_text(self, utterance_id: int, text: str) -> list[LiveEvent]:
        """Text for an utterance, open (kept until it closes; a later text replaces it) or waiting;
        a waiting one is scored now. Blank text applies the empty-text policy at once.
        Raises UnknownUtterance for an id that is not open or waiting."""
        if not isinstance(text, str):
            raise ValueError(f"text for utterance {utterance_id!r}: expected a string, got {type(text).__name__}")
        if isinstance(utterance_id, bool) or not isinstance(utterance_id, int):
            raise UnknownUtterance(f"utterance {utterance_id!r} is unknown: ids are integers")
        if utterance_id == self._open_id:
            self._early_text[utterance_id] = text
            return []
        utt = self._pending.pop(utterance_id, None)
        if utt is None:
            raise UnknownUtterance(f"utterance {utterance_id!r} is unknown: not started yet, or already scored")
        utt.text = text
        return [self._scored(utt)]

    def poll(self) -> list[LiveEvent]:
        """Utterances whose text wait has expired, scored now (call it now and then on a quiet stream)."""
        now = self._clock()
        due = [uid for uid, u in self._pending.items() if u.deadline <= now]
        return [self._scored(self._pending.pop(uid)) for uid in due]

    def finish(self) -> list[LiveEvent]:
        """End of stream: the resampler is flushed, an open utterance closes, every waiting one is
        scored with the text it has. The session accepts no more audio."""
        if self.finished:
            return []
        tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True) if self._resampler else None
        events = self._run(tail) if tail is not None and len(tail) else []
        self.finished = True
        if len(self._rest):  # the last partial frame is audio too: pad it to a frame for the VAD
            events += self._frame(np.concatenate([self._rest, np.zeros(FRAME - len(self._rest), np.float32)]),
                                  real=len(self._rest))
            self._rest = self._rest[:0]
        if self._open_id is not None:  # an open burst without an id is under min_speech_s: dropped
            events += self._close(min(self._last_speech + self._end_pad, self._t), cut=False)
        while self._pending:
            events.append(self._scored(self._pending.popitem(last=False)[1]))
        return events

    @property
    def seconds(self) -> float:
        """Stream seconds through the VAD so far."""
        return self._t / RATE

    @property
    def pending(self) -> int:
        """Closed utterances waiting for text."""
        return len(self._pending)

    # ----------------------------------------------------------------------------- decoding
    def _decode(self, pcm: Any) -> np.ndarray:
        """PCM -> (n,) float32 mono at the stream's rate."""
        fmt = self.stream
        if isinstance(pcm, np.ndarray):
            data = pcm.reshape(-1, fmt.channels) if pcm.ndim == 1 else pcm
            if data.ndim != 2 or data.shape[1] != fmt.channels:
                raise ValueError(f"pcm array has shape {pcm.shape}: expected (n,) or (n, {fmt.channels})")
        elif isinstance(pcm, (bytes, bytearray, memoryview)):
            raw = self._bytes_rest + bytes(pcm)
            whole = len(raw) - len(raw) % fmt.frame_bytes
            self._bytes_rest = raw[whole:]
            data = np.frombuffer(raw[:whole], dtype=SAMPLE_FORMATS[fmt.sample_format]).reshape(-1, fmt.channels)
        else:
            raise ValueError(f"pcm: expected bytes or a numpy array, got {type(pcm).__name__}")
        return _to_mono_float(data)

    # ---------------------------------------------------------------------------------- VAD
    def _run(self, mono: np.ndarray) -> list[LiveEvent]:
        """Cut 16 kHz samples into VAD frames (the remainder waits for the next feed)."""
        x = np.concatenate([self._rest, mono]) if len(self._rest) else mono
        whole = len(x) - len(x) % FRAME
        self._rest = x[whole:].copy()
        events: list[LiveEvent] = []
        for i in range(0, whole, FRAME):
            events += self._frame(x[i:i + FRAME])
        return events

    def _frame(self, frame: np.ndarray, real: int = FRAME) -> list[LiveEvent]:
        """One VAD frame through the state machine; `real`: how many of its samples are audio."""
        start, self._t = self._t, self._t + real
        keep = self._utt_start if self._speech_start is not None else self._t - self._pad - FRAME
        self._audio.append(frame[:real], keep_from=keep)
        speech = self._vad(frame) >= self.options.threshold
        events: list[LiveEvent] = []
        if speech:
            if self._speech_start is None:
                self._speech_start = start
                self._utt_start = max(start - self._pad, self._last_end, self._audio.first)
            self._last_speech = self._t
            if self._open_id is None and self._last_speech - self._speech_start >= self._min_speech:
                events.append(self._started())
        elif self._speech_start is not None and self._t - self._last_speech >= self._min_silence:
            if self._open_id is None:  # shorter than min_speech_s: dropped
                self._speech_start = None
            else:
                events += self._close(self._last_speech + self._end_pad, cut=False)
        if self._speech_start is not None and self._t - self._utt_start >= self._max_len:
            if self._open_id is None:
                events.append(self._started())
            events += self._close(self._utt_start + self._max_len, cut=True)  # exactly max_utterance_s
            if speech:  # still speaking: the next utterance starts where this one was cut
                self._speech_start = self._utt_start = self._last_end
        return events

    def _started(self) -> LiveEvent:
        self._open_id, self._next_id = self._next_id, self._next_id + 1
        return LiveEvent("speech_started", self._open_id, self._utt_start / RATE, None)

    def _close(self, end: int, cut: bool) -> list[LiveEvent]:
        """Close the open utterance at sample `end`; scored now when its text is known, else waits."""
        uid = self._open_id
        utt = _Utterance(uid, self._utt_start, end, self._audio.slice(self._utt_start, end), cut, self._clock())
        self._speech_start, self._open_id, self._last_end = None, None, end
        utt.text = self._early_text.pop(uid, None)
        if utt.text is None and self._text_span is not None:
            utt.text = self._text_span(utt.start / RATE, utt.end / RATE)
        if utt.text is None and self._text_for is not None:
            utt.text = self._text_for(uid, utt.samples)
        if utt.text is not None or self.options.text_wait_s <= 0 or self.finished:
            return [self._scored(utt)]
        utt.deadline = utt.decided + self.options.text_wait_s
        self._pending[uid] = utt
        events = []
        while len(self._pending) > self.options.max_pending:  # bounded: the oldest waits no longer
            events.append(self._scored(self._pending.popitem(last=False)[1]))
        return events

    # ------------------------------------------------------------------------------ scoring
    def _scored(self, utt: _Utterance) -> LiveEvent:
        """The utterance event; scoring errors a bad input can cause become the event's `error`."""
        text = utt.text if utt.text is not None and utt.text.strip() else None
        label = probs = error = None
        if text is None and self.options.empty_text == "skip":
            error = "no text arrived for this utterance (empty-text policy: skip)"
        else:
            text = text if text is not None else self.options.placeholder_text
            try:
                pred = self._score(utt.samples, text)
                label, probs = pred.label, dict(pred.probabilities)
            except ValueError as exc:  # AudioError, TextError, ResultError: this input, not the session
                error = " ".join(str(exc).split()) or type(exc).__name__
        return LiveEvent("utterance", utt.uid, utt.start / RATE, utt.end / RATE, text, label, probs, utt.cut,
                         latency_s=max(0.0, self._clock() - utt.decided), error=error)


def transcript_text(segments: Sequence[Segment], min_overlap_s: float = MIN_OVERLAP_S) -> Callable[[float, float], str | None]:
    """A `text_span` from transcript segments (`conversation.read_transcript`): an utterance takes
    the text of the segments it overlaps by at least `min_overlap_s` (the VAD's boundaries may run
    a little into a neighbouring segment), joined in time order; None when it overlaps none."""
    ordered = sorted(segments, key=lambda s: (s.start, s.end))

    def text_span(start_s: float, end_s: float) -> str | None:
        texts = [s.text for s in ordered if min(s.end, end_s) - max(s.start, start_s) >= min_overlap_s]
        return " ".join(texts) or None

    return text_span


def _samples(seconds: float) -> int:
    return int(round(seconds * RATE))


def _resampler(rate: int):
    import soxr

    return soxr.ResampleStream(rate, RATE, 1, dtype="float32")


def _to_mono_float(data: np.ndarray) -> np.ndarray:
    """(n, channels) int16 or float PCM -> (n,) float32 mono; int16 scaled by 1/32768 as files are."""
    if data.dtype.kind in "iu":
        if data.dtype != np.int16:
            raise ValueError(f"pcm array has dtype {data.dtype}: expected int16 or float32")
        data = data.astype(np.float32) / 32768.0
    elif data.dtype.kind == "f":
        data = data.astype(np.float32, copy=False)
        if not np.isfinite(data).all():
            raise ValueError("pcm: the audio contains NaN or Inf samples")
        if data.size and float(np.abs(data).max()) > 2.0**31:
            raise ValueError("pcm: float samples must be within [-1, 1] (a magnitude past 2**31 was sent)")
    else:
        raise ValueError(f"pcm array has dtype {data.dtype}: expected int16 or float32")
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else np.ascontiguousarray(data[:, 0])
