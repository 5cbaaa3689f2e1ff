"""Verification of an exported graph against the torch eval model, on fixed seeded inputs.

The inputs look like real ones: audio is random noise at a random loudness, zero-padded after a
random length, then normalised exactly as `dmf.preprocess` does; token ids are random ids inside
the tokenizer's vocabulary framed by [CLS] ... [SEP] and padded, with the matching attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmf.contract import AUDIO_INPUT, IDS_INPUT, INPUT_DTYPES, INPUT_NAMES, MASK_INPUT

FP32_ATOL = 3e-4  # docs/design.md, "Export checks": max abs diff of log-probs, ONNX fp32 vs torch eval fp32
# (a trained paper-width model measured 1.0e-4 on an AVX2 CPU: summation order over 768-wide layers)
# The accuracy gate of every reduced precision (fp16, bf16, int8; onnx, openvino, trt), on real clips
# the model was neither trained nor calibrated on (docs/design.md, "The accuracy gate"):
MIN_AGREEMENT = 0.99  # argmax agreement with the fp32 graph over the decided clips ...
NEAR_TIE_MARGIN = 0.02  # ... a clip whose fp32 top-2 probabilities are closer than this is a near-tie:
#   its flips are reported apart and not held against the export (bf16 alone flips such clips)
MAX_UA_DROP = 0.01  # UA on the held-out session at most 1 point below fp32's (near-ties judged as fp32)
MIN_GATE_CLIPS = 100  # fewer clips cannot resolve a 99 % bar (one flip of 80 is 98.75 %): refused
# On the few synthetic verify inputs (noise; a random-init model's log-probs are nearly flat) a reduced
# precision may flip near-ties; this only catches a broken graph (which lands near chance, 1/num_labels).
MIN_VERIFY_AGREEMENT = 0.75
VERIFY_SEED = 1234


@dataclass
class Parity:
    samples: int
    max_abs_diff: float
    argmax_agreement: float

    def summary(self) -> str:
        return f"max abs diff {self.max_abs_diff:.1e}, argmax agreement {self.argmax_agreement:.3f}"


def verify_inputs(model_config, tokenizer, samples: int = 8, seed: int = VERIFY_SEED) -> dict[str, np.ndarray]:
    """Fixed, seeded inputs shaped as dmf.preprocess makes them (see module doc)."""
    from dmf.preprocess import normalize_audio

    rng = np.random.default_rng(seed)
    n_samples, n_tokens = model_config.max_audio_samples, model_config.max_tokens
    audio = np.zeros((samples, n_samples), dtype=np.float32)
    for i in range(samples):
        keep = int(rng.integers(max(1, n_samples // 5), n_samples + 1))  # some clips shorter than 5 s
        clip = np.zeros(n_samples, dtype=np.float32)
        clip[:keep] = rng.standard_normal(keep).astype(np.float32) * float(rng.uniform(0.01, 0.5))
        audio[i] = normalize_audio(clip) if model_config.do_normalize else clip
    vocab = len(tokenizer) if tokenizer is not None else 100
    cls_id, sep_id, pad_id = (_token_id(tokenizer, "cls", 2), _token_id(tokenizer, "sep", 3),
                              _token_id(tokenizer, "pad", 0))
    low = min(5, vocab - 1)  # skip the special tokens at the start of a BERT vocabulary
    ids = np.full((samples, n_tokens), pad_id, dtype=np.int64)
    mask = np.zeros((samples, n_tokens), dtype=np.int64)
    for i in range(samples):
        length = int(rng.integers(min(3, n_tokens), n_tokens + 1))  # incl. [CLS] and [SEP]
        ids[i, :length] = rng.integers(low, vocab, size=length)
        ids[i, 0] = cls_id
        ids[i, length - 1] = sep_id
        mask[i, :length] = 1
    return {AUDIO_INPUT: audio, IDS_INPUT: ids, MASK_INPUT: mask}


def _token_id(tokenizer, kind: str, default: int) -> int:
    value = getattr(tokenizer, f"{kind}_token_id", None)
    return value if isinstance(value, int) else default


def torch_reference(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The torch eval model's log-probs (fp32), through the same engine interface as the graphs."""
    from dmf.torch_engine import TorchEngine

    return TorchEngine(model).infer(feeds)


def open_graph(kind: str, path: str | Path, model_config, precision: str = "fp32", threads: int | None = None):
    """The runtime's engine `kind` (onnx, openvino, trt) over an exported graph with the contract's
    tensors at `model_config`'s shapes: export checks the code users run."""
    from dmf.runtime.artifact import ModelFile
    from dmf.runtime.engines import open_engine

    model = ModelFile.for_shapes(path, model_config.max_audio_samples, model_config.max_tokens,
                                 model_config.num_labels, precision)
    return open_engine(kind, model, threads=threads)


def run_chunks(engine, feeds: dict[str, np.ndarray], batch: int | None = None) -> np.ndarray:
    """engine.infer in chunks of `batch` (None: all at once); (N, C) float32 log-probs."""
    n = len(feeds[AUDIO_INPUT])
    step = batch or n
    outs = [engine.infer({k: v[start:start + step] for k, v in feeds.items()}) for start in range(0, n, step)]
    return np.concatenate(outs).astype(np.float32)


def compare(reference: np.ndarray, got: np.ndarray) -> Parity:
    if reference.shape != got.shape:
        raise ValueError(f"output shape {got.shape} differs from the reference {reference.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - got.astype(np.float64)))) if got.size else 0.0
    if not np.isfinite(got).all():
        diff = float("inf")
    agreement = float(np.mean(reference.argmax(-1) == got.argmax(-1))) if len(got) else 1.0
    return Parity(samples=len(got), max_abs_diff=diff, argmax_agreement=agreement)


def verify_engine(engine, reference: np.ndarray, feeds: dict[str, np.ndarray]) -> Parity:
    """`engine` vs the reference, once as one batch and once sample by sample (batch 1): the
    dynamic batch dim must work at both sizes. The worse of the two is reported."""
    whole = compare(reference, run_chunks(engine, feeds))
    single = compare(reference, run_chunks(engine, feeds, batch=1))
    return Parity(samples=whole.samples, max_abs_diff=max(whole.max_abs_diff, single.max_abs_diff),
                  argmax_agreement=min(whole.argmax_agreement, single.argmax_agreement))


def verify_onnx(path: str | Path, reference: np.ndarray, feeds: dict[str, np.ndarray], model_config) -> Parity:
    """The ONNX graph through the runtime's onnxruntime engine (CPU) vs the reference."""
    engine = open_graph("onnx", path, model_config)
    try:
        return verify_engine(engine, reference, feeds)
    finally:
        engine.close()


def parity_failure(parity: Parity, atol: float, what: str = "export") -> str | None:
    """The one-line failure message, or None when within tolerance with the same argmax."""
    if parity.max_abs_diff <= atol and parity.argmax_agreement == 1.0:
        return None
    return (f"{what} failed verification: max abs diff {parity.max_abs_diff:.1e} > {atol:.0e} "
            f"(argmax agreement {parity.argmax_agreement:.3f})" if parity.max_abs_diff > atol else
            f"{what} failed verification: argmax agreement {parity.argmax_agreement:.3f} < 1 "
            f"(max abs diff {parity.max_abs_diff:.1e} <= {atol:.0e})")


def load_agreement_data(data) -> dict[str, np.ndarray]:
    """Preprocessed real inputs: a mapping or .npz path with audio / input_ids / attention_mask,
    or a 3-tuple in that order."""
    if isinstance(data, (str, Path)):
        with np.load(str(data)) as npz:
            data = {k: npz[k] for k in npz.files}
    if isinstance(data, (tuple, list)):
        data = dict(zip(INPUT_NAMES, data))
    missing = [k for k in INPUT_NAMES if k not in data]
    if missing:
        raise ValueError(f"agreement data lacks {', '.join(missing)} (expected {', '.join(INPUT_NAMES)})")
    out = {name: np.asarray(data[name], dtype=np.dtype(INPUT_DTYPES[name])) for name in INPUT_NAMES}
    if "labels" in data:  # optional: label indices, for the UA part of the accuracy gate
        out["labels"] = np.asarray(data["labels"], dtype=np.int64)
    if len({len(v) for v in out.values()}) != 1 or len(out[AUDIO_INPUT]) == 0:
        raise ValueError("agreement data arrays must be non-empty and have the same first dim")
    return out


def unweighted_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """UA: mean recall over the classes present in `labels`."""
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def top2_margin(log_probs: np.ndarray) -> np.ndarray:
    """(N,) difference of the two largest probabilities of each row."""
    probs = np.exp(log_probs.astype(np.float64))
    top = np.sort(probs, axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0]


def check_gate_clips(clips: int, what: str, sources: dict | None = None) -> None:
    """ValueError (one line, with the count per source) when there are too few clips to gate on."""
    if clips >= MIN_GATE_CLIPS:
        return
    where = ", ".join(f"{k}: {v}" for k, v in (sources or {}).items())
    raise ValueError(f"{what}: the accuracy gate needs at least {MIN_GATE_CLIPS} clips to resolve a "
                     f"{MIN_AGREEMENT:.0%} agreement bar, got {clips}" + (f" ({where})" if where else "")
                     + ": give a larger corpus (--calibration) or more clips (--agreement-data)")


def accuracy_gate(fp32: np.ndarray, reduced: np.ndarray, labels: np.ndarray | None, what: str,
                  labelled: np.ndarray | None = None) -> dict:
    """The accuracy gate of a reduced-precision graph on real clips: (N, C) log-probs of the fp32
    and reduced graphs; `labels` (N,) label indices, used for UA where `labelled` (N,) is True
    (the held-out session; default: every row). Passes when
    - there are at least MIN_GATE_CLIPS clips,
    - argmax agreement with fp32 over the decided clips (fp32 top-2 margin >= NEAR_TIE_MARGIN)
      is >= MIN_AGREEMENT (near-tie flips are counted apart),
    - UA over the labelled clips, near-ties taking fp32's label, is at most MAX_UA_DROP below fp32's.
    Returns the record dmf.json keeps; raises ValueError (one line, with the figures) otherwise."""
    n = len(fp32)
    check_gate_clips(n, what)
    if not np.isfinite(reduced).all():
        raise ValueError(f"{what} failed the accuracy gate on {n} clips: non-finite log-probs")
    near = top2_margin(fp32) < NEAR_TIE_MARGIN
    flips = fp32.argmax(-1) != reduced.argmax(-1)
    decided = int((~near).sum())
    agreement = float(1.0 - flips[~near].mean()) if decided else 1.0
    record = {"clips": n, "decided": decided, "near_ties": int(near.sum()), "flips": int(flips[~near].sum()),
              "near_tie_flips": int(flips[near].sum()), "argmax_agreement": agreement,
              "raw_agreement": float(1.0 - flips.mean()), "min_agreement": MIN_AGREEMENT,
              "near_tie_margin": NEAR_TIE_MARGIN, "max_ua_drop": MAX_UA_DROP, "samples": n,
              **_ua_record(fp32, reduced, near, labels, labelled)}
    problems = []
    if decided == 0:
        problems.append(f"every clip is a near-tie (fp32 top-2 margin < {NEAR_TIE_MARGIN})")
    if agreement < MIN_AGREEMENT:
        problems.append(f"argmax agreement with fp32 {agreement:.3f} < {MIN_AGREEMENT} "
                        f"({record['flips']} of {decided} decided clips flipped)")
    if record["ua"] is not None and record["ua"] < record["ua_fp32"] - MAX_UA_DROP - 1e-12:
        problems.append(f"UA {100 * record['ua']:.1f} more than {100 * MAX_UA_DROP:.0f} point below "
                        f"fp32's {100 * record['ua_fp32']:.1f}")
    if problems:
        raise ValueError(f"{what} failed the accuracy gate on {n} clips "
                         f"({record['near_ties']} near-ties not counted): " + "; ".join(problems))
    return record


def _ua_record(fp32: np.ndarray, reduced: np.ndarray, near: np.ndarray, labels: np.ndarray | None,
               labelled: np.ndarray | None) -> dict:
    """UA of fp32, of the reduced graph as is (ua_raw) and with near-ties taking fp32's label (ua,
    the gated figure), over the labelled rows; None without labels."""
    if labels is None:
        return {"labelled": 0, "ua_fp32": None, "ua": None, "ua_raw": None}
    rows = np.ones(len(labels), dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
    if not rows.any():
        return {"labelled": 0, "ua_fp32": None, "ua": None, "ua_raw": None}
    ref, got = fp32.argmax(-1), reduced.argmax(-1)
    judged = np.where(near, ref, got)
    return {"labelled": int(rows.sum()), "ua_fp32": unweighted_accuracy(labels[rows], ref[rows]),
            "ua": unweighted_accuracy(labels[rows], judged[rows]), "ua_raw": unweighted_accuracy(labels[rows], got[rows])}
