"""dmf.export: end-to-end ONNX export, op check, parity, int8/fp16, Triton, artifact contract, errors.

One tiny checkpoint per fusion (module-scoped) and one export per configuration, reused by the
tests; the TensorRT build and its verification are in tests/test_trt.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dmf.config import preset  # noqa: E402
from dmf.export import ExportError, ExportOptions, export_checkpoint  # noqa: E402
from dmf.export.opcheck import check_model  # noqa: E402
from dmf.export.pipeline import NOT_GATED  # noqa: E402
from dmf.export.verify import MIN_GATE_CLIPS, VERIFY_SEED, Parity, parity_failure, verify_inputs  # noqa: E402
from dmf.runtime.artifact import load_artifact  # noqa: E402
from dmf.model import DMFModel  # noqa: E402

TEXTS = ["i am so happy today", "this is outrageous and i am furious", "i miss her so much",
         "i went to the store on tuesday", "what a wonderful surprise"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


# The encoders' random init at HF's initializer_range (0.02) leaves a tiny model's log-probs almost
# independent of its inputs (rolling the transcripts of a batch moved the memory model's log-probs by
# ~1e-7), so an ORT-vs-torch comparison could not tell a graph that drops an input. At 0.2 each
# modality moves every log-prob by > 2e-3 (>> the fp32 tolerance) and the labels keep a margin of
# ~0.07 (int8 stays far from flipping them). test_onnxruntime_matches_torch_recomputed_here checks this.
INIT_RANGE = 0.2


def _tiny(fusion: str):
    cfg = preset("tiny", fusion=fusion)
    return preset("tiny", fusion=fusion,
                  audio_encoder_config=dict(cfg.model.audio_encoder_config, initializer_range=INIT_RANGE),
                  text_encoder_config=dict(cfg.model.text_encoder_config, initializer_range=INIT_RANGE))


@pytest.fixture(scope="module")
def checkpoints(work) -> dict[str, Path]:
    out = {}
    for fusion in ("memory", "naive"):
        torch.manual_seed(0)
        model = DMFModel(_tiny(fusion), texts=TEXTS, pretrained=False)
        out[fusion] = model.save_pretrained(work / f"ckpt-{fusion}")
    return out


@pytest.fixture(scope="module")
def memory_artifact(work, checkpoints) -> Path:
    return export_checkpoint(checkpoints["memory"], work / "art-memory", triton_dir=work / "triton",
                             triton_name="dmf_memory", max_batch=16)


@pytest.fixture(scope="module")
def naive_artifact(work, checkpoints) -> Path:
    return export_checkpoint(checkpoints["naive"], work / "art-naive")


GATE_CLIPS = MIN_GATE_CLIPS + 4  # the accuracy gate refuses to judge on fewer


def _agreement_npz(work: Path, checkpoint: Path) -> Path:
    model = DMFModel.from_pretrained(checkpoint)
    feeds = verify_inputs(model.model_config, model.tokenizer, samples=GATE_CLIPS, seed=99)
    path = work / "agreement.npz"
    np.savez(path, **feeds)
    return path


@pytest.fixture(scope="module")
def fp16_artifact(work, checkpoints) -> Path:
    return export_checkpoint(checkpoints["naive"], work / "art-naive-fp16", precision="fp16")


@pytest.fixture(scope="module")
def int8_cli(work, checkpoints):
    """The int8 export made through `dmf export`: (CliRunner result, artifact folder)."""
    from typer.testing import CliRunner

    npz = _agreement_npz(work, checkpoints["naive"])
    out = work / "art-naive-int8"
    result = CliRunner().invoke(_cli_app(), ["export", str(checkpoints["naive"]), "--out", str(out),
                                             "--precision", "int8", "--agreement-data", str(npz)])
    return result, out


@pytest.fixture(scope="module")
def int8_artifact(int8_cli) -> Path:
    result, out = int8_cli
    assert result.exit_code == 0, result.output
    return out


# -------------------------------------------------------------------------------- parity, contract
# Every exported form, recomputed here: the artifact's model.onnx in onnxruntime against the
# checkpoint's torch eval model, on inputs the exporter never saw. (fusion, artifact fixture, max abs
# diff of log-probs): fp32 is the 1e-4 of docs/design.md ('Export checks'); fp16 and int8 have no
# contract tolerance (their gate is argmax agreement on real clips), 5e-2 bounds this checkpoint's.
FORMS = {"memory-fp32": ("memory", "memory_artifact", 1e-4), "naive-fp32": ("naive", "naive_artifact", 1e-4),
         "naive-fp16": ("naive", "fp16_artifact", 5e-2), "naive-int8": ("naive", "int8_artifact", 5e-2)}
INPUTS = ("audio", "input_ids", "attention_mask")


def _own_feeds(art: Path, n: int = 5) -> dict[str, np.ndarray]:
    """n clips of noise at random loudness and length, normalised as dmf.preprocess does, with TEXTS
    through the artifact's tokenizer.json; then the same n with the audio rolled by one row, and with
    the text rolled by one row (3n rows: the response to each modality is compared too)."""
    from tokenizers import Tokenizer

    from dmf.preprocess import normalize_audio

    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=30)
    tok.enable_truncation(30)
    enc = tok.encode_batch(TEXTS[:n])
    rng = np.random.default_rng(5)
    audio = np.zeros((n, 80000), dtype=np.float32)
    for i in range(n):
        keep = int(rng.integers(16000, 80001))
        audio[i, :keep] = rng.standard_normal(keep) * rng.uniform(0.01, 0.5)
        audio[i] = normalize_audio(audio[i])
    base = {"audio": audio, "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
    audio_rolled = {**base, "audio": np.roll(base["audio"], 1, axis=0)}
    text_rolled = {**base, **{k: np.roll(base[k], 1, axis=0) for k in ("input_ids", "attention_mask")}}
    return {k: np.concatenate([base[k], audio_rolled[k], text_rolled[k]]) for k in INPUTS}


def _torch_eval(checkpoint: Path | DMFModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
    model = checkpoint if isinstance(checkpoint, DMFModel) else DMFModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return model(*(torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in INPUTS)).numpy()


def _onnxruntime(art: Path, feeds: dict[str, np.ndarray], batch: int | None = None) -> np.ndarray:
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    step = batch or len(feeds["audio"])
    return np.concatenate([session.run(["log_probs"], {k: v[i:i + step] for k, v in feeds.items()})[0]
                           for i in range(0, len(feeds["audio"]), step)])


def _worst(ref: np.ndarray, art: Path, feeds: dict[str, np.ndarray]) -> float:
    """Max abs diff of ORT against `ref`, over one whole batch and batch-1 runs (dynamic batch)."""
    return max(float(np.abs(_onnxruntime(art, feeds, batch) - ref).max()) for batch in (None, 1))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_onnxruntime_matches_torch_recomputed_here(form, request, checkpoints):
    fusion, fixture, atol = FORMS[form]
    art = request.getfixturevalue(fixture)
    feeds = _own_feeds(art)
    ref = _torch_eval(checkpoints[fusion], feeds)
    n = 5  # base rows; rows n..2n have the audio rolled, 2n..3n the text
    single = _onnxruntime(art, {k: v[:n] for k, v in feeds.items()}, batch=1)  # the batch-1 graph too
    got = _onnxruntime(art, feeds)
    assert got.shape == ref.shape == (3 * n, 4) and np.isfinite(got).all()
    for out, rows in ((got, ref), (single, ref[:n])):
        assert np.abs(out - rows).max() <= atol, (form, np.abs(out - rows).max())
        assert (out.argmax(-1) == rows.argmax(-1)).all(), form
    # the check has power: each modality moves every torch log-prob row by far more than the fp32
    # tolerance, so a graph that dropped an input could not pass; and the graph's response to a
    # change of audio or of text is torch's, to half the response's size at worst (measured: 5e-4 of
    # it for fp32, 2e-2 for fp16, 0.15 for int8; a graph blind to a modality scores 1)
    for rows in (slice(n, 2 * n), slice(2 * n, 3 * n)):
        effect, response = ref[rows] - ref[:n], got[rows] - got[:n]
        assert np.abs(effect).max(1).min() > 20 * 1e-4, (form, np.abs(effect).max(1))
        assert np.abs(response - effect).max() <= 0.5 * np.abs(effect).max(), form


@pytest.mark.parametrize("form", sorted(FORMS))
def test_dmf_json_parity_is_what_onnxruntime_gives(form, request, checkpoints):
    """The parity figure the exporter wrote, recomputed on its own seeded verify inputs."""
    fusion, fixture, atol = FORMS[form]
    art = request.getfixturevalue(fixture)
    parity = json.loads((art / "dmf.json").read_text())["parity"]
    assert json.loads((art / "parity.json").read_text())["max_abs_diff"] == parity["max_abs_diff"]
    assert parity["reference"] == "torch-eval-fp32" and parity["samples"] == 8
    model = DMFModel.from_pretrained(checkpoints[fusion]).eval()
    feeds = verify_inputs(model.model_config, model.tokenizer, parity["samples"], seed=VERIFY_SEED)
    worst = _worst(_torch_eval(model, feeds), art, feeds)
    assert parity["max_abs_diff"] == pytest.approx(worst, rel=0.25, abs=2e-6), (form, worst)
    assert parity["argmax_agreement"] == 1.0 and worst <= atol


def test_artifact_loads_in_onnxruntime_and_matches_dmf_json(memory_artifact, checkpoints):
    art = memory_artifact
    meta = json.loads((art / "dmf.json").read_text())
    assert meta["format"] == "dmf-artifact" and meta["schema_version"] == 1
    assert meta["engine"] == "onnx" and meta["precision"] == "fp32" and meta["model_file"] == "model.onnx"
    assert meta["max_batch"] == 16 and meta["labels"] == ["neu", "hap", "sad", "ang"]
    assert meta["input_samples"] == 80000 and meta["max_tokens"] == 30 and meta["sample_rate"] == 16000
    assert meta["normalisation"] == {"do_normalize": True, "eps": 1e-07, "over": "all"}
    # every listed file is there with its sha256; the source checkpoint's weights are fingerprinted
    assert set(meta["files"]) == {"model.onnx", "tokenizer.json", "parity.json"}
    for name, digest in meta["files"].items():
        assert _sha(art / name) == digest
    assert meta["source_checkpoint"]["sha256"] == _sha(checkpoints["memory"] / "model.safetensors")
    assert meta["model_config"] == json.loads((checkpoints["memory"] / "config.json").read_text())["model"]
    assert sorted(p.name for p in art.iterdir()) == ["dmf.json", "model.onnx", "parity.json", "tokenizer.json"]

    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    types_ = {"float32": "tensor(float)", "int64": "tensor(int64)"}
    for entries, values in ((meta["inputs"], session.get_inputs()), (meta["outputs"], session.get_outputs())):
        assert [e["name"] for e in entries] == [v.name for v in values]
        for e, v in zip(entries, values):
            assert types_[e["dtype"]] == v.type
            assert isinstance(v.shape[0], str) and v.shape[1:] == e["shape"][1:]

    # an independent batch of 3 through the tokenizer.json the artifact ships
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=30)
    tok.enable_truncation(30)
    enc = tok.encode_batch(TEXTS[:3])
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    audio = np.random.default_rng(5).standard_normal((3, 80000)).astype(np.float32)
    got = session.run(None, {"audio": audio, "input_ids": ids, "attention_mask": mask})[0]
    model = DMFModel.from_pretrained(checkpoints["memory"])
    with torch.no_grad():
        ref = model(torch.from_numpy(audio), torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert got.shape == (3, 4)
    assert np.abs(got - ref).max() <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_verify_inputs_look_like_preprocessed_inputs(checkpoints):
    model = DMFModel.from_pretrained(checkpoints["naive"])
    feeds = verify_inputs(model.model_config, model.tokenizer, samples=6)
    again = verify_inputs(model.model_config, model.tokenizer, samples=6)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)  # seeded
    assert feeds["audio"].dtype == np.float32 and feeds["audio"].shape == (6, 80000)
    assert np.allclose(feeds["audio"].mean(1), 0, atol=1e-4) and np.allclose(feeds["audio"].std(1), 1, atol=1e-3)
    assert feeds["input_ids"].max() < len(model.tokenizer)
    mask = feeds["attention_mask"]
    lengths = mask.sum(1)
    assert all((mask[i, :n] == 1).all() and (mask[i, n:] == 0).all() for i, n in enumerate(lengths))
    assert (feeds["input_ids"][:, 0] == model.tokenizer.cls_token_id).all()


# --------------------------------------------------------------------------------------- op check
def test_op_check_passes_on_exports(memory_artifact, naive_artifact):
    for art in (memory_artifact, naive_artifact):
        result = check_model(art / "model.onnx")
        assert result.ok, result.message()
        assert "MatMul" in result.ops and not any(op in result.ops for op in ("DFT", "STFT", "RandomNormal"))


def _graph(nodes, inputs, outputs, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("local", 1)],
                             functions=list(functions))


def test_op_check_names_dft_and_random_ops():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    dft = _graph([helper.make_node("DFT", ["x"], ["y"])], [x], [y])
    result = check_model(dft)
    assert not result.ok and result.spectral == ["DFT"] and "DFT" in result.message()

    rnd = _graph([helper.make_node("RandomNormal", [], ["r"], shape=[2, 16, 1]),
                  helper.make_node("Add", ["x", "r"], ["y"])], [x], [y])
    result = check_model(rnd)
    assert not result.ok and result.random == ["RandomNormal"] and "RandomNormal" in result.message()

    # hidden inside a local function body and inside an If branch
    body = helper.make_function("local", "Noisy", ["a"], ["b"],
                                [helper.make_node("RandomUniformLike", ["a"], ["n"]),
                                 helper.make_node("Add", ["a", "n"], ["b"])],
                                [helper.make_opsetid("", 20)])
    branch = helper.make_graph([helper.make_node("STFT", ["x", "step"], ["z"])], "then", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["w"])], "else", [],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)])
    nested = _graph([helper.make_node("Noisy", ["x"], ["y0"], domain="local"),
                     helper.make_node("Constant", [], ["step"], value_int=4),
                     helper.make_node("Constant", [], ["c"], value_int=1),
                     helper.make_node("Cast", ["c"], ["cond"], to=TensorProto.BOOL),
                     helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)],
                    [x], [y], functions=[body])
    result = check_model(nested)
    assert result.random == ["RandomUniformLike"] and result.spectral == ["STFT"]
    assert "Noisy" not in result.ops  # function calls are walked, not counted as ops

    unsupported = _graph([helper.make_node("Unique", ["x"], ["y"])], [x], [y])
    result = check_model(unsupported)
    assert result.unsupported == ["Unique"] and "allow-list Unique" in result.message()
    contrib = _graph([helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")], [x], [y])
    assert check_model(contrib).unsupported == ["com.microsoft:FusedMatMul"]


# ------------------------------------------------------------------------------- int8, fp16, CLI
def _cli_app():
    import typer

    from dmf.export.cli import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    return app


def test_int8_export_through_cli_agrees_with_fp32(work, int8_cli, naive_artifact):
    result, out = int8_cli
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("exported onnx int8 naive model") and "accuracy gate: agreement with fp32" in summary
    meta = json.loads((out / "dmf.json").read_text())
    parity = meta["parity"]
    gate = parity["accuracy_gate"]
    assert f"decided clips of {GATE_CLIPS} ({gate['flips']} flipped; {gate['near_ties']} near-ties" in summary
    assert meta["precision"] == "int8" and gate["gated"] and gate["sources"] == {"agreement data": GATE_CLIPS}
    assert parity["int8_agreement"] >= 0.99 and parity["int8_agreement_samples"] == GATE_CLIPS
    assert parity["int8_verify_agreement"] >= 0.75
    assert parity["fp32_max_abs_diff"] <= 1e-4 and parity["max_abs_diff"] < 0.1
    ops = check_model(out / "model.onnx").ops
    assert ops["MatMulInteger"] > 0 and "ConvInteger" not in ops and ops["Conv"] > 0  # Conv left in fp32
    assert (out / "model.onnx").stat().st_size < (naive_artifact / "model.onnx").stat().st_size


def test_fp16_onnx_export(fp16_artifact):
    out = fp16_artifact
    meta = json.loads((out / "dmf.json").read_text())
    # no real clips were given: not held to a log-prob tolerance, and dmf.json says it was not gated
    assert meta["precision"] == "fp16" and meta["parity"]["tolerance"] is None
    assert meta["parity"]["accuracy_gate"] == {"gated": False, "reason": NOT_GATED}
    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # io stays fp32
    assert any(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer)


# ----------------------------------------------------------------------------------------- Triton
def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2  # needs tritonclient[grpc]
        return model_config_pb2
    except Exception:
        pass
    try:
        import tritonclient
    except ImportError:
        pytest.skip("tritonclient is not installed (pip install -e '.[dev]')")
    # tritonclient without the grpc extra still ships the schema module; load it without grpcio
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_repository_parses_with_tritons_schema(memory_artifact, work):
    pb2 = _model_config_pb2()
    from google.protobuf import text_format

    folder = work / "triton" / "dmf_memory_model"  # the model entry of the repository (tests/test_triton.py)
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert config.name == "dmf_memory_model" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert [(i.name, list(i.dims), pb2.DataType.Name(i.data_type)) for i in config.input] == [
        ("audio", [80000], "TYPE_FP32"), ("input_ids", [30], "TYPE_INT64"), ("attention_mask", [30], "TYPE_INT64")]
    assert [(o.name, list(o.dims)) for o in config.output] == [("log_probs", [4])]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert (folder / "1" / "model.onnx").read_bytes() == (memory_artifact / "model.onnx").read_bytes()
    assert (folder / "labels.txt").read_text().split() == ["neu", "hap", "sad", "ang"]


# ----------------------------------------------------------------------------------------- errors
def _one_line_error(func, *args, **kwargs) -> str:
    with pytest.raises(ExportError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, checkpoints):
    out = tmp_path / "out"
    msg = _one_line_error(export_checkpoint, tmp_path / "missing", out)
    assert "checkpoint folder not found" in msg

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in checkpoints["naive"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    msg = _one_line_error(export_checkpoint, corrupt, out)
    assert msg.startswith("cannot load checkpoint") and "model.safetensors" in msg

    msg = _one_line_error(export_checkpoint, checkpoints["naive"], out, precision="fp64")
    assert "unknown precision 'fp64'" in msg
    msg = _one_line_error(export_checkpoint, checkpoints["naive"], out, engine="trt", precision="int8")
    assert msg == "precision int8 is not available for engine trt (it offers fp32, fp16)"
    msg = _one_line_error(export_checkpoint, checkpoints["naive"], out, engine="tflite")
    assert "unknown engine" in msg
    msg = _one_line_error(export_checkpoint, checkpoints["naive"], out, percision="int8")
    assert msg == "unknown export option 'percision': ExportOptions has no such field"
    # keywords override an options record, and are validated like it
    msg = _one_line_error(export_checkpoint, checkpoints["naive"], out, ExportOptions(engine="trt"), precision="int8")
    assert msg == "precision int8 is not available for engine trt (it offers fp32, fp16)"
    assert not out.exists()
    assert _leftovers(tmp_path) == []

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = _one_line_error(export_checkpoint, checkpoints["naive"], out)
    assert "exists" in msg and "--force" in msg
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []


def test_cli_errors_are_one_red_line_and_exit_2(tmp_path, checkpoints):
    from typer.testing import CliRunner

    runner = CliRunner()
    for args, text in (
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "checkpoint folder not found"),
        (["export", str(checkpoints["naive"]), "--out", str(tmp_path / "o"), "--precision", "fp64"],
         "unknown precision"),
        (["export", str(checkpoints["naive"]), "--out", str(tmp_path / "o"), "--engine", "trt",
          "--precision", "int8"], "not available for engine trt"),
    ):
        result = runner.invoke(_cli_app(), args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_parity_failure_message():
    assert parity_failure(Parity(8, 3.2e-3, 0.875), 1e-4) == \
        "export failed verification: max abs diff 3.2e-03 > 1e-04 (argmax agreement 0.875)"
    assert parity_failure(Parity(8, 3.2e-6, 1.0), 1e-4) is None
    assert "argmax agreement 0.875 < 1" in parity_failure(Parity(8, 3.2e-6, 0.875), 1e-4)


# Graphs that are wrong on purpose, handed to the REAL gates: each step of the pipeline is wrapped so
# it runs as usual and then damages the graph it saved; the export must refuse with the figures in a
# one-line ExportError and leave no artifact, staging or work folder behind.
def _damage(monkeypatch, step: str, damage) -> None:
    from dmf.export import optimize

    real = getattr(optimize, step)

    def wrapped(src, dst, *args, **kwargs):
        out = real(src, dst, *args, **kwargs)
        model = onnx.load(str(out))
        damage(model)
        onnx.save(model, str(out))
        return out

    monkeypatch.setattr(optimize, step, wrapped)


def _nudge_last_bias(delta: float):
    """Add `delta` to the classifier's last bias for label 0 (any dtype): each log-prob row then moves
    by between delta / 2 and delta at most, whatever the inputs."""
    def damage(model) -> None:
        (init,) = [t for t in model.graph.initializer
                   if "classifier.mlp" in t.name and t.name.endswith(".bias") and list(t.dims) == [4]]
        value = numpy_helper.to_array(init).copy()
        value[0] += delta
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    return damage


def _flip_labels_where_audio_exceeds(threshold: float, compare: str = "Greater"):
    """Negate the logits (argmax -> argmin: every label flips) of the rows whose max audio sample is
    above `threshold` (compare="Less": below it): Where(ReduceMax(audio) > threshold, -z, z) before
    the final LogSoftmax."""
    def damage(model) -> None:
        graph = model.graph
        (last,) = [n for n in graph.node if n.op_type == "LogSoftmax"]
        z = last.input[0]
        graph.initializer.extend([numpy_helper.from_array(np.array([1], dtype=np.int64), "dmg_axes"),
                                  numpy_helper.from_array(np.array(threshold, dtype=np.float32), "dmg_t")])
        graph.node.extend([helper.make_node("ReduceMax", ["audio", "dmg_axes"], ["dmg_peak"], keepdims=1),
                           helper.make_node(compare, ["dmg_peak", "dmg_t"], ["dmg_flip"]),
                           helper.make_node("Neg", [z], ["dmg_neg"]),
                           helper.make_node("Where", ["dmg_flip", "dmg_neg", z], ["dmg_z"])])
        last.input[0] = "dmg_z"
        # keep the node list topologically sorted: move the LogSoftmax after the new nodes
        graph.node.remove(last)
        graph.node.append(last)
    return damage


def _refused(tmp_path, checkpoint, **kwargs) -> str:
    out = tmp_path / "out"
    msg = _one_line_error(export_checkpoint, checkpoint, out, triton_dir=tmp_path / "tri", **kwargs)
    assert not out.exists() and _leftovers(tmp_path) == []  # no .out.tmp-*, no .out.work.tmp-*
    assert not (tmp_path / "tri").exists()  # the Triton repository is staged only after verification
    return msg


def _figure(msg: str, pattern: str) -> float:
    import re

    found = re.search(pattern, msg)
    assert found, msg
    return float(found.group(1))


def test_fp32_gate_refuses_a_perturbed_initializer(tmp_path, checkpoints, monkeypatch):
    _damage(monkeypatch, "optimize_offline", _nudge_last_bias(1e-3))
    msg = _refused(tmp_path, checkpoints["naive"])
    assert msg.startswith("export failed verification: max abs diff ") and "> 3e-04" in msg, msg
    # the figure is the damage, measured: a 1e-3 nudge of one logit moves log-probs by 5e-4..1e-3
    assert 4.9e-4 <= _figure(msg, r"max abs diff (\S+) >") <= 1.01e-3, msg


def _flipping_rows(tmp_path, checkpoint, flipped: int) -> Path:
    """Agreement data (GATE_CLIPS rows) whose first `flipped` rows carry an audio sample of 60: the
    rows _flip_labels_where_audio_exceeds(50) flips (no verify input reaches 50)."""
    model = DMFModel.from_pretrained(checkpoint)
    verify = verify_inputs(model.model_config, model.tokenizer, 8, seed=VERIFY_SEED)
    data = verify_inputs(model.model_config, model.tokenizer, GATE_CLIPS, seed=99)
    assert np.abs(verify["audio"]).max() < 50 and np.abs(data["audio"]).max() < 50
    data["audio"][:flipped, 100] = 60.0
    np.savez(tmp_path / "agreement.npz", **data)
    return tmp_path / "agreement.npz"


@pytest.mark.parametrize("precision, step", [("fp16", "convert_fp16"), ("int8", "quantize_int8")])
def test_every_reduced_precision_is_refused_by_the_accuracy_gate_when_real_clips_flip(
        tmp_path, checkpoints, monkeypatch, precision, step):
    # labels flip only for rows with an audio sample above 50: none of the verify inputs (they pass
    # the broken-graph check), 10 of the agreement rows, so only the accuracy gate can refuse; fp16
    # goes through the same gate as int8 (not only a log-prob tolerance)
    _damage(monkeypatch, step, _flip_labels_where_audio_exceeds(50.0))
    npz = _flipping_rows(tmp_path, checkpoints["naive"], 10)
    msg = _refused(tmp_path, checkpoints["naive"], precision=precision, agreement_data=npz)
    assert msg.startswith(f"onnx {precision} export failed the accuracy gate on {GATE_CLIPS} clips ("), msg
    assert _figure(msg, r"argmax agreement with fp32 (\S+) <") <= 1 - 9 / GATE_CLIPS, msg


def test_a_reduced_precision_without_real_clips_says_it_was_not_gated(tmp_path, checkpoints):
    from typer.testing import CliRunner

    out = tmp_path / "fp16"
    result = CliRunner().invoke(_cli_app(), ["export", str(checkpoints["naive"]), "--out", str(out),
                                             "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].endswith(NOT_GATED)
    assert load_artifact(out).meta["parity"]["accuracy_gate"] == {"gated": False, "reason": NOT_GATED}


def test_int8_verify_gate_refuses_a_quantisation_that_flips_labels(tmp_path, checkpoints, monkeypatch):
    _damage(monkeypatch, "quantize_int8", _flip_labels_where_audio_exceeds(-np.inf))  # every row
    msg = _refused(tmp_path, checkpoints["naive"], precision="int8")
    assert msg == ("onnx int8 export failed verification: argmax agreement with fp32 0.000 < 0.75 "
                   "on the verify inputs"), msg


def test_with_real_clips_the_gate_not_the_noise_inputs_decides(tmp_path, checkpoints, monkeypatch):
    """Every verify input flips (a trained model's noise inputs are often near-ties), no real clip
    does: the export is judged on the clips and accepted, the verify figure still recorded."""
    _damage(monkeypatch, "quantize_int8", _flip_labels_where_audio_exceeds(50.0, compare="Less"))
    npz = _flipping_rows(tmp_path, checkpoints["naive"], GATE_CLIPS)  # every real row peaks at 60: none flips
    parity = load_artifact(export_checkpoint(checkpoints["naive"], tmp_path / "int8", precision="int8",
                                             agreement_data=npz)).meta["parity"]
    assert parity["int8_verify_agreement"] == 0.0
    assert parity["accuracy_gate"]["argmax_agreement"] == 1.0 and parity["accuracy_gate"]["clips"] == GATE_CLIPS


def test_force_replaces_an_existing_artifact(tmp_path, naive_artifact, checkpoints):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_checkpoint(checkpoints["naive"], out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["dmf.json", "model.onnx", "parity.json", "tokenizer.json"]
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------- TensorRT
def _trt_reason() -> str | None:
    from dmf.export.tensorrt import unavailable_reason

    return unavailable_reason()


def test_trt_export_without_gpu_is_a_clear_error(tmp_path, checkpoints, monkeypatch):
    if _trt_reason() is None:
        # simulate a machine without CUDA even where TensorRT could run
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = _one_line_error(export_checkpoint, checkpoints["naive"], tmp_path / "out", engine="trt")
    assert msg.startswith("TensorRT export needs a CUDA GPU and the tensorrt package: ")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []

    # tensorrt importable but no CUDA GPU
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = _one_line_error(export_checkpoint, checkpoints["naive"], tmp_path / "out", engine="trt", precision="fp16")
    assert "no CUDA GPU" in msg


# The TensorRT build itself (gpu / trt markers) and its CPU-side wiring: tests/test_trt.py


def test_import_is_light():
    import subprocess

    code = "import sys, dmf.export; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_parity_report_omits_the_keys_that_do_not_apply():
    """parity.json keeps the keys older artifacts had: the always-present ones even when None, the
    engine/precision-specific ones only when set."""
    from dmf.export.artifact import ParityReport

    report = ParityReport(samples=8, max_abs_diff=1e-5, argmax_agreement=1.0, fp32_max_abs_diff=1e-5,
                          fp32_argmax_agreement=1.0, inputs={"seed": VERIFY_SEED, "batch_sizes": [8, 1]},
                          tolerance=None)
    fp32 = report.to_dict()
    assert fp32["tolerance"] is None and fp32["accuracy_gate"] is None and fp32["int8_agreement"] is None
    assert not {"quantization", "tensorrt", "int8_verify_agreement"} & set(fp32)
    report.quantization, report.int8_verify_agreement = {"recipe": "mixed-int8"}, 0.9
    assert report.to_dict()["quantization"] == {"recipe": "mixed-int8"}
    assert report.to_dict()["int8_verify_agreement"] == 0.9
