"""The artifact contract between `dmf export` (which writes through this module) and `dmf.runtime`
(which reads through it): format and schema version, file names, tensor names and dtypes, the
default label set, limits, and the sha256 and canonical-JSON helpers both sides use. Files are
written through dmf.fileio (this module is also shipped alone into Triton's Python models, so it
imports nothing of dmf).

Torch-free (hashlib, json, pathlib only): the edge runtime imports it. Every constant here is
defined once; docs/artifact.md describes the same contract in prose.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "dmf-artifact"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
CONTENT_DIGEST = "content_sha256"  # dmf.json field: sha256 of the rest of dmf.json in canonical form (`seal`)

# Files inside an artifact folder.
META_FILE = "dmf.json"
PARITY_FILE = "parity.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "trt": "model.plan"}  # dmf.json "engine" -> model file
OPENVINO_WEIGHTS_FILE = "model.bin"  # an OpenVINO IR's weights, beside model.xml
WEIGHTS_FILE = "model.safetensors"  # the checkpoint's weights (source_checkpoint sha256)

# Tensor names and dtypes of the exported graph (batch dim first, symbolic "batch").
AUDIO_INPUT = "audio"
IDS_INPUT = "input_ids"
MASK_INPUT = "attention_mask"
INPUT_NAMES = (AUDIO_INPUT, IDS_INPUT, MASK_INPUT)
OUTPUT_NAME = "log_probs"
INPUT_DTYPES = {AUDIO_INPUT: "float32", IDS_INPUT: "int64", MASK_INPUT: "int64"}
OUTPUT_DTYPE = "float32"
BATCH_DIM = "batch"

# The paper's four IEMOCAP classes, in the classifier's output order (neutral, happy+excited, sad, angry).
LABELS = ("neu", "hap", "sad", "ang")
# Full names shown to users (dmf.json "label_names"); "hap" is IEMOCAP's happy merged with excited.
LABEL_NAMES = {"neu": "neutral", "hap": "happy", "sad": "sad", "ang": "angry"}


def label_names(labels) -> list[str]:
    """A display name per label code: the paper's classes by their names, any other code as itself."""
    return [LABEL_NAMES.get(code, code) for code in labels]

# dmf.json "normalisation" "over": clip statistics over the whole zero-padded input, or over the
# samples before the padding (a feature extractor with return_attention_mask), the padding kept at 0.
NORMALIZE_OVER = ("all", "real_samples")

# Runtime limits on a request's audio (seconds before cropping to the model's input window).
MIN_CLIP_SECONDS = 0.1
MAX_CLIP_SECONDS = 60.0
MAX_TEXT_CHARS = 2000  # longer text is cut: the model reads max_tokens tokens anyway


def io_spec(input_samples: int, max_tokens: int, num_labels: int) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs as dmf.json lists them: [{'name', 'dtype', 'shape'}], batch dim symbolic."""
    widths = {AUDIO_INPUT: input_samples, IDS_INPUT: max_tokens, MASK_INPUT: max_tokens}
    inputs = [{"name": n, "dtype": INPUT_DTYPES[n], "shape": [BATCH_DIM, widths[n]]} for n in INPUT_NAMES]
    outputs = [{"name": OUTPUT_NAME, "dtype": OUTPUT_DTYPE, "shape": [BATCH_DIM, num_labels]}]
    return inputs, outputs


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(data: dict) -> bytes:
    """The canonical form a digest is taken over: sorted keys, no whitespace, UTF-8, no NaN.
    Floats round-trip through JSON exactly, so a dmf.json read back gives the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def content_digest(meta: dict) -> str:
    """sha256 of dmf.json's content without its own CONTENT_DIGEST field."""
    return hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != CONTENT_DIGEST})).hexdigest()


def seal(meta: dict) -> dict:
    """`meta` with its CONTENT_DIGEST set: what export writes, and what the runtime checks, so an
    edit of dmf.json after export (labels reordered, a normalisation constant changed) is refused.
    It guards against accidents and stale copies, not an attacker (who can recompute it)."""
    meta = json.loads(json.dumps(meta, allow_nan=False))  # as it reads back: tuples as lists, keys as str
    return {**meta, CONTENT_DIGEST: content_digest(meta)}
