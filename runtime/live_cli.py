"""`dmf listen ARTIFACT`: emotions while people speak, from a microphone (`--mic`) or a file fed as a
stream (`--audio FILE`, at real-time pace with `--realtime`), shown as a live table of the turns.

Options are parsed here; the work is `dmf.runtime.live.LiveSession`. Errors print one red
`error: ...` line on stderr and exit with status 2 (`dmf.cliutil.fail`).

`--out events.jsonl`: every event (speech_started and utterance), one JSON object a line, written
atomically when the stream ends (end of the file, `--seconds`, or Ctrl-C): a reader never sees half
a file; a process killed outright writes nothing.
"""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import typer

from dmf import install_hint
from dmf.cliutil import console, fail

CHUNK_MS = 20.0  # PCM per feed: what a microphone callback or a browser worklet delivers
SHOWN_TURNS = 12  # rows of the live table (the latest turns)


def listen(
    artifact: Path = typer.Argument(..., help="Exported artifact folder."),
    mic: bool = typer.Option(False, "--mic", help="Listen to the default microphone (sounddevice; the mic extra)."),
    audio: Optional[Path] = typer.Option(None, help="Stream this audio file instead of a microphone."),
    realtime: bool = typer.Option(False, "--realtime", help="--audio: feed the file at real-time pace "
                                  "(default: as fast as it is taken)."),
    transcript: Optional[Path] = typer.Option(None, help="Texts (VTT/SRT/JSON): each utterance takes the text "
                                              "of the segments it overlaps."),
    out: Optional[Path] = typer.Option(None, help="Write every event as JSONL here when the stream ends."),
    seconds: Optional[float] = typer.Option(None, help="Stop after this many seconds of audio."),
    engine: str = typer.Option("auto", help="auto | onnx | openvino | trt."),
    threads: Optional[int] = typer.Option(None, help="Engine intra-op threads."),
    threshold: float = typer.Option(0.5, help="VAD: a 30 ms frame is speech at this probability or more."),
    min_speech: float = typer.Option(0.25, help="VAD: shorter speech (s) is dropped."),
    min_silence: float = typer.Option(0.25, help="VAD: this much silence (s) ends an utterance."),
    pad: float = typer.Option(0.1, help="VAD: audio (s) kept before the speech."),
    end_pad: float = typer.Option(0.03, help="VAD: audio (s) kept after the speech."),
    max_utterance: Optional[float] = typer.Option(None, help="Speech is cut at this length (s). "
                                                  "[default: the model's window]"),
    aggressiveness: int = typer.Option(2, help="webrtcvad mode, 0 (keeps most) .. 3 (drops most non-speech)."),
    empty_text: str = typer.Option("placeholder", help="An utterance without text: placeholder (scored with "
                                   "--placeholder) or skip (no label)."),
    placeholder: str = typer.Option("...", help="The text an utterance without one is scored with."),
) -> None:
    """Score each utterance of a live stream as it ends: label, probabilities, times, text."""
    if mic == (audio is not None):
        fail("give --mic or --audio FILE (one of the two)")
    if realtime and mic:
        fail("--realtime goes with --audio (a microphone is real time already)")
    if seconds is not None and not seconds > 0:
        fail(f"--seconds {seconds!r} is invalid: expected a number > 0")
    text_span = _transcript(transcript) if transcript else None
    predictor = _load(artifact, engine, threads)
    window = predictor.artifact.input_samples / predictor.artifact.sample_rate
    from .live import LiveOptions

    try:
        options = LiveOptions(threshold=threshold, min_speech_s=min_speech, min_silence_s=min_silence,
                              speech_pad_s=pad, end_pad_s=end_pad,
                              max_utterance_s=window if max_utterance is None else max_utterance,
                              aggressiveness=aggressiveness, empty_text=empty_text, placeholder_text=placeholder)
    except ValueError as exc:
        fail(exc)
    source = _mic_source() if mic else _file_source(audio, realtime)
    events = _run(predictor, source, options, text_span, seconds)
    if out:
        from dmf.fileio import atomic_write_text

        atomic_write_text(out, "".join(json.dumps(e.to_dict()) + "\n" for e in events))
        console().print(f"wrote {len(events)} events to {out}", markup=False)


def _load(artifact: Path, engine: str, threads: Optional[int]):
    from .artifact import ArtifactError
    from .engine import EngineError
    from .predictor import Predictor

    try:
        return Predictor.load(artifact, engine=engine, threads=threads)
    except (ArtifactError, EngineError, ValueError) as exc:
        fail(exc)


def _transcript(path: Path) -> Callable[[float, float], Optional[str]]:
    from .conversation import TranscriptError, read_transcript
    from .live import transcript_text

    try:
        return transcript_text(read_transcript(path))
    except TranscriptError as exc:
        fail(exc)


# ------------------------------------------------------------------------------------ sources

class _Source:
    """A stream's format and its chunks: (n, channels) float32 or int16 arrays."""

    def __init__(self, stream, chunks: Iterator[np.ndarray], name: str) -> None:
        self.stream, self.chunks, self.name = stream, chunks, name


def _file_source(path: Path, realtime: bool) -> _Source:
    """Chunks of the file, decoded block by block (never whole); paced to real time if asked."""
    import soundfile as sf

    from dmf.preprocess import AudioError, open_binary

    from .live import StreamFormat

    try:
        fh, _ = open_binary(path)
        snd = sf.SoundFile(fh)
    except AudioError as exc:
        fail(exc)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        fail(f"{path}: not readable audio ({' '.join(str(exc).split())})")
    block = max(1, int(snd.samplerate * CHUNK_MS / 1000))

    def chunks() -> Iterator[np.ndarray]:
        start, fed = time.monotonic(), 0
        with snd, fh:
            while True:
                data = snd.read(block, dtype="float32", always_2d=True)
                if not len(data):
                    return
                if realtime:  # against the clock, not per sleep: no drift over a long file
                    time.sleep(max(0.0, start + fed / snd.samplerate - time.monotonic()))
                fed += len(data)
                yield data

    return _Source(StreamFormat(snd.samplerate, snd.channels, "float32"), chunks(), str(path))


def _mic_source() -> _Source:
    """The default input device at 16 kHz mono int16, through sounddevice's callback stream."""
    try:
        import sounddevice as sd
    except ImportError:
        fail(f"--mic needs sounddevice: {install_hint('mic')}")
    except OSError as exc:  # sounddevice raises OSError when the PortAudio library is missing
        fail(f"--mic needs the PortAudio library (Debian: apt-get install libportaudio2): {exc}")
    from .live import RATE, StreamFormat

    blocks: queue.Queue = queue.Queue(maxsize=500)  # 10 s of 20 ms blocks: a stalled scorer drops, never grows

    def callback(indata, frames, when, status) -> None:
        try:
            blocks.put_nowait(indata.copy())
        except queue.Full:
            pass

    def chunks() -> Iterator[np.ndarray]:
        try:
            with sd.InputStream(samplerate=RATE, channels=1, dtype="int16", callback=callback,
                                blocksize=int(RATE * CHUNK_MS / 1000)):
                while True:
                    yield blocks.get()
        except sd.PortAudioError as exc:
            fail(f"--mic: {' '.join(str(exc).split())}")

    return _Source(StreamFormat(RATE, 1, "int16"), chunks(), "microphone")


# ---------------------------------------------------------------------------------------- run

def _run(predictor, source: _Source, options, text_span, seconds: Optional[float]) -> list:
    """Feed the source through a session, showing the turns; stops at the end, --seconds or Ctrl-C."""
    from rich.live import Live

    from .live import LiveSession

    try:
        session = LiveSession(lambda a, t: predictor.predict(a, t, 16000), source.stream, options,
                              text_span=text_span)
    except ImportError as exc:  # webrtcvad: the live extra
        fail(exc)
    events: list = []
    fed, rate = 0, source.stream.sample_rate
    with Live(_table(events, source.name), console=console(stderr=False), refresh_per_second=4) as view:
        try:
            for chunk in source.chunks:
                if seconds is not None:  # the chunk that reaches --seconds is the last one asked for
                    chunk = chunk[:max(0, int(round(seconds * rate)) - fed)]
                fed += len(chunk)
                _add(events, session.feed(chunk), view, source.name)
                if seconds is not None and fed >= round(seconds * rate):
                    break
        except KeyboardInterrupt:
            pass
        except ValueError as exc:
            fail(exc)
        _add(events, session.finish(), view, source.name)
    if not view.console.is_terminal:  # the last render ends without a newline off a terminal
        view.console.line()
    return events


def _add(events: list, new: list, view, name: str) -> None:
    if new:
        events += new
        view.update(_table(events, name))


def _table(events: list, name: str):
    from rich.table import Table

    from .cli import printable

    turns = [e for e in events if e.kind == "utterance"]
    open_ = [e for e in events if e.kind == "speech_started"][len(turns):]
    table = Table(title=f"dmf listen: {printable(name)} ({len(turns)} utterances)", title_justify="left")
    for col in ("id", "start", "end", "label", "p", "text"):
        table.add_column(col, justify="right" if col in ("id", "start", "end", "p") else "left")
    for e in turns[-SHOWN_TURNS:]:
        p = f"{e.probabilities[e.label]:.2f}" if e.label else ""
        label = (e.label or f"- ({e.error})") + (" (cut)" if e.cut else "")
        table.add_row(str(e.utterance_id), f"{e.start_s:.2f}", f"{e.end_s:.2f}", printable(label), p,
                      printable(e.text or ""))
    for e in open_:
        table.add_row(str(e.utterance_id), f"{e.start_s:.2f}", "...", "speaking", "", "")
    return table


def register(app: typer.Typer) -> None:
    app.command("listen")(listen)
