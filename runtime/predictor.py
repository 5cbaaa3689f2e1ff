"""`Predictor`: artifact folder -> predictions. Pre- and post-processing are written once, here;
the engines only turn named arrays into log-probs.

Preprocessing is `dmf.preprocess` with every parameter taken from dmf.json (sample rate, input
samples, normalisation, token count) and the artifact's tokenizer.json. Torch-free.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import soundfile as sf

from dmf.preprocess import (AudioError, TextEncoder, TextError, check_seconds, header_problem, open_binary,
                            preprocess_audio, validate_text)

from dmf.contract import AUDIO_INPUT, IDS_INPUT, MASK_INPUT
from dmf.contract import MAX_CLIP_SECONDS as DEFAULT_MAX_SECONDS
from dmf.contract import MAX_TEXT_CHARS as DEFAULT_MAX_TEXT_CHARS
from dmf.contract import MIN_CLIP_SECONDS as DEFAULT_MIN_SECONDS
from dmf.errors import first_line

from .artifact import Artifact, ArtifactError, check_log_probs, load_artifact
from .conversation import predict_conversation, read_transcript
from .engine import Engine, EngineError
from .engines import create_engine
from .prediction import Prediction


class InputError(ValueError):
    """A request that is malformed as a whole (wrong item shape, missing field)."""


class ResultError(ValueError):
    """The model's scores for this input are not finite (NaN or Inf): refused, never reported as a
    label. Inputs are checked first, so this means an input the model cannot score."""


INPUT_ERRORS = (AudioError, TextError, InputError, ResultError)
"""Everything a bad request can raise: the caller's fault, never the model's."""


class Predictor:
    """Load with `Predictor.load(artifact_dir)`; thread-safe (preprocessing is stateless, the ORT
    session is thread-safe and the TensorRT engine serialises its calls)."""

    def __init__(self, artifact: Artifact, engine: Engine, *, min_clip_seconds: float = DEFAULT_MIN_SECONDS,
                 max_clip_seconds: float | None = DEFAULT_MAX_SECONDS,
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> None:
        self.artifact = artifact
        self.engine = engine
        self.labels: tuple[str, ...] = artifact.labels
        self.label_names: dict[str, str] = dict(zip(artifact.labels, artifact.label_names))
        self.min_clip_seconds, self.max_clip_seconds, self.max_text_chars = _check_limits(min_clip_seconds, max_clip_seconds,
                                                                                max_text_chars)
        limits = [artifact.max_batch] + ([engine.max_batch] if engine.max_batch else [])
        self.max_batch = min(limits)
        self.text_encoder = None
        if artifact.uses_text:
            try:
                self.text_encoder = TextEncoder.from_file(artifact.tokenizer_path, artifact.max_tokens,
                                                          max_chars=max_text_chars)
            except (ValueError, TextError) as exc:
                raise ArtifactError(str(exc)) from None
        try:
            self._warm_up()
        except ArtifactError:
            engine.close()
            raise

    def _warm_up(self) -> None:
        """One batch-1 inference on zeros (mask ones) before the predictor is used, so an artifact
        whose model does not match its dmf.json (shapes, labels) fails at load, not at the first
        request, and the first request does not pay the engine's lazy initialisation."""
        a = self.artifact
        try:
            batch = {s.name: (np.ones if s.name == MASK_INPUT else np.zeros)((1, s.shape[1]), dtype=np.dtype(s.dtype))
                     for s in a.inputs}  # (1, input_samples) audio, (1, max_tokens) ids and mask
            out = np.asarray(self.engine.infer(batch))
        except Exception as exc:  # EngineError or a backend's own exception type
            raise ArtifactError(f"{a.path}: warm-up inference failed: {first_line(exc)}") from None
        expected = (1, len(self.labels))
        if out.shape != expected:
            raise ArtifactError(f"{a.path}: the model returns shape {out.shape} for one input: dmf.json "
                                f"'labels' says {expected}")
        if not np.isfinite(out).all():
            raise ArtifactError(f"{a.path}: the model returns non-finite scores for a silent input")
        check_log_probs(out, a.path)  # #22: zeros or logits instead of log-probs would answer uniform or wrong labels

    @classmethod
    def load(cls, artifact_dir: str | Path, engine: str = "auto", providers: str | Sequence[str] | None = None,
             threads: int | None = None, *, verify: bool = True, min_clip_seconds: float = DEFAULT_MIN_SECONDS,
             max_clip_seconds: float | None = DEFAULT_MAX_SECONDS,
             max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> "Predictor":
        """Validate the artifact (dmf.json, files, sha256) and open its engine.

        engine: "auto" (the fastest engine the artifact, the installed packages and this CPU allow,
        without lowering the artifact's verified precision: `engines.choose_engine`), "onnx"
        (onnxruntime), "openvino" (OpenVINO CPU) or "trt" (native TensorRT plan).
        providers: onnxruntime execution providers ("cpu", "cuda", "tensorrt" or full names);
        None picks CUDA when available, then CPU. threads: onnxruntime intra-op threads.
        min_clip_seconds / max_clip_seconds: the accepted clip length (before cropping to the model's input;
        finite seconds, max_clip_seconds None: no limit); max_text_chars: longer text is cut.
        A bad limit raises ValueError before anything is loaded."""
        _check_limits(min_clip_seconds, max_clip_seconds, max_text_chars)
        artifact = load_artifact(artifact_dir, verify=verify)
        return cls(artifact, create_engine(artifact, engine, providers, threads),
                   min_clip_seconds=min_clip_seconds, max_clip_seconds=max_clip_seconds, max_text_chars=max_text_chars)

    def running(self) -> dict[str, Any]:
        """Which engine runs this predictor ("engine" = what `auto` picked) and on what."""
        return {"running_engine": self.engine.name, "providers": list(self.engine.providers)}

    # ------------------------------------------------------------------------------ steps
    def preprocess(self, audio: Any, text: Any, sample_rate: int | None = None, *,
                   min_clip_seconds: float | None = None, max_clip_seconds: float | None = None) -> dict[str, np.ndarray]:
        """One request -> its model inputs, unbatched: audio (S,), input_ids (L,), attention_mask (L,).
        Raises AudioError / TextError with a one-line message. A modality the model does not use
        is ignored (may be None). min_clip_seconds / max_clip_seconds override the predictor's limits."""
        a = self.artifact
        arrays: dict[str, np.ndarray] = {}
        if a.uses_text:
            if text is None:
                raise TextError("text: missing (this model needs a transcript)")
            clean = validate_text(text, field="text", max_chars=self.max_text_chars)
            ids, mask = self.text_encoder.encode([clean])
            arrays[IDS_INPUT], arrays[MASK_INPUT] = ids[0], mask[0]
        if a.uses_audio:
            if audio is None:
                raise AudioError("audio: missing (this model needs an audio clip)")
            if isinstance(sample_rate, bool) or (sample_rate is not None and not isinstance(sample_rate, (int, np.integer))):
                raise AudioError(f"sample_rate {sample_rate!r} is invalid: expected a positive integer")
            _check_not_empty(audio)
            arrays[AUDIO_INPUT] = preprocess_audio(
                audio, sample_rate, target_rate=a.sample_rate, num_samples=a.input_samples,
                normalize=a.do_normalize, normalize_over=a.normalize_over, eps=a.eps,  # dmf.json "normalisation"
                min_seconds=self.min_clip_seconds if min_clip_seconds is None else min_clip_seconds,
                max_seconds=self.max_clip_seconds if max_clip_seconds is None else max_clip_seconds)
        return arrays

    def infer(self, items: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Preprocessed items -> (B, C) log-probs; batches larger than max_batch are split."""
        if not items:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        outs = []
        for start in range(0, len(items), self.max_batch):
            chunk = items[start:start + self.max_batch]
            batch = {name: np.stack([it[name] for it in chunk]) for name in self.artifact.input_names}
            try:
                out = self.engine.infer(batch)
            except EngineError:
                raise
            except Exception as exc:  # backend-specific exception types
                raise EngineError(f"inference failed: {first_line(exc)}") from None
            if out.shape != (len(chunk), len(self.labels)):
                raise EngineError(f"model returned shape {out.shape}: expected ({len(chunk)}, {len(self.labels)})")
            outs.append(out)
        return np.concatenate(outs, axis=0)

    def postprocess(self, log_probs: np.ndarray) -> Prediction:
        """One row of log-probs -> Prediction (probabilities renormalised in float64).
        Raises ResultError for a row that is not finite."""
        row = np.asarray(log_probs, dtype=np.float64)
        if not np.isfinite(row).all():
            raise ResultError("the model's scores for this input are not finite (NaN or Inf); "
                              "no label is given for it")
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        return Prediction(label=self.labels[int(np.argmax(row))],
                          probabilities={lab: float(p) for lab, p in zip(self.labels, probs)},
                          log_probs=tuple(float(v) for v in row), names=self.label_names)

    # ------------------------------------------------------------------------------ API
    def predict(self, audio: Any, text: Any, sample_rate: int | None = None) -> Prediction:
        """audio: a path, bytes, a binary file object, or a float numpy array (then `sample_rate`
        is required); text: the transcript (str, or UTF-8 bytes)."""
        truncated = self.is_truncated(audio, sample_rate)  # before decoding moves a stream's position
        arrays = self.preprocess(audio, text, sample_rate)
        return replace(self.postprocess(self.infer([arrays])[0]), truncated=truncated)

    def is_truncated(self, audio: Any, sample_rate: int | None = None) -> bool:
        """Whether a clip is longer than the model's window, from the array's length or the file's
        header (no decoding; a stream is read from its current position, which is restored).
        False for a text-only model and for audio `preprocess` will refuse anyway."""
        if not self.artifact.uses_audio:
            return False
        return clip_seconds(audio, sample_rate) > self.artifact.input_samples / self.artifact.sample_rate

    def predict_conversation(self, audio: Any, segments: Any, *, policy: str = "first", **options: Any):
        """A long recording (path, bytes or seekable file) and its transcript segments (a list of
        `conversation.Segment`, or a transcript file path) -> `conversation.Conversation`: one
        prediction per segment and a per-speaker summary. `options`: see
        `conversation.predict_conversation` (max_recording_seconds, progress, name)."""
        if isinstance(segments, (str, Path)):
            options.setdefault("name", str(segments))
            segments = read_transcript(segments)
        return predict_conversation(self, audio, segments, policy=policy, **options)

    def predict_batch(self, items: Iterable[Any]) -> list[Prediction]:
        """items: (audio, text), (audio, text, sample_rate) or {"audio", "text", "sample_rate"?}.
        A bad item raises its AudioError / TextError / InputError prefixed with `items[i]`;
        nothing is run then."""
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise InputError(f"items: expected a list of (audio, text) items, got {type(items).__name__}")
        arrays, truncated = [], []
        for i, item in enumerate(items):
            audio, text, rate = unpack_item(item, where=f"items[{i}]")
            truncated.append(self.is_truncated(audio, rate))
            try:
                arrays.append(self.preprocess(audio, text, rate))
            except INPUT_ERRORS as exc:
                raise type(exc)(f"items[{i}]: {exc}") from None
        preds = []
        for i, row in enumerate(self.infer(arrays)):
            try:
                preds.append(replace(self.postprocess(row), truncated=truncated[i]))
            except ResultError as exc:
                raise ResultError(f"items[{i}]: {exc}") from None
        return preds

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Predictor({str(self.artifact.path)!r}, engine={self.engine.name!r}, "
                f"providers={self.engine.providers}, labels={list(self.labels)})")


def _check_limits(min_clip_seconds: Any, max_clip_seconds: Any, max_text_chars: Any) -> tuple[float, float | None, int]:
    """The predictor's input limits, or ValueError naming the bad one: a limit that cannot hold
    (negative, zero, NaN) would refuse every input, or accept any."""
    low = check_seconds("min_clip_seconds", min_clip_seconds, allow_zero=True)
    high = check_seconds("max_clip_seconds", max_clip_seconds, allow_none=True)
    if high is not None and high < low:
        raise ValueError(f"max_clip_seconds = {max_clip_seconds!r} is below min_clip_seconds = {min_clip_seconds!r}: no clip could pass")
    if isinstance(max_text_chars, bool) or not isinstance(max_text_chars, (int, np.integer)) or max_text_chars < 1:
        raise ValueError(f"max_text_chars = {max_text_chars!r} is invalid: expected an integer >= 1")
    return low, high, int(max_text_chars)


def clip_seconds(audio: Any, sample_rate: int | None = None) -> float:
    """A clip's length in seconds from its array shape or its file header (nothing decoded);
    a header that leaves the length open (streamed FLAC) counts as long. 0.0 for what cannot be
    measured without consuming it (a non-seekable stream) or is no readable audio (preprocess
    reports that with its own message)."""
    try:
        if isinstance(audio, np.ndarray):
            return audio.shape[0] / sample_rate if audio.ndim else 0.0
        if isinstance(audio, (bytes, bytearray, memoryview)):
            audio = io.BytesIO(bytes(audio))
        if not hasattr(audio, "read"):
            with open_binary(audio)[0] as fh:  # a path: a regular file only (a FIFO would block)
                return _header_seconds(fh)
        if not (hasattr(audio, "seekable") and audio.seekable()):
            return 0.0
        start = audio.tell()
        try:
            return _header_seconds(audio)
        finally:
            audio.seek(start)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError, ZeroDivisionError):
        return 0.0  # AudioError (a ValueError) included: preprocess reports it


def _header_seconds(fh: Any) -> float:
    """0.0 for a header `preprocess` will refuse: libsndfile is not shown what the header checks
    catch (a cut AIFF makes it seek before the start; MPEG garbage makes its decoder print on stderr)."""
    if header_problem(fh):
        return 0.0
    with sf.SoundFile(fh) as snd:
        return snd.frames / snd.samplerate


def _check_not_empty(audio: Any) -> None:
    """A clearer message than the decoder's for a 0-byte upload or file."""
    if isinstance(audio, (bytes, bytearray, memoryview)) and len(audio) == 0:
        raise AudioError("<bytes>: audio is empty (0 bytes)")
    if isinstance(audio, (str, Path)):
        try:
            if Path(audio).is_file() and Path(audio).stat().st_size == 0:  # FIFOs and devices: load_audio
                raise AudioError(f"{audio}: audio file is empty (0 bytes)")
        except (OSError, ValueError):
            pass  # load_audio reports missing, unreadable and NUL-holding paths
    if isinstance(audio, io.BytesIO) and not audio.closed and audio.getbuffer().nbytes == 0:
        raise AudioError(f"{getattr(audio, 'name', '<stream>')}: audio is empty (0 bytes)")


def unpack_item(item: Any, where: str = "item") -> tuple[Any, Any, int | None]:
    """(audio, text), (audio, text, sample_rate) or a mapping -> (audio, text, sample_rate)."""
    if isinstance(item, Mapping):
        unknown = set(item) - {"audio", "text", "sample_rate", "id"}
        if unknown:
            raise InputError(f"{where}: unknown key(s) {sorted(unknown)}: expected audio, text, sample_rate")
        if "audio" not in item and "text" not in item:
            raise InputError(f"{where}: expected keys 'audio' and 'text'")
        return item.get("audio"), item.get("text"), item.get("sample_rate")
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], (item[2] if len(item) == 3 else None)
    raise InputError(f"{where}: expected (audio, text), (audio, text, sample_rate) or a dict, "
                     f"got {type(item).__name__}")
