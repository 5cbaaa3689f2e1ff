"""The artifact contract is defined once (dmf/contract.py): export writes through it, the runtime
reads through it (issue 10). Torch-free: these tests need no model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from dmf import contract as C
from dmf.fileio import atomic_write_json
from dmf.runtime.artifact import ArtifactError, load_artifact

ROOT = Path(__file__).resolve().parents[1]
PROJECT = [p for d in ("dmf", "train", "export", "runtime", "bench") for p in (ROOT / d).rglob("*.py")]

# Literals that belong to the contract: spelled anywhere else, they could drift from it.
CONTRACT_LITERALS = [C.FORMAT, C.META_FILE, C.PARITY_FILE, C.TOKENIZER_FILE, *C.MODEL_FILES.values(),
                     C.OPENVINO_WEIGHTS_FILE, C.OUTPUT_NAME, C.IDS_INPUT, C.MASK_INPUT, C.CONTENT_DIGEST]


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
    atomic_write_json(folder / C.META_FILE, C.seal(meta))
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
    atomic_write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"a": float("nan")})  # invalid JSON is never written ...
    assert json.loads(target.read_text()) == {"a": 1}  # ... and the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ------------------------------------------------------------------- dmf.json's own content (#22)

def _rewrite(folder: Path, edit, *, reseal: bool) -> Path:
    meta = json.loads((folder / C.META_FILE).read_text())
    edit(meta)
    text = json.dumps(C.seal(meta) if reseal else meta, indent=2)  # json.dumps writes NaN / Infinity
    (folder / C.META_FILE).write_text(text)
    return folder


def _set(path: str, value):
    def edit(meta: dict) -> None:
        *parents, key = path.split(".")
        target = meta
        for p in parents:
            target = target[p]
        target[key] = value
    return edit


def _width(key: str, value: int):
    """input_samples / max_tokens and the input shapes that repeat it, edited together."""
    def edit(meta: dict) -> None:
        meta[key] = value
        for spec in meta["inputs"]:
            if (spec["name"] == C.AUDIO_INPUT) == (key == "input_samples"):
                spec["shape"][1] = value
    return edit


# Edits of a sealed dmf.json: each is refused in one line naming the file, whether or not the
# digest was recomputed after it (a malformed value is named first; a well-formed edit is caught
# by the digest).
EDITS = {
    "labels_reordered": (lambda m: m["labels"].reverse(), False, "content does not match its 'content_sha256'"),
    "sample_rate_edited": (_set("sample_rate", 8000), False, "content does not match"),
    "digest_removed": (lambda m: m.pop(C.CONTENT_DIGEST), False, "missing field 'content_sha256'"),
    "eps_nan": (_set("normalisation.eps", float("nan")), False, "non-finite number NaN"),
    "eps_infinity": (_set("normalisation.eps", float("inf")), False, "non-finite number Infinity"),
    "eps_zero": (_set("normalisation.eps", 0.0), True, "'eps': a number in (0, 0.01]"),
    "eps_huge": (_set("normalisation.eps", 1e300), True, "'eps': a number in (0, 0.01]"),
    "eps_negative": (_set("normalisation.eps", -1e-7), True, "'eps': a number in (0, 0.01]"),
    "sample_rate_zero": (_set("sample_rate", 0), True, "'sample_rate' = 0 is invalid: expected an integer in [1000, 768000]"),
    "sample_rate_huge": (_set("sample_rate", 10**9), True, "'sample_rate' = 1000000000 is invalid"),
    "input_samples_over_60_s": (_width("input_samples", 16000 * 61), True, "'input_samples' = 976000 is invalid"),
    "max_tokens_huge": (_width("max_tokens", 10**6), True, "'max_tokens' = 1000000 is invalid"),
    "max_batch_zero": (_set("max_batch", 0), True, "'max_batch' = 0 is invalid"),
    "max_batch_huge": (_set("max_batch", 10**7), True, "'max_batch' = 10000000 is invalid"),
    "parity_nan": (_set("parity", {"max_abs_diff": float("nan")}), False, "non-finite number NaN"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_an_edited_dmf_json_is_refused_in_one_line(tmp_path, case):
    edit, reseal, fragment = EDITS[case]
    folder = _rewrite(_write_artifact(tmp_path / "a"), edit, reseal=reseal)
    with pytest.raises(ArtifactError) as info:
        load_artifact(folder)
    message = str(info.value)
    assert fragment in message and "\n" not in message and str(folder / C.META_FILE) in message


def test_the_digest_survives_a_read_back_and_covers_every_field(tmp_path):
    folder = _write_artifact(tmp_path / "a")
    meta = json.loads((folder / C.META_FILE).read_text())
    assert meta[C.CONTENT_DIGEST] == C.content_digest(meta)  # what was written reads back to the same digest
    assert load_artifact(folder).labels == C.LABELS
    for key in meta:  # any field changed changes the digest
        if key != C.CONTENT_DIGEST:
            assert C.content_digest({**meta, key: "changed"}) != meta[C.CONTENT_DIGEST], key
    # a resealed, well-formed edit is accepted: the digest is an integrity check, not a signature
    assert load_artifact(_rewrite(folder, _set("max_batch", 2), reseal=True)).max_batch == 2


def _constant_graph(path: Path, row: list[float], samples: int = 800) -> None:
    """An audio-only ONNX graph answering `row` for every clip (audio @ 0 + row)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", [C.AUDIO_INPUT, "zeros"], ["scaled"]),
         helper.make_node("Add", ["scaled", "row"], [C.OUTPUT_NAME])],
        "constant", [helper.make_tensor_value_info(C.AUDIO_INPUT, TensorProto.FLOAT, ["batch", samples])],
        [helper.make_tensor_value_info(C.OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(row)])],
        [numpy_helper.from_array(np.zeros((samples, len(row)), np.float32), "zeros"),
         numpy_helper.from_array(np.array([row], np.float32), "row")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


# A graph swapped in with its sha256 recomputed and dmf.json resealed: only the warm-up's check
# of the scores themselves can tell it is not a log-softmax classifier.
SCORES = {
    "zeros": ([0.0, 0.0, 0.0, 0.0], "logsumexp 1.39"),
    "logits": ([2.0, 1.0, 0.5, -1.0], "logsumexp 2.5"),
    "half_the_mass": ([math.log(0.125)] * 4, "logsumexp -0.693"),
}


@pytest.mark.parametrize("case", sorted(SCORES) + ["log_softmax"])
def test_a_graph_that_does_not_answer_log_probabilities_is_refused_at_load(tmp_path, case):
    pytest.importorskip("onnxruntime")
    from dmf.runtime import Predictor

    row, fragment = SCORES.get(case, ([math.log(0.7), math.log(0.1), math.log(0.1), math.log(0.1)], None))
    inputs, _ = C.io_spec(800, 6, len(C.LABELS))
    folder = _write_artifact(tmp_path / "a", inputs=[i for i in inputs if i["name"] == C.AUDIO_INPUT])
    model = folder / C.MODEL_FILES["onnx"]
    _constant_graph(model, row)
    _rewrite(folder, lambda meta: meta["files"].update({model.name: C.sha256_file(model)}), reseal=True)
    if fragment is None:  # a real log-softmax row loads and answers its arg-max
        predictor = Predictor.load(folder, engine="onnx")
        assert predictor.predict(np.zeros(1600, np.float32), None, 16000).label == C.LABELS[0]
        return
    with pytest.raises(ArtifactError) as info:
        Predictor.load(folder, engine="onnx")
    message = str(info.value)
    assert "not log-probabilities" in message and fragment in message and "\n" not in message
