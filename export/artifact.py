"""The artifact's metadata: dmf.json (docs/artifact.md, schema_version 1), parity.json, sha256s,
and the stage-then-rename folder swap that keeps a failed export from leaving anything behind."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dmf import __version__
from dmf import contract as C


@dataclass
class ParityReport:
    """parity.json (docs/artifact.md, "`parity` (and `parity.json`)"): how the shipped graph was checked. Built from the fp32
    graph's verification, then updated by the engine and precision steps of the export."""

    samples: int  # seeded verify inputs compared against the torch eval model
    max_abs_diff: float  # the shipped graph against torch on them (log-probs)
    argmax_agreement: float
    fp32_max_abs_diff: float  # the fp32 ONNX graph against torch (every export verifies it first)
    fp32_argmax_agreement: float
    inputs: dict  # {"seed", "batch_sizes"} of the verify inputs
    tolerance: float | None  # max abs diff allowed (fp32); None: reduced precision, gated on real clips
    reference: str = "torch-eval-fp32"
    checked_with: str = "onnxruntime-cpu"  # the runtime engine the shipped graph ran on
    accuracy_gate: dict | None = None  # verify.accuracy_gate's record, or {"gated": False, "reason"}
    int8_agreement: float | None = None  # int8: the gate's agreement (the key older dmf.json files had)
    # Present only where they apply (absent from parity.json otherwise):
    int8_agreement_samples: int | None = None  # int8: clips the gate ran on
    int8_verify_agreement: float | None = None  # int8: agreement with torch on the verify inputs
    verify_min_agreement: float | None = None  # reduced precisions: the broken-graph bar on the verify inputs
    quantization: dict | None = None  # openvino int8: recipe, calibration clips, ops kept in float
    tensorrt: dict | None = None  # trt: the TensorRT version and GPU the plan was built on

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: v for k, v in out.items() if v is not None or k not in _PRESENT_WHEN_SET}


_PRESENT_WHEN_SET = frozenset({"int8_agreement_samples", "int8_verify_agreement", "verify_min_agreement",
                               "quantization", "tensorrt"})


def io_spec(model_config) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs as dmf.json lists them, for `model_config`'s shapes."""
    return C.io_spec(model_config.max_audio_samples, model_config.max_tokens, model_config.num_labels)


def manifest(*, model_config, engine: str, precision: str, max_batch: int, checkpoint: Path,
             checkpoint_sha256: str, files: dict[str, str], parity: ParityReport) -> dict:
    """dmf.json content, sealed with its content digest (`dmf.contract.seal`). `files`: artifact
    file name -> sha256 (model file and tokenizer)."""
    from dmf.preprocess import NORM_EPS

    report = parity.to_dict()
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
        "label_names": C.label_names(model_config.labels),
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
        "parity": {k: report[k] for k in PARITY_SUMMARY_KEYS if k in report},
        "model_config": json.loads(json.dumps(asdict(model_config))),
    } | _tensorrt_target(parity))


def _tensorrt_target(parity: ParityReport) -> dict:
    """engine trt: the TensorRT version and GPU the plan was built and checked on (plans are not
    portable); optional, absent for onnx artifacts."""
    return {"tensorrt": dict(parity.tensorrt)} if parity.tensorrt else {}


# Keys of parity.json repeated under "parity" in dmf.json.
PARITY_SUMMARY_KEYS = ("reference", "checked_with", "samples", "max_abs_diff", "argmax_agreement",
                       "tolerance", "fp32_max_abs_diff", "fp32_argmax_agreement", "int8_agreement",
                       "int8_agreement_samples", "int8_verify_agreement", "verify_min_agreement", "accuracy_gate",
                       "quantization")

