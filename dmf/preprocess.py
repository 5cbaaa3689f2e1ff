"""Input preprocessing shared by training and the runtime: audio clips and transcripts to arrays.

Torch-free on purpose (numpy, soundfile, soxr, tokenizers only): the edge runtime imports this
module, and training imports the same functions, so both feed the model identical numbers.

Audio: decode -> mono -> resample to 16 kHz -> first 5 s, zero-padded -> zero mean / unit variance
over the padded clip. This is what `Wav2Vec2FeatureExtractor(do_normalize=True)` gives with
`padding="max_length", truncation=True` and no attention mask
(docs/design.md, 'Inputs'); for an extractor with
`return_attention_mask=True` the statistics are those of the real samples (`normalize_over`).
Text: `tokenizer.json` -> input_ids / attention_mask padded and truncated to `max_tokens`, as a
BERT fast tokenizer called with `padding="max_length", truncation=True` gives.
"""

from __future__ import annotations

import inspect
import io
import os
import stat
import struct
from pathlib import Path
from typing import IO, Iterator, Union

import numpy as np
import soundfile as sf
import soxr
from tokenizers import Tokenizer

from dmf.contract import NORMALIZE_OVER, TOKENIZER_FILE

AudioSource = Union[str, Path, bytes, bytearray, memoryview, IO[bytes], np.ndarray]

NORM_EPS = 1e-7  # the feature extractor's epsilon: keeps silence finite (0 / sqrt(1e-7) = 0)

# Bounds on what one clip may cost to decode (header-checked before any sample is decoded). With
# mono=True and keep_seconds, a decode holds at most keep_seconds x MAX_SAMPLE_RATE float32 samples
# plus one block: (5 s window + 1 s margin) x 384 kHz x 4 B = 9 MiB, plus 4 MiB at 64 channels.
MAX_SAMPLE_RATE = 384_000  # the highest rate audio interfaces record at
MAX_CHANNELS = 64  # more than any recording layout in use (7th-order ambisonics is 64)
DECODE_BLOCK_FRAMES = 16384  # frames per read when down-mixing while decoding
UNKNOWN_FRAMES = 2**62  # libsndfile reports SF_COUNT_MAX frames when a header leaves the length open
# soxr's output for the model's window is bit-identical whether it sees the whole clip or the
# window plus this margin (measured for 1 kHz .. 384 kHz input), so only that much is decoded.
RESAMPLE_MARGIN_S = 1.0
# int32 full scale. Float audio lies within [-1, 1] (int-scaled floats up to this); past it the
# normaliser's float32 variance can overflow, and the model returns NaN or a wrong answer.
MAX_ABS_SAMPLE = 2.0**31


class AudioError(ValueError):
    """Audio that cannot be decoded or used; the one-line message names the source and the problem."""


class AudioRangeError(AudioError):
    """Decodable audio whose samples are unusable: NaN, Inf, or far outside any audio range."""


class TextError(ValueError):
    """A transcript that cannot be used; the one-line message names the field and the problem."""


# --------------------------------------------------------------------------------------------- audio


def source_name(source: object) -> str:
    """How messages name an audio source: its path, "<bytes>", or a file object's name."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


# Container layouts whose sample data sits in one chunk of declared size: libsndfile silently
# shortens such a file when it is cut (it trusts the bytes present over the header), so a cut upload
# would otherwise pass as a shorter clip. magic, form type(s), byte order, the sample-data chunk.
_CONTAINERS = ((b"RIFF", (b"WAVE",), "<", b"data", "WAV"), (b"FORM", (b"AIFF", b"AIFC"), ">", b"SSND", "AIFF"))
# WAV format tags whose bits-per-sample field must be a whole number of bytes (PCM, float, extensible)
_WAV_BYTE_SAMPLES = {1: (8, 16, 24, 32), 3: (32, 64), 0xFFFE: (8, 16, 24, 32, 64)}


def header_problem(fh: IO[bytes]) -> str | None:
    """What is wrong with a WAV, AIFF or MPEG stream's header, or None: cut short (inside a header
    chunk, or before the end its sample chunk declares), 0 Hz or 0 channels (libsndfile says only
    "SF_INFO struct incomplete"), or a bit depth that is not a whole number of bytes (libsndfile
    decodes 7 bits as garbage); or an MPEG stream whose first frame is not followed by another
    (`_mpeg_problem`). Other formats and streaming sizes (0 / 0xFFFFFFFF) are not judged.
    The stream's position is restored."""
    start = fh.tell()
    try:
        end = fh.seek(0, os.SEEK_END)
        fh.seek(start)
        head = fh.read(12)
        for magic, forms, order, data_id, kind in _CONTAINERS:
            if len(head) == 12 and head[:4] == magic and head[8:12] in forms:
                return _chunk_problem(fh, end, order, data_id, kind)
        fh.seek(start)
        return _mpeg_problem(fh)
    finally:
        fh.seek(start)


# MPEG audio frame headers (ISO 11172-3 / 13818-3): kbit/s by (MPEG-1?, layer) and bitrate index,
# sample rates by version. Only used to see that a stream that starts like MPEG continues like it.
_MPEG_KBPS = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mpeg_frame_bytes(header: bytes) -> int | None:
    """The length of the MPEG audio frame whose 4-byte header this is; None if it is not a valid
    header, 0 for free-format frames (no length in the header)."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version, layer = (header[1] >> 3) & 3, 4 - ((header[1] >> 1) & 3)  # layer 4: reserved
    index, rate_index, padding = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if version == 1 or layer == 4 or index == 15 or rate_index == 3:
        return None
    kbps, rate = _MPEG_KBPS[(version == 3, layer)][index], _MPEG_RATES[version][rate_index]
    if kbps == 0:
        return 0
    if layer == 1:
        return (12 * kbps * 1000 // rate + padding) * 4
    per_frame = 144 if layer == 2 or version == 3 else 72
    return per_frame * kbps * 1000 // rate + padding


def _mpeg_problem(fh: IO[bytes]) -> str | None:
    """A stream that starts as MPEG audio (an ID3v2 tag or a frame sync) must have a second frame
    header where the first frame ends. Garbage after a sync word otherwise reaches libsndfile's
    MPEG decoder, which prints resync notes on the process's stderr (a server's log) before
    failing with a message about pipes."""
    head = fh.read(10)
    if head[:3] == b"ID3" and len(head) == 10:  # size: 4 x 7 bits, + a 10-byte footer if flagged
        size = sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
        fh.seek(size + (10 if head[5] & 0x10 else 0), os.SEEK_CUR)
        head = fh.read(4)
    frame = _mpeg_frame_bytes(head[:4])
    if not frame:  # not MPEG here (libsndfile judges it), or free format (no length in the header)
        return None
    fh.seek(fh.tell() - len(head) + frame)
    if _mpeg_frame_bytes(fh.read(4)) is None:
        return "not readable audio (format not recognised: an MPEG frame header is not followed by another)"
    return None


def _chunk_problem(fh: IO[bytes], end: int, order: str, data_id: bytes, kind: str) -> str | None:
    """Walk the chunks after a container's 12-byte head up to its sample-data chunk."""
    while True:
        chunk = fh.read(8)
        if len(chunk) < 8:
            return f"truncated {kind}: no {data_id.decode().strip()} chunk"
        cid, size = chunk[:4], struct.unpack(order + "I", chunk[4:])[0]
        if cid == data_id:
            left = end - fh.tell()
            if size not in (0, 0xFFFFFFFF) and size > left:
                return f"truncated {kind}: {cid.decode()} chunk declares {size} bytes, {left} present"
            return None
        body = fh.read(min(size, 64)) if cid in (b"fmt ", b"COMM") else b""
        if cid in (b"fmt ", b"COMM"):
            problem = (_wav_format_problem if kind == "WAV" else _aiff_format_problem)(body, size)
            if problem:
                return problem
        fh.seek(size + (size & 1) - len(body), os.SEEK_CUR)


def _wav_format_problem(body: bytes, size: int) -> str | None:
    if len(body) < min(size, 16) or size < 16:
        return f"truncated WAV: the fmt chunk has {len(body)} of its {max(size, 16)} bytes"
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
    if channels == 0 or rate == 0:
        return f"WAV header declares {channels} channel(s) at {rate} Hz"
    if tag in _WAV_BYTE_SAMPLES and bits not in _WAV_BYTE_SAMPLES[tag]:
        allowed = ", ".join(map(str, _WAV_BYTE_SAMPLES[tag]))
        return f"WAV header declares {bits} bits per sample: expected {allowed}"
    return None


def _aiff_format_problem(body: bytes, size: int) -> str | None:
    if len(body) < min(size, 18) or size < 18:
        return f"truncated AIFF: the COMM chunk has {len(body)} of its {max(size, 18)} bytes"
    channels, _, bits = struct.unpack(">HIH", body[:8])
    if channels == 0:
        return "AIFF header declares 0 channels"
    if not 1 <= bits <= 32:
        return f"AIFF header declares {bits} bits per sample: expected 1 to 32"
    return None


def _open_path(path: str | Path) -> IO[bytes]:
    """A regular file opened for reading. Anything else is refused before a byte is read: a FIFO
    with no writer blocks soundfile's open while it holds libsndfile's process-wide lock (every
    later decode in the process hangs), and a device such as /dev/zero never ends. The open is
    non-blocking and the type is checked on the opened descriptor, so a path swapped between a
    check and the open cannot slip through."""
    name = str(path)
    if "\0" in name:
        raise AudioError(f"{name!r}: the path contains a NUL character")
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise AudioError(f"{name}: audio file not found") from None
    except OSError as exc:
        raise AudioError(f"{name}: cannot open audio file: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise AudioError(f"{name}: is {what}, not an audio file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def open_binary(source: AudioSource) -> tuple[IO[bytes], bool]:
    """A seekable binary stream for `source` and whether we own (must close) it. Raises
    AudioError for a path that is not a regular file, a closed or text-mode file object, or a
    source of another type."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), True
    if isinstance(source, (str, Path)):
        return _open_path(source), True
    if hasattr(source, "read"):
        return _open_stream(source)
    raise AudioError(f"unsupported audio source type {type(source).__name__}: expected a path, bytes, "
                     "a binary file object or a numpy array")


def _open_stream(source: IO[bytes]) -> tuple[IO[bytes], bool]:
    name = source_name(source)
    try:
        seekable = bool(source.seekable()) if hasattr(source, "seekable") else False
        probe = source.read(0) if seekable else source.read()  # soundfile seeks: buffer the rest
    except ValueError as exc:  # io's "I/O operation on closed file"
        raise AudioError(f"{name}: cannot read the file object: {exc}") from None
    if not isinstance(probe, (bytes, bytearray, memoryview)):
        raise AudioError(f"{name}: the file object's read() returned {type(probe).__name__}, not bytes: "
                         "open it in binary mode ('rb')")
    return (source, False) if seekable else (io.BytesIO(bytes(probe)), True)


def load_audio(source: AudioSource, sample_rate: int | None = None, *, max_seconds: float | None = None,
               keep_seconds: float | None = None, mono: bool = False) -> tuple[np.ndarray, int]:
    """Decode audio. Returns (data, rate): float32 data of shape (frames,) or (frames, channels).

    `source` is a path, bytes, a binary file object, or a numpy array (then `sample_rate` is
    required and the array is returned as float32). Raises AudioError naming the source.
    Bounded work for untrusted input: the sample rate, channel count and length are checked from
    the header before anything is decoded (`max_seconds`: a longer clip is refused there);
    `keep_seconds` decodes only the first that many seconds; `mono` down-mixes (channel mean)
    block by block, so a many-channel file never sits in memory whole. A file whose header leaves
    the length open (streamed FLAC) is read through in blocks, discarding, to check `max_seconds`."""
    if isinstance(source, np.ndarray):
        return _array_audio(source, sample_rate, max_seconds, keep_seconds, mono)
    name = source_name(source)
    fh, owned = open_binary(source)  # AudioError names the source
    try:
        problem = header_problem(fh)
        if problem:
            raise AudioError(problem)
        with sf.SoundFile(fh) as snd:
            data = _decode(snd, max_seconds, keep_seconds, mono)
            rate = snd.samplerate
    except AudioError as exc:
        raise type(exc)(f"{name}: {exc}") from None
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, struct.error) as exc:
        raise AudioError(f"{name}: not readable audio ({libsndfile_words(exc)})") from None
    except MemoryError:
        raise AudioError(f"{name}: too large to decode in memory") from None
    finally:
        if owned:
            fh.close()
    return data, int(rate)


# libsndfile's wording for a header it cannot use, in the user's terms
_LIBSNDFILE_WORDS = {
    "SF_INFO struct incomplete.": "the header declares no usable sample rate or channel count",
    # libsndfile's text for bytes no decoder claims (its MPEG probe) speaks of pipes: not the user's case
    "File does not exist or is not a regular file (possibly a pipe?).": "format not recognised",
    "Format not recognised.": "format not recognised",
}


def libsndfile_words(exc: BaseException) -> str:
    """A decoder exception as the user-facing detail after "not readable audio"."""
    detail = str(exc).split(":")[-1].strip() or type(exc).__name__
    return _LIBSNDFILE_WORDS.get(detail, detail)


def _check_format(rate: int, channels: int, frames: int, max_seconds: float | None) -> None:
    """Refuse what no decoding is needed to refuse: an impossible rate or channel count, or a
    length over `max_seconds` (frames >= UNKNOWN_FRAMES: the header does not say)."""
    if not 0 < rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"sample rate {rate!r} Hz is invalid: expected 1 to {MAX_SAMPLE_RATE}")
    if not 0 < channels <= MAX_CHANNELS:
        raise AudioError(f"{channels} channels: expected 1 to {MAX_CHANNELS}")
    if max_seconds is not None and frames < UNKNOWN_FRAMES and frames / rate > max_seconds:
        raise AudioError(f"audio is {frames / rate:.1f} s long, longer than the {max_seconds} s maximum")


def _decode(snd: sf.SoundFile, max_seconds: float | None, keep_seconds: float | None,
            mono: bool) -> np.ndarray:
    """An open file -> its first `keep_seconds` (all: None), (frames,) if `mono` else (frames, channels)."""
    rate, frames = snd.samplerate, snd.frames
    _check_format(rate, snd.channels, frames, max_seconds)
    keep = None if keep_seconds is None else int(np.ceil(keep_seconds * rate))
    # Reading on past `keep` is only needed to learn a length the header leaves open.
    if frames < UNKNOWN_FRAMES and not mono:  # known length, nothing to mix: one read
        return snd.read(frames if keep is None else min(keep, frames), dtype="float32", always_2d=False)
    limit = int(max_seconds * rate) if max_seconds is not None and frames >= UNKNOWN_FRAMES else None
    parts, kept, seen = [], 0, 0
    for block in _blocks(snd, open_length=frames >= UNKNOWN_FRAMES):
        seen += len(block)
        if limit is not None and seen > limit:
            raise AudioError(f"audio is longer than the {max_seconds} s maximum")
        if keep is None or kept < keep:
            block = block if keep is None else block[:keep - kept]
            parts.append(_to_mono(block) if mono else block)
            kept += len(block)
        elif limit is None:
            break
    channels = () if mono else (snd.channels,)
    data = np.concatenate(parts) if parts else np.zeros((0, *channels), dtype=np.float32)
    return data[:, 0] if data.ndim == 2 and data.shape[1] == 1 else data


def _blocks(snd: sf.SoundFile, open_length: bool) -> Iterator[np.ndarray]:
    """Decoded blocks, (<= DECODE_BLOCK_FRAMES, channels) float32, to the end of the stream."""
    while True:
        if open_length:
            block = _read_open_length(snd, DECODE_BLOCK_FRAMES)
        else:
            block = snd.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)
        if not len(block):
            return
        yield block


def _read_open_length(snd: sf.SoundFile, frames: int) -> np.ndarray:
    """Up to `frames` frames from a stream whose header leaves the length open. soundfile's read
    seeks to the new position after each read, which libsndfile refuses at the end of such a
    stream (streamed FLAC) after the last, partial block was decoded: that block would be lost
    (1.5 s read as 1.024 s). So libsndfile's read is called directly, and only its own error counts."""
    out = np.empty((frames, snd.channels), dtype=np.float32)
    read = sf._snd.sf_readf_float(snd._file, sf._ffi.cast("float *", out.ctypes.data), frames)
    if sf._snd.sf_error(snd._file):
        raise sf.LibsndfileError(sf._snd.sf_error(snd._file), "decoding failed: ")
    return out[:read]


def _array_audio(data: np.ndarray, sample_rate: int | None, max_seconds: float | None,
                 keep_seconds: float | None, mono: bool) -> tuple[np.ndarray, int]:
    """load_audio for an array: the same format checks as a file header gets, then crop and mix."""
    if sample_rate is None:
        raise AudioError("sample_rate is required when audio is given as a numpy array")
    rate = int(sample_rate)
    if data.ndim not in (1, 2):
        raise AudioError(f"audio array has shape {data.shape}: expected (frames,) or (frames, channels)")
    if data.ndim == 2 and data.shape[1] > MAX_CHANNELS >= data.shape[0]:
        raise AudioError(f"audio array has shape {data.shape}: channel-first? expected (frames, channels), "
                         "e.g. pass data.T")
    _check_format(rate, data.shape[1] if data.ndim == 2 else 1, data.shape[0], max_seconds)
    if keep_seconds is not None:
        data = data[:int(np.ceil(keep_seconds * rate))]
    return (_to_mono(data) if mono else _as_float32(data)), rate


def _as_float32(data: np.ndarray) -> np.ndarray:
    """Integer PCM is scaled to [-1, 1) as soundfile would; floats are cast. Unsigned PCM (8-bit
    WAV's layout) is offset-binary: its midpoint is silence."""
    if np.issubdtype(data.dtype, np.unsignedinteger):
        mid = float(np.iinfo(data.dtype).max // 2 + 1)
        return ((data.astype(np.float64) - mid) / mid).astype(np.float32)
    if np.issubdtype(data.dtype, np.integer):
        return (data.astype(np.float64) / -float(np.iinfo(data.dtype).min)).astype(np.float32)
    if not np.issubdtype(data.dtype, np.floating):
        raise AudioError(f"audio array has dtype {data.dtype}: expected float or integer PCM")
    return data.astype(np.float32, copy=False)


def _check_samples(data: np.ndarray) -> None:
    """NaN, Inf and magnitudes past MAX_ABS_SAMPLE are refused (before any mixing, which could
    itself overflow): the model would return NaN, or a silent wrong answer, for them."""
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        raise AudioRangeError(f"audio contains {'NaN' if np.isnan(data).any() else 'Inf'} samples")
    peak = float(np.abs(data).max())
    if peak > MAX_ABS_SAMPLE:
        raise AudioRangeError(f"audio has a sample of magnitude {peak:.3g}: expected at most "
                              f"{MAX_ABS_SAMPLE:.3g} (float audio is normally within [-1, 1])")


def _to_mono(data: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) by the mean over channels; samples checked."""
    data = _as_float32(np.asarray(data))
    if data.ndim not in (1, 2):
        raise AudioError(f"audio array has shape {data.shape}: expected (frames,) or (frames, channels)")
    _check_samples(data)
    if data.ndim == 2:
        return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return data


def _check_audio(mono: np.ndarray, sample_rate: int, min_seconds: float, max_seconds: float | None) -> None:
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(f"sample rate {sample_rate!r} is invalid: expected a positive integer")
    if mono.size == 0:
        raise AudioError("audio is empty (0 samples)")
    seconds = mono.size / sample_rate
    if seconds < min_seconds:
        raise AudioError(f"audio is {seconds:.3f} s long, shorter than the {min_seconds} s minimum")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"audio is {seconds:.1f} s long, longer than the {max_seconds} s maximum")


def normalize_audio(x: np.ndarray, eps: float = NORM_EPS, length: int | None = None) -> np.ndarray:
    """Zero mean, unit variance, as Wav2Vec2FeatureExtractor(do_normalize=True) does: over the whole
    (padded) clip, or, given `length` (an extractor with return_attention_mask), over the first
    `length` samples with the padding after them left at zero. Same expressions as transformers',
    so the result is bit-equal (the runtime passes the eps its artifact's dmf.json records)."""
    if length is None or length >= x.shape[0]:
        return ((x - x.mean()) / np.sqrt(x.var() + eps)).astype(np.float32)
    out = np.zeros_like(x, dtype=np.float32)
    real = x[:length]
    out[:length] = (real - real.mean()) / np.sqrt(real.var() + eps)
    return out


def prepare_audio(data: np.ndarray, sample_rate: int, *, target_rate: int = 16000, num_samples: int = 80000,
                  normalize: bool = True, normalize_over: str = "all", eps: float = NORM_EPS,
                  min_seconds: float = 0.1, max_seconds: float | None = None) -> np.ndarray:
    """Decoded audio (frames,) or (frames, channels) -> model input of shape (num_samples,) float32.

    Mono down-mix, resample to `target_rate` (soxr), keep the first `num_samples`, zero-pad at
    the end, then (if `normalize`) zero mean / unit variance over `normalize_over`: "all" (the
    padded clip) or "real_samples" (the samples before the padding; the padding stays zero)."""
    if normalize_over not in NORMALIZE_OVER:
        raise ValueError(f"normalize_over {normalize_over!r} is invalid: expected one of {NORMALIZE_OVER}")
    mono = _to_mono(data)
    _check_audio(mono, sample_rate, min_seconds, max_seconds)
    if sample_rate != target_rate:
        mono = soxr.resample(mono, sample_rate, target_rate).astype(np.float32, copy=False)
    out = np.zeros(num_samples, dtype=np.float32)
    keep = min(num_samples, mono.shape[0])
    out[:keep] = mono[:keep]
    if not normalize:
        return out
    return normalize_audio(out, eps, keep if normalize_over == "real_samples" else None)


def preprocess_audio(source: AudioSource, sample_rate: int | None = None, **prepare_kwargs) -> np.ndarray:
    """load_audio + prepare_audio: any source -> (num_samples,) float32. Errors name the source.
    Decodes only what the model reads (its window plus RESAMPLE_MARGIN_S, or min_seconds if longer),
    mixing to mono as it goes, and refuses a clip over max_seconds from its header."""
    opts = {k: prepare_kwargs.get(k, _PREPARE_DEFAULTS[k])
            for k in ("target_rate", "num_samples", "min_seconds", "max_seconds")}
    keep = max(opts["num_samples"] / opts["target_rate"] + RESAMPLE_MARGIN_S, opts["min_seconds"])
    data, rate = load_audio(source, sample_rate, max_seconds=opts["max_seconds"], keep_seconds=keep, mono=True)
    try:
        return prepare_audio(data, rate, **prepare_kwargs)
    except AudioError as exc:
        if isinstance(source, np.ndarray):
            raise
        raise type(exc)(f"{source_name(source)}: {exc}") from None


# prepare_audio's defaults also set how much preprocess_audio decodes
_PREPARE_DEFAULTS = {k: p.default for k, p in inspect.signature(prepare_audio).parameters.items()}


def check_seconds(name: str, value: object, *, allow_zero: bool = False, allow_none: bool = False) -> float | None:
    """A duration option as a float, or ValueError naming the option and value: a finite number
    of seconds, > 0 (>= 0 with allow_zero); None only with allow_none (no limit). NaN is refused
    because every comparison with it is false, which would switch a limit off silently."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} = {value!r} is invalid: expected a finite number of seconds {bound}"
                         + (" (or None: no limit)" if allow_none else ""))
    return float(value)


# ---------------------------------------------------------------------------------------------- text


def validate_text(text: object, *, field: str = "text", max_chars: int = 2000) -> str:
    """A usable transcript or TextError. Bytes must be UTF-8. Text longer than `max_chars` is cut
    (only `max_tokens` tokens are used anyway, and it bounds tokenisation time)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise TextError(f"{field}: text is not valid UTF-8") from None
    if not isinstance(text, str):
        raise TextError(f"{field}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise TextError(f"{field}: text is empty")
    text = text[:max_chars]
    try:
        text.encode("utf-8")  # a lone surrogate (a JSON "\ud800" escape) is no Unicode text
    except UnicodeEncodeError as exc:
        raise TextError(f"{field}: text contains a lone surrogate (U+{ord(text[exc.start]):04X}) at "
                        f"character {exc.start}: not valid Unicode") from None
    return text


def _find_pad(tokenizer: Tokenizer) -> tuple[int, str]:
    padding = tokenizer.padding
    if padding and padding.get("pad_token") is not None:
        return int(padding["pad_id"]), str(padding["pad_token"])
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        raise TextError("tokenizer has no pad token: no '[PAD]' in its vocabulary and no padding config")
    return pad_id, "[PAD]"


class TextEncoder:
    """Transcripts -> (input_ids, attention_mask), each int64 (B, max_tokens), from a tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int = 30, *, max_chars: int = 2000) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens = {max_tokens} is invalid: expected an integer >= 1")
        # A private copy: enabling padding/truncation must not change the caller's tokenizer.
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self.pad_id, self.pad_token = _find_pad(self.tokenizer)
        # The same settings transformers' fast tokenizer applies for padding="max_length", truncation=True.
        self.tokenizer.enable_truncation(max_length=max_tokens, stride=0, strategy="longest_first",
                                         direction="right")
        self.tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_type_id=0,
                                      pad_token=self.pad_token, length=max_tokens)

    @classmethod
    def from_file(cls, path: str | Path, max_tokens: int = 30, **kwargs) -> "TextEncoder":
        """Load a `tokenizer.json` (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for missing/malformed files
            raise ValueError(f"{path}: cannot load tokenizer: {str(exc).splitlines()[0]}") from None
        return cls(tokenizer, max_tokens, **kwargs)

    def encode(self, texts: list[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """A batch of B transcripts (a single str is a batch of one) -> input_ids, attention_mask,
        each int64 of shape (B, max_tokens). Raises TextError naming the bad item."""
        if isinstance(texts, (str, bytes, bytearray)):
            texts = [texts]
        clean = [validate_text(t, field=f"text[{i}]", max_chars=self.max_chars) for i, t in enumerate(texts)]
        if not clean:
            raise TextError("texts: the batch is empty")
        encodings = self.tokenizer.encode_batch(clean)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask
