"""Load and validate an exported artifact folder (docs/artifact.md): dmf.json, model, tokenizer.

Everything the runtime needs to know about the model (labels, input names and shapes, sample
rate, normalisation, token count, batch limit) comes from dmf.json; nothing here has a model
default. Every problem is an `ArtifactError` with a one-line message naming the file.
Torch-free (json, hashlib, pathlib only).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmf.contract import (AUDIO_INPUT, CONTENT_DIGEST, FORMAT, IDS_INPUT, INPUT_NAMES, MASK_INPUT, MAX_CLIP_SECONDS,
                          MODEL_FILES, SUPPORTED_SCHEMA_VERSIONS, content_digest, io_spec, sha256_file)
from dmf.contract import META_FILE as META_NAME
from dmf.contract import NORMALIZE_OVER

ENGINES = tuple(MODEL_FILES)
MAX_META_BYTES = 1 << 20  # dmf.json is a few KiB; a larger one is not ours (and is not parsed)

# Ranges of dmf.json's numbers. Wide enough for any model dmf exports; outside them the value is a
# typo or an edit, and would fail later and less clearly (a huge width allocates at the warm-up,
# eps = Infinity zeroes every clip, eps = NaN turns every clip into NaN).
SAMPLE_RATES = (1000, 768_000)  # Hz
MAX_TOKENS = 8192  # a text encoder's longest input
MAX_BATCH = 4096
EPS_RANGE = (0.0, 1e-2)  # exclusive lower bound: silence needs eps > 0 to normalise to 0, not NaN
LOG_PROB_TOLERANCE = 0.05  # |logsumexp(row)| at the warm-up: probabilities summing to 1 +- ~5 % (bf16 engines)


class ArtifactError(RuntimeError):
    """The artifact folder is missing, incomplete, corrupt or of an unsupported version."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # e.g. ("batch", 80000)


@dataclass(frozen=True)
class ModelFile:
    """What an engine needs to open a model: the file, the tensors the contract promises, and the
    precision it was verified at. An artifact gives one (`Artifact.model_file`); export builds one
    for each graph it verifies, so export checks the engines users run."""

    model_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    @classmethod
    def for_shapes(cls, path: str | Path, input_samples: int, max_tokens: int, num_labels: int,
                   precision: str = "fp32") -> "ModelFile":
        """A graph with the contract's tensors at these shapes (dmf.contract.io_spec)."""
        inputs, outputs = io_spec(input_samples, max_tokens, num_labels)
        spec = lambda d: TensorSpec(d["name"], d["dtype"], tuple(d["shape"]))  # noqa: E731
        return cls(Path(path), tuple(map(spec, inputs)), tuple(map(spec, outputs)), precision)


@dataclass(frozen=True)
class Artifact:
    """A validated artifact: paths plus the contract fields the runtime uses."""

    path: Path
    meta: dict = field(repr=False)
    engine: str
    precision: str
    model_path: Path
    tokenizer_path: Path | None
    labels: tuple[str, ...]
    label_names: tuple[str, ...]  # one display name per label (dmf.json label_names; the codes when absent)
    sample_rate: int
    input_samples: int
    max_tokens: int
    do_normalize: bool
    eps: float
    normalize_over: str  # "all" (the padded clip) | "real_samples" (the samples before the padding)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def uses_audio(self) -> bool:
        return AUDIO_INPUT in self.input_names

    @property
    def uses_text(self) -> bool:
        return IDS_INPUT in self.input_names

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    @property
    def model_file(self) -> ModelFile:
        return ModelFile(self.model_path, self.inputs, self.outputs, self.precision)

    def summary(self) -> dict[str, Any]:
        """The fields a health endpoint or a log line shows."""
        return {"path": str(self.path), "engine": self.engine, "precision": self.precision,
                "fusion": self.meta.get("fusion"), "labels": list(self.labels),
                "label_names": list(self.label_names),
                "sample_rate": self.sample_rate, "input_samples": self.input_samples,
                "max_tokens": self.max_tokens, "max_batch": self.max_batch,
                "dmf_version": self.meta.get("dmf_version")}


def _require(meta: dict, key: str, kind: type | tuple, where: Path) -> Any:
    if key not in meta:
        raise ArtifactError(f"{where}: missing field '{key}'")
    value = meta[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactError(f"{where}: field '{key}' = {value!r} is invalid: expected {names}")
    return value


def _int_in(meta: dict, key: str, where: Path, low: int, high: int) -> int:
    value = _require(meta, key, int, where)
    if not low <= value <= high:
        raise ArtifactError(f"{where}: field '{key}' = {value!r} is invalid: expected an integer in [{low}, {high}]")
    return value


def _no_constant(name: str):
    """json.loads' hook for NaN / Infinity / -Infinity, which Python accepts and JSON does not have."""
    raise ValueError(f"non-finite number {name} (JSON has no NaN or Infinity)")


def _inside(root: Path, name: str, where: Path, key: str) -> Path:
    """`name` as a file inside the artifact folder (no absolute paths, no '..', no symlink out)."""
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise ArtifactError(f"{where}: field '{key}' = {name!r} is invalid: expected a file name inside the artifact")
    _no_escape(root, root / rel)
    return root / rel


def _no_escape(root: Path, path: Path) -> None:
    """Refuse a path whose symlinks lead out of the artifact folder: the sha256 list vouches for
    the folder's own files, not for whatever a link points at."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{path}: a symlink leading out of the artifact folder (to {path.resolve()}); "
                            "copy the file into the folder")


def _specs(meta: dict, key: str, where: Path) -> tuple[TensorSpec, ...]:
    raw = _require(meta, key, list, where)
    if not raw:
        raise ArtifactError(f"{where}: field '{key}' is empty")
    specs = []
    for i, item in enumerate(raw):
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("dtype"), str)
                and isinstance(item.get("shape"), list)):
            raise ArtifactError(f"{where}: {key}[{i}] is invalid: expected {{'name', 'dtype', 'shape'}}")
        specs.append(TensorSpec(item["name"], item["dtype"], tuple(item["shape"])))
    return tuple(specs)


def load_artifact(path: str | Path, *, verify: bool = True) -> Artifact:
    """Read and check an artifact folder. `verify` checks each file listed in dmf.json's `files`
    against its sha256 (on by default; the files are small next to the model load itself)."""
    root = Path(path)
    meta, where = _read_meta(root)
    engine = _require(meta, "engine", str, where)
    if engine not in ENGINES:
        raise ArtifactError(f"{where}: field 'engine' = {engine!r} is invalid: expected one of {ENGINES}")
    labels = _labels(meta, where)
    names = _label_names(meta, where, labels)
    do_normalize, eps, normalize_over = _normalisation(meta, where)
    sample_rate = _int_in(meta, "sample_rate", where, *SAMPLE_RATES)
    # a window longer than the longest accepted clip would only ever score padding
    input_samples = _int_in(meta, "input_samples", where, 1, int(MAX_CLIP_SECONDS * sample_rate))
    max_tokens = _int_in(meta, "max_tokens", where, 1, MAX_TOKENS)
    max_batch = _int_in(meta, "max_batch", where, 1, MAX_BATCH)
    inputs, outputs = _io_specs(meta, where, input_samples, max_tokens, len(labels))
    model_path, tokenizer_path = _model_files(meta, root, where, [s.name for s in inputs])
    _check_content_digest(meta, where)
    _check_digests(meta, root, where, model_path, verify)
    return Artifact(
        path=root, meta=meta, engine=engine, precision=str(meta.get("precision", "fp32")),
        model_path=model_path, tokenizer_path=tokenizer_path, labels=tuple(labels), label_names=names,
        sample_rate=sample_rate, input_samples=input_samples, max_tokens=max_tokens,
        do_normalize=do_normalize, eps=float(eps), normalize_over=normalize_over, inputs=inputs, outputs=outputs, max_batch=max_batch,
    )


def _read_meta(root: Path) -> tuple[dict, Path]:
    """dmf.json as a dict of a supported format and schema version, and its path."""
    if not root.exists():
        raise ArtifactError(f"{root}: artifact folder does not exist")
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a folder (an artifact is a folder holding {META_NAME})")
    where = root / META_NAME
    if not where.is_file():
        raise ArtifactError(f"{where}: missing (is {root} an artifact written by `dmf export`?)")
    _no_escape(root, where)
    if where.stat().st_size > MAX_META_BYTES:
        raise ArtifactError(f"{where}: {where.stat().st_size} bytes, over the {MAX_META_BYTES} byte limit "
                            "for a metadata file")
    try:
        meta = json.loads(where.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ArtifactError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (RecursionError, ValueError) as exc:  # nesting past the parser's depth; 4300+ digit integers
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise ArtifactError(f"{where}: invalid JSON: {reason}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{where}: field 'format' = {meta.get('format')!r}: expected {FORMAT!r}")
    version = meta.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS or isinstance(version, bool):
        raise ArtifactError(f"{where}: schema_version {version!r} is not supported by this runtime "
                            f"(supported: {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); "
                            "re-export the checkpoint or upgrade dmf")
    return meta, where


def _labels(meta: dict, where: Path) -> list[str]:
    labels = _require(meta, "labels", list, where)
    if len(labels) < 2 or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
        raise ArtifactError(f"{where}: field 'labels' = {labels!r} is invalid: expected >= 2 distinct names")
    return labels


def _label_names(meta: dict, where: Path, labels: list[str]) -> tuple[str, ...]:
    """Optional (artifacts before it show their codes): one non-empty name per label, in order."""
    names = meta.get("label_names", labels)
    if (not isinstance(names, list) or len(names) != len(labels)
            or not all(isinstance(x, str) and x.strip() for x in names)):
        raise ArtifactError(f"{where}: field 'label_names' = {names!r} is invalid: expected {len(labels)} "
                            "non-empty names, one per label")
    return tuple(names)


def _normalisation(meta: dict, where: Path) -> tuple[bool, float, str]:
    """(do_normalize, eps, over); an artifact written before "over" existed normalised over "all"."""
    norm = _require(meta, "normalisation", dict, where)
    do_normalize = norm.get("do_normalize")
    eps = norm.get("eps", 1e-7)
    over = norm.get("over", "all")
    eps_ok = (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps)
              and EPS_RANGE[0] < eps <= EPS_RANGE[1])
    if not isinstance(do_normalize, bool) or not eps_ok or over not in NORMALIZE_OVER:
        raise ArtifactError(f"{where}: field 'normalisation' = {norm!r} is invalid: expected "
                            f"{{'do_normalize': bool, 'eps': a number in ({EPS_RANGE[0]:g}, {EPS_RANGE[1]:g}], "
                            f"'over': one of {list(NORMALIZE_OVER)}}}")
    return do_normalize, eps, over


def _io_specs(meta: dict, where: Path, input_samples: int, max_tokens: int, n_labels: int):
    """Inputs the runtime knows how to feed, shaped as the contract says; one output per label."""
    inputs = _specs(meta, "inputs", where)
    outputs = _specs(meta, "outputs", where)
    names = [s.name for s in inputs]
    unknown = [n for n in names if n not in INPUT_NAMES]
    if unknown:
        raise ArtifactError(f"{where}: unknown model input(s) {unknown}: this runtime feeds {list(INPUT_NAMES)}")
    if (IDS_INPUT in names) != (MASK_INPUT in names) or not names:
        raise ArtifactError(f"{where}: field 'inputs' {names} is invalid: expected audio and/or "
                            "input_ids + attention_mask")
    for spec in inputs:
        expected = input_samples if spec.name == AUDIO_INPUT else max_tokens
        if len(spec.shape) != 2 or spec.shape[1] != expected:
            raise ArtifactError(f"{where}: input '{spec.name}' has shape {list(spec.shape)}: "
                                f"expected ['batch', {expected}]")
    out = outputs[0]
    if len(out.shape) != 2 or out.shape[1] != n_labels:
        raise ArtifactError(f"{where}: output '{out.name}' has shape {list(out.shape)}: "
                            f"expected ['batch', {n_labels}] (one per label)")
    return inputs, outputs


def _model_files(meta: dict, root: Path, where: Path, names: list[str]) -> tuple[Path, Path | None]:
    model_path = _inside(root, _require(meta, "model_file", str, where), where, "model_file")
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: model file missing (named by {META_NAME} 'model_file')")
    tokenizer_path = None
    if IDS_INPUT in names:
        tokenizer_path = _inside(root, _require(meta, "tokenizer_file", str, where), where, "tokenizer_file")
        if not tokenizer_path.is_file():
            raise ArtifactError(f"{tokenizer_path}: tokenizer file missing (named by {META_NAME} 'tokenizer_file')")
    return model_path, tokenizer_path


def _check_content_digest(meta: dict, where: Path) -> None:
    """The metadata's own content against the digest export wrote into it (dmf.contract.seal).
    Checked after the fields, so a malformed value is named; an edited well-formed one lands here."""
    digest = meta.get(CONTENT_DIGEST)
    if not isinstance(digest, str):
        raise ArtifactError(f"{where}: missing field '{CONTENT_DIGEST}' (written by `dmf export` since dmf 0.1; "
                            "re-export the checkpoint)")
    if content_digest(meta) != digest.lower():
        raise ArtifactError(f"{where}: content does not match its '{CONTENT_DIGEST}' (dmf.json was edited after "
                            "export; re-export the checkpoint)")


def check_log_probs(out: np.ndarray, where: Path) -> None:
    """The warm-up's scores must be log-probabilities: each row's logsumexp ~ 0. A graph that
    outputs logits, zeros or anything else would otherwise answer plausible-looking labels."""
    rows = np.asarray(out, dtype=np.float64)
    peak = rows.max(axis=-1, keepdims=True)
    lse = (peak + np.log(np.exp(rows - peak).sum(axis=-1, keepdims=True)))[..., 0]
    worst = float(lse.flat[np.argmax(np.abs(lse))])
    if not abs(worst) <= LOG_PROB_TOLERANCE:
        raise ArtifactError(f"{where}: the model's outputs are not log-probabilities (logsumexp {worst:.3g} for a "
                            f"silent input, expected 0 +- {LOG_PROB_TOLERANCE}): not a graph dmf exported")


def _check_digests(meta: dict, root: Path, where: Path, model_path: Path, verify: bool) -> None:
    files = _require(meta, "files", dict, where)
    if model_path.relative_to(root).as_posix() not in files:
        raise ArtifactError(f"{where}: field 'files' has no sha256 for the model file {model_path.name}")
    if not verify:
        return
    for name, digest in files.items():
        file = _inside(root, name, where, "files")
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (listed in {META_NAME} 'files')")
        if not isinstance(digest, str) or sha256_file(file) != digest.lower():
            raise ArtifactError(f"{file}: sha256 does not match {META_NAME} 'files' "
                                "(corrupt or modified artifact; re-export it)")
