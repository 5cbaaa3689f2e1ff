"""The artifact's metadata: dmf.json (docs/artifact.md, schema_version 1), parity.json, sha256s,
and the stage-then-rename folder swap that keeps a failed export from leaving anything behind."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from dmf import __version__

FORMAT = "dmf-artifact"
SCHEMA_VERSION = 1
MANIFEST = "dmf.json"
PARITY = "parity.json"
TOKENIZER = "tokenizer.json"
MODEL_FILES = {"onnx": "model.onnx", "trt": "model.plan"}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def io_spec(model_config) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs as dmf.json lists them (batch dim symbolic)."""
    inputs = [
        {"name": "audio", "dtype": "float32", "shape": ["batch", model_config.max_audio_samples]},
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", model_config.max_tokens]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", model_config.max_tokens]},
    ]
    outputs = [{"name": "log_probs", "dtype": "float32", "shape": ["batch", model_config.num_labels]}]
    return inputs, outputs


def manifest(*, model_config, engine: str, precision: str, max_batch: int, checkpoint: Path,
             checkpoint_sha256: str, files: dict[str, str], parity: dict) -> dict:
    """dmf.json content. `files`: artifact file name -> sha256 (model file and tokenizer)."""
    from dmf.preprocess import NORM_EPS

    inputs, outputs = io_spec(model_config)
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "dmf_version": __version__,
        "engine": engine,
        "precision": precision,
        "model_file": MODEL_FILES[engine],
        "tokenizer_file": TOKENIZER,
        "fusion": model_config.fusion,
        "labels": list(model_config.labels),
        "sample_rate": model_config.sample_rate,
        "input_samples": model_config.max_audio_samples,
        "max_tokens": model_config.max_tokens,
        "normalisation": {"do_normalize": bool(model_config.do_normalize), "eps": NORM_EPS},
        "inputs": inputs,
        "outputs": outputs,
        "max_batch": max_batch,
        "source_checkpoint": {"path": str(checkpoint), "sha256": checkpoint_sha256},
        "files": dict(sorted(files.items())),
        "parity": {k: parity[k] for k in PARITY_SUMMARY_KEYS if k in parity},
        "model_config": json.loads(json.dumps(asdict(model_config))),
    }


# Keys of parity.json repeated under "parity" in dmf.json.
PARITY_SUMMARY_KEYS = ("reference", "checked_with", "samples", "max_abs_diff", "argmax_agreement",
                       "tolerance", "fp32_max_abs_diff", "fp32_argmax_agreement", "int8_agreement",
                       "int8_agreement_samples", "int8_verify_agreement")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
