"""The artifact's metadata: dmf.json (docs/artifact.md, schema_version 1), parity.json, sha256s,
and the stage-then-rename folder swap that keeps a failed export from leaving anything behind."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dmf import __version__
from dmf import contract as C


def io_spec(model_config) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs as dmf.json lists them, for `model_config`'s shapes."""
    return C.io_spec(model_config.max_audio_samples, model_config.max_tokens, model_config.num_labels)


def manifest(*, model_config, engine: str, precision: str, max_batch: int, checkpoint: Path,
             checkpoint_sha256: str, files: dict[str, str], parity: dict) -> dict:
    """dmf.json content, sealed with its content digest (`dmf.contract.seal`). `files`: artifact
    file name -> sha256 (model file and tokenizer)."""
    from dmf.preprocess import NORM_EPS

    inputs, outputs = io_spec(model_config)
    return C.seal({
        "format": C.FORMAT,
        "schema_version": C.SCHEMA_VERSION,
        "dmf_version": __version__,
        "engine": engine,
        "precision": precision,
        "model_file": C.MODEL_FILES[engine],
        "tokenizer_file": C.TOKENIZER_FILE,
        "fusion": model_config.fusion,
        "labels": list(model_config.labels),
        "sample_rate": model_config.sample_rate,
        "input_samples": model_config.max_audio_samples,
        "max_tokens": model_config.max_tokens,
        "normalisation": {"do_normalize": bool(model_config.do_normalize), "eps": NORM_EPS,
                          "over": model_config.normalize_over or "all"},  # what dmf.preprocess computed in training
        "inputs": inputs,
        "outputs": outputs,
        "max_batch": max_batch,
        "source_checkpoint": {"path": str(checkpoint), "sha256": checkpoint_sha256},
        "files": dict(sorted(files.items())),
        "parity": {k: parity[k] for k in PARITY_SUMMARY_KEYS if k in parity},
        "model_config": json.loads(json.dumps(asdict(model_config))),
    } | _tensorrt_target(parity))


def _tensorrt_target(parity: dict) -> dict:
    """engine trt: the TensorRT version and GPU the plan was built and checked on (plans are not
    portable); optional, absent for onnx artifacts."""
    return {"tensorrt": dict(parity["tensorrt"])} if parity.get("tensorrt") else {}


# Keys of parity.json repeated under "parity" in dmf.json.
PARITY_SUMMARY_KEYS = ("reference", "checked_with", "samples", "max_abs_diff", "argmax_agreement",
                       "tolerance", "fp32_max_abs_diff", "fp32_argmax_agreement", "int8_agreement",
                       "int8_agreement_samples", "int8_verify_agreement", "verify_min_agreement", "accuracy_gate",
                       "quantization")

