"""The artifact contract is defined once (dmf/contract.py): export writes through it, the runtime
reads through it (issue 10). Torch-free: these tests need no model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dmf import contract as C
from dmf.runtime.artifact import ArtifactError, load_artifact

ROOT = Path(__file__).resolve().parents[1]
PROJECT = [p for d in ("dmf", "train", "export", "runtime", "bench") for p in (ROOT / d).rglob("*.py")]

# Literals that belong to the contract: spelled anywhere else, they could drift from it.
CONTRACT_LITERALS = [C.FORMAT, C.META_FILE, C.PARITY_FILE, C.TOKENIZER_FILE, *C.MODEL_FILES.values(),
                     C.OPENVINO_WEIGHTS_FILE, C.OUTPUT_NAME, C.IDS_INPUT, C.MASK_INPUT]


@pytest.mark.parametrize("literal", CONTRACT_LITERALS)
def test_each_contract_constant_is_spelled_only_in_the_contract(literal):
    quoted = re.compile(r"""["']""" + re.escape(literal) + r"""["']""")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in PROJECT if p.name != "contract.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if quoted.search(line) and not line.lstrip().startswith("#")]
    assert not offenders, f"{literal!r} re-spelled outside dmf/contract.py: {offenders}"


def test_labels_and_limits_have_one_home():
    import dmf
    from dmf.config import ModelConfig
    from dmf.runtime import predictor

    assert dmf.LABELS is C.LABELS and ModelConfig().labels == C.LABELS
    assert predictor.DEFAULT_MAX_SECONDS == C.MAX_CLIP_SECONDS and predictor.DEFAULT_MIN_SECONDS == C.MIN_CLIP_SECONDS


def _write_artifact(folder: Path, **overrides) -> Path:
    """A minimal artifact written through the contract (a stand-in model file: the loader checks
    the contract and the sha256s, not the graph)."""
    folder.mkdir()
    model = folder / C.MODEL_FILES["onnx"]
    model.write_bytes(b"not a real graph, only hashed")
    (folder / C.TOKENIZER_FILE).write_text("{}")
    inputs, outputs = C.io_spec(800, 6, len(C.LABELS))
    meta = {"format": C.FORMAT, "schema_version": C.SCHEMA_VERSION, "engine": "onnx", "precision": "fp32",
            "model_file": model.name, "tokenizer_file": C.TOKENIZER_FILE, "fusion": "memory",
            "labels": list(C.LABELS), "sample_rate": 16000, "input_samples": 800, "max_tokens": 6,
            "normalisation": {"do_normalize": True, "eps": 1e-7}, "inputs": inputs, "outputs": outputs,
            "max_batch": 4, "files": {n: C.sha256_file(folder / n) for n in (model.name, C.TOKENIZER_FILE)},
            **overrides}
    C.write_json(folder / C.META_FILE, meta)
    return folder


def test_an_artifact_written_through_the_contract_reads_back_through_it(tmp_path):
    art = load_artifact(_write_artifact(tmp_path / "a"))
    assert art.labels == C.LABELS and art.input_names == C.INPUT_NAMES and art.output_name == C.OUTPUT_NAME
    assert [s.dtype for s in art.inputs] == [C.INPUT_DTYPES[n] for n in C.INPUT_NAMES]
    assert art.model_file.model_path == tmp_path / "a" / C.MODEL_FILES["onnx"]
    assert not list((tmp_path / "a").glob(".*.tmp"))  # write_json leaves no temp file behind


def test_contract_breaks_are_refused_in_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="schema_version 99 is not supported"):
        load_artifact(_write_artifact(tmp_path / "v", schema_version=99))
    with pytest.raises(ArtifactError, match="expected one of"):
        load_artifact(_write_artifact(tmp_path / "e", engine="tpu"))


def test_write_json_is_atomic_and_refuses_nan(tmp_path):
    target = tmp_path / "x.json"
    C.write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        C.write_json(target, {"a": float("nan")})  # invalid JSON is never written ...
    assert json.loads(target.read_text()) == {"a": 1}  # ... and the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
