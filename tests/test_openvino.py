"""OpenVINO artifacts and the engine interface (issues 10 and 17): export verification through the
runtime's engines, static int8 calibrated on a corpus, the accuracy gate refusing a broken
quantisation, engine selection by `auto`, the contract checks every engine makes when it opens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

from dmf.config import preset  # noqa: E402
from dmf.export import ExportError, export_checkpoint  # noqa: E402
from dmf.export import verify as V  # noqa: E402
from dmf.model import DMFModel  # noqa: E402
from dmf.runtime import Predictor  # noqa: E402
from dmf.runtime.artifact import ModelFile, TensorSpec, load_artifact  # noqa: E402
from dmf.runtime.engine import EngineError  # noqa: E402
from dmf.runtime.engines import choose_engine, create_engine, open_engine  # noqa: E402
from dmf.torch_engine import TorchEngine  # noqa: E402

TEXTS = ["i am so happy today", "this is terrible news", "leave me alone", "what a surprise", "okay fine"]
INIT_RANGE = 0.2  # as in test_export: log-probs that depend on both inputs, labels with a margin
GATE_CLIPS = V.MIN_GATE_CLIPS + 4  # the accuracy gate refuses to judge on fewer


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino")


def _tiny_model() -> DMFModel:
    cfg = preset("tiny", fusion="memory")
    cfg = preset("tiny", fusion="memory",
                 audio_encoder_config=dict(cfg.model.audio_encoder_config, initializer_range=INIT_RANGE),
                 text_encoder_config=dict(cfg.model.text_encoder_config, initializer_range=INIT_RANGE))
    torch.manual_seed(0)
    return DMFModel(cfg, texts=TEXTS, pretrained=False)


@pytest.fixture(scope="module")
def checkpoint(work) -> Path:
    return _tiny_model().save_pretrained(work / "ckpt")


@pytest.fixture(scope="module")
def decided_checkpoint(work) -> Path:
    """A model whose labels have a margin int8 noise cannot cross (a random tiny model's log-probs are
    within ~0.05 of each other, closer than static int8's error: its labels flip, as a trained model's
    confident ones do not). Class k's bias is raised by 2k, so inputs still move every log-prob."""
    model = _tiny_model()
    with torch.no_grad():
        model.classifier.mlp[-1].bias += 2.0 * torch.arange(model.model_config.num_labels)
    return model.save_pretrained(work / "ckpt-decided")


@pytest.fixture(scope="module")
def rows(decided_checkpoint) -> dict:
    """Calibration rows and held-out rows labelled with the fp32 model's own argmax (UA 1.0)."""
    model = DMFModel.from_pretrained(decided_checkpoint).eval()
    held = V.verify_inputs(model.model_config, model.tokenizer, samples=GATE_CLIPS, seed=5)
    held["labels"] = TorchEngine(model).infer(held).argmax(-1)
    return {"calibration": V.verify_inputs(model.model_config, model.tokenizer, samples=8, seed=6),
            "held_out": held, "held_out_session": "synthetic"}


@pytest.fixture(scope="module")
def fp32_artifact(work, checkpoint) -> Path:
    return export_checkpoint(checkpoint, work / "ov-fp32", engine="openvino", precision="fp32")


@pytest.fixture(scope="module")
def int8_artifact(work, decided_checkpoint, rows) -> Path:
    return export_checkpoint(decided_checkpoint, work / "ov-int8", engine="openvino", precision="int8",
                             calibration=rows)


def _feeds(checkpoint: Path, n: int = 4, seed: int = 31) -> tuple[dict, np.ndarray]:
    model = DMFModel.from_pretrained(checkpoint).eval()
    feeds = V.verify_inputs(model.model_config, model.tokenizer, samples=n, seed=seed)
    return feeds, TorchEngine(model).infer(feeds)


def test_openvino_fp32_artifact_matches_torch_recomputed_here(fp32_artifact, checkpoint):
    meta = json.loads((fp32_artifact / "dmf.json").read_text())
    assert meta["engine"] == "openvino" and meta["model_file"] == "model.xml"
    assert {"model.xml", "model.bin"} <= set(meta["files"])  # both IR files are hashed
    feeds, reference = _feeds(checkpoint)
    engine = create_engine(load_artifact(fp32_artifact))
    assert engine.name == "openvino" and engine.precision == "f32"
    got = engine.infer(feeds)
    assert np.abs(got - reference).max() <= V.FP32_ATOL
    assert meta["parity"]["checked_with"] == "openvino-cpu" and meta["parity"]["max_abs_diff"] <= V.FP32_ATOL


def test_static_int8_passes_the_gate_and_records_it(int8_artifact, decided_checkpoint):
    gate = load_artifact(int8_artifact).meta["parity"]["accuracy_gate"]
    assert gate["gated"] and gate["clips"] == GATE_CLIPS and gate["argmax_agreement"] >= V.MIN_AGREEMENT
    assert gate["decided"] + gate["near_ties"] == GATE_CLIPS and gate["labelled"] == GATE_CLIPS
    assert gate["ua_fp32"] == pytest.approx(1.0) and gate["ua"] >= gate["ua_fp32"] - V.MAX_UA_DROP
    # the int8 IR holds quantised ops (FakeQuantize), so the speed-up is real int8 work, not a copy
    xml = (int8_artifact / "model.xml").read_text()
    assert xml.count('type="FakeQuantize"') >= 4
    feeds, reference = _feeds(decided_checkpoint)
    got = Predictor.load(int8_artifact).engine.infer(feeds)
    assert (got.argmax(-1) == reference.argmax(-1)).all() and np.abs(got - reference).max() < 0.5


def _quantised_inputs(xml_path: Path) -> dict[str, bool]:
    """Conv / MatMul op name -> whether one of its inputs comes from a FakeQuantize (int8)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    return {op.get_friendly_name(): any(i.get_source_output().get_node().get_type_name() == "FakeQuantize"
                                        for i in op.inputs())
            for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")}


def test_mixed_int8_keeps_the_recorded_float_set_float_and_quantises_the_rest(int8_artifact):
    from dmf.export.openvino import FLOAT_GROUPS

    quant = load_artifact(int8_artifact).meta["parity"]["quantization"]  # read back from dmf.json
    assert quant["recipe"] == "mixed-int8" and quant["smooth_quant"] is False and quant["calibration_clips"] == 8
    kept = quant["float_ops"]
    assert set(kept) == set(FLOAT_GROUPS)
    assert len(kept["feature_encoder_convolutions"]) == 7  # the tiny wav2vec2's conv stack: 7 layers
    assert len(kept["audio_head"]) == 2  # projector (before the mean pool) and classifier
    assert len(kept["fusion_and_classifier"]) >= 10
    quantised = _quantised_inputs(int8_artifact / "model.xml")
    float_names = {n for names in kept.values() for n in names}
    assert float_names <= set(quantised)  # the recorded names are ops of the shipped IR
    assert not any(quantised[n] for n in float_names)
    int8_ops = [n for n, q in quantised.items() if q]
    assert len(int8_ops) >= 10  # the encoders' transformer layers are int8


def _flip_labels(xml_path: Path) -> None:
    """Rewrite an IR so its log-softmax input is negated: every decided label flips."""
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    flipped = ov.opset13.negative(model.output(0).get_node().input_value(0))
    model = ov.Model([ov.opset13.log_softmax(flipped, -1)], model.get_parameters())
    model.output(0).set_names({"log_probs"})
    staged = Path(xml_path).with_name("broken.xml")  # never rewrite a model.bin that is mapped
    ov.save_model(model, str(staged), compress_to_fp16=False)
    staged.with_suffix(".bin").replace(Path(xml_path).with_suffix(".bin"))
    staged.replace(xml_path)


def test_a_quantisation_that_flips_labels_is_refused_with_the_figures(work, decided_checkpoint, rows, monkeypatch):
    from dmf.export import openvino as OV

    real = OV.quantize

    def broken(onnx_path, xml_path, calibration):
        _, kept = real(onnx_path, xml_path, calibration)
        _flip_labels(xml_path)
        return Path(xml_path), kept

    monkeypatch.setattr(OV, "quantize", broken)
    target = work / "ov-int8-broken"
    with pytest.raises(ExportError) as err:
        export_checkpoint(decided_checkpoint, target, engine="openvino", precision="int8", calibration=rows)
    message = str(err.value)
    assert "\n" not in message and "argmax agreement" in message and "<" in message
    assert not target.exists() and not list(work.glob(".ov-int8-broken*"))


def test_bf16_is_gated_on_real_clips_like_int8(work, decided_checkpoint, rows, monkeypatch):
    """bf16 carries the same accuracy gate (not a log-prob tolerance): recorded when it passes,
    and a bf16 graph that flips labels is refused."""
    from dmf.export import openvino as OV

    held = {"held_out": rows["held_out"], "held_out_session": "synthetic"}
    art = export_checkpoint(decided_checkpoint, work / "ov-bf16", engine="openvino", precision="bf16", calibration=held)
    parity = load_artifact(art).meta["parity"]
    assert parity["tolerance"] is None and parity["accuracy_gate"]["gated"]
    assert parity["accuracy_gate"]["clips"] == GATE_CLIPS
    real = OV.convert

    def flipped(onnx_path, xml_path):
        real(onnx_path, xml_path)
        _flip_labels(xml_path)
        return Path(xml_path)

    monkeypatch.setattr(OV, "convert", flipped)
    with pytest.raises(ExportError, match=r"openvino bf16 export failed (verification|the accuracy gate)"):
        export_checkpoint(decided_checkpoint, work / "ov-bf16-broken", engine="openvino", precision="bf16",
                          calibration=held)


def test_the_export_refuses_to_gate_on_too_few_clips(work, decided_checkpoint, rows):
    few = {"held_out": {k: v[:V.MIN_GATE_CLIPS - 1] for k, v in rows["held_out"].items()},
           "calibration": rows["calibration"]}
    with pytest.raises(ExportError, match=rf"needs at least {V.MIN_GATE_CLIPS} clips .* got {V.MIN_GATE_CLIPS - 1}"):
        export_checkpoint(decided_checkpoint, work / "ov-few", engine="openvino", precision="int8", calibration=few)
    assert not (work / "ov-few").exists()


def _gate_inputs(n_decided: int, n_near: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 log-probs: n_decided clips with a clear label (0 or 1, alternating) and n_near near-ties
    (top-2 margin 0.005 < NEAR_TIE_MARGIN); labels = fp32's argmax."""
    decided = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]
    rows = [decided[i % 2] for i in range(n_decided)] + [[0.4025, 0.3975, 0.1, 0.1]] * n_near
    fp32 = np.log(np.array(rows))
    return fp32, fp32.argmax(-1)


def test_accuracy_gate_maths():
    fp32, labels = _gate_inputs(100, 0)
    assert V.accuracy_gate(fp32, fp32.copy(), labels, "x")["ua"] == pytest.approx(1.0)
    one_flip = fp32.copy()
    one_flip[0] = fp32[1]  # 99/100 agree, UA 99.0 vs 100.0: exactly at both limits, accepted
    assert V.accuracy_gate(fp32, one_flip, labels, "x")["ua"] == pytest.approx(0.99)
    two_flips = one_flip.copy()
    two_flips[2] = fp32[1]
    with pytest.raises(ValueError, match=r"agreement with fp32 0\.980 < 0\.99 \(2 of 100 decided clips flipped\); "
                                         r"UA 98\.0 more than 1 point"):
        V.accuracy_gate(fp32, two_flips, labels, "x")
    record = V.accuracy_gate(fp32, fp32 + 0.01, None, "x")
    assert record["ua"] is None and record["argmax_agreement"] == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        V.accuracy_gate(fp32, fp32 * np.nan, None, "x")


def test_near_ties_are_reported_and_not_held_against_the_export():
    fp32, labels = _gate_inputs(100, 10)
    reduced = fp32.copy()
    reduced[100:] = fp32[100:][:, [1, 0, 2, 3]]  # every near-tie flips (as bf16 alone does)
    record = V.accuracy_gate(fp32, reduced, labels, "x")
    assert (record["clips"], record["decided"], record["near_ties"]) == (110, 100, 10)
    assert (record["flips"], record["near_tie_flips"], record["argmax_agreement"]) == (0, 10, 1.0)
    assert record["raw_agreement"] == pytest.approx(100 / 110)
    assert record["ua"] == pytest.approx(record["ua_fp32"]) and record["ua_raw"] < record["ua_fp32"]
    reduced[0] = fp32[1]
    reduced[2] = fp32[1]  # two decided flips: refused, and the message says the near-ties were set apart
    with pytest.raises(ValueError, match=r"on 110 clips \(10 near-ties not counted\).*2 of 100 decided"):
        V.accuracy_gate(fp32, reduced, labels, "x")


def test_ua_is_judged_on_the_held_out_rows_only():
    fp32, labels = _gate_inputs(120, 0)
    reduced = fp32.copy()
    reduced[100] = fp32[101]  # one flip, in a validation row: agreement 119/120 passes
    record = V.accuracy_gate(fp32, reduced, labels, "x", labelled=np.arange(120) < 100)
    assert record["labelled"] == 100 and record["ua"] == pytest.approx(1.0)
    everywhere = V.accuracy_gate(fp32, reduced, labels, "x")
    assert everywhere["labelled"] == 120 and everywhere["ua"] < 1.0


def test_too_few_clips_refuses_to_gate():
    fp32, labels = _gate_inputs(V.MIN_GATE_CLIPS - 1, 0)
    with pytest.raises(ValueError, match=rf"needs at least {V.MIN_GATE_CLIPS} clips"):
        V.accuracy_gate(fp32, fp32.copy(), labels, "x")


def test_int8_needs_calibration_and_engines_refuse_wrong_precisions(checkpoint, work):
    with pytest.raises(ExportError, match="--calibration"):
        export_checkpoint(checkpoint, work / "x", engine="openvino", precision="int8")
    with pytest.raises(ExportError, match="not available for engine trt"):
        export_checkpoint(checkpoint, work / "x", engine="trt", precision="int8")
    with pytest.raises(ExportError, match="not available for engine onnx"):
        export_checkpoint(checkpoint, work / "x", engine="onnx", precision="bf16")


def test_calibration_from_a_corpus_holds_out_the_checkpoints_session(tmp_path, checkpoint):
    from dmf.data.synth import synthesize
    from dmf.export.calibration import corpus_data

    synthesize(tmp_path / "corpus", seed=0, utterances=60)
    model = DMFModel.from_pretrained(checkpoint)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "metrics.json").write_text(json.dumps({"test_session": "Ses02"}))
    data = corpus_data(tmp_path / "corpus", model, ck, calibration_samples=6)
    assert data["held_out_session"] == "Ses02" and "metrics.json" in data["held_out_choice"]
    assert len(data["calibration"]["audio"]) == 6
    held = data["held_out"]
    assert held["audio"].shape[1] == model.model_config.max_audio_samples and len(held["labels"]) == len(held["audio"])
    # the gate's clips: the whole held-out session (UA rows) then the checkpoint's validation split,
    # rebuilt with its own val_fraction and seed: clips it was neither trained nor calibrated on
    from dmf.data import load_corpus
    from dmf.data.splits import loso_split

    split = loso_split(load_corpus(tmp_path / "corpus"), 2, model.config.data.val_fraction, model.config.data.seed)
    assert len(held["audio"]) == len(split.test) + len(split.val) and len(split.val) > 0
    assert data["ua_rows"].sum() == len(split.test) and data["ua_rows"][:len(split.test)].all()
    assert list(data["gate_sources"].values()) == [len(split.test), len(split.val)]
    (ck / "metrics.json").write_text(json.dumps({"test_session": "Ses09"}))
    with pytest.raises(ValueError, match="Ses09"):
        corpus_data(tmp_path / "corpus", model, ck, calibration_samples=6)


# ------------------------------------------------------------------------------ engine interface
def test_auto_and_explicit_engines_agree_on_an_onnx_artifact(work, checkpoint):
    art = load_artifact(export_checkpoint(checkpoint, work / "onnx-fp32"))
    assert choose_engine(art) == "onnx"  # onnxruntime is installed: it runs fp32 graphs here
    assert choose_engine(art, providers="cpu") == "onnx"
    feeds, reference = _feeds(checkpoint)
    for kind in ("onnx", "openvino"):  # OpenVINO reads the same ONNX
        assert np.abs(create_engine(art, kind).infer(feeds) - reference).max() <= V.FP32_ATOL
    with pytest.raises(EngineError, match="providers apply to the onnx engine only"):
        create_engine(art, "openvino", providers="cpu")
    with pytest.raises(EngineError, match="cannot run it"):
        create_engine(art, "trt")
    with pytest.raises(EngineError, match="expected one of"):
        create_engine(art, "tpu")


def test_openvino_artifact_runs_only_on_openvino_and_auto_picks_it(fp32_artifact):
    art = load_artifact(fp32_artifact)
    assert choose_engine(art) == "openvino"
    with pytest.raises(EngineError, match="cannot run it"):
        create_engine(art, "onnx")


def test_engines_check_the_models_own_tensors_against_the_contract(work, checkpoint, fp32_artifact):
    onnx_art = load_artifact(export_checkpoint(checkpoint, work / "onnx-check"))
    good = onnx_art.model_file
    wrong_width = ModelFile(good.model_path, (TensorSpec("audio", "float32", ("batch", 123)), *good.inputs[1:]),
                            good.outputs)
    wrong_dtype = ModelFile(good.model_path, (TensorSpec("audio", "int64", ("batch", good.inputs[0].shape[1])),
                                              *good.inputs[1:]), good.outputs)
    wrong_labels = ModelFile(good.model_path, good.inputs, (TensorSpec("log_probs", "float32", ("batch", 7)),))
    for kind in ("onnx", "openvino"):
        with pytest.raises(EngineError, match=r"input 'audio' has shape"):
            open_engine(kind, wrong_width)
        with pytest.raises(EngineError, match=r"input 'audio' is float32 in the model but int64"):
            open_engine(kind, wrong_dtype)
        with pytest.raises(EngineError, match=r"output 'log_probs' has shape"):
            open_engine(kind, wrong_labels)


def test_openvino_precision_follows_the_artifact_and_the_cpu():
    from dmf.runtime.openvino import inference_precision

    assert inference_precision("fp32", cpu_bf16=True) == "f32"  # never lower than verified
    assert inference_precision("bf16", cpu_bf16=True) == "bf16"
    assert inference_precision("int8", cpu_bf16=True) == "bf16"
    assert inference_precision("bf16", cpu_bf16=False) == "f32"  # no native bf16: f32, not emulation


def test_every_runtime_engine_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import dmf.runtime.engines, dmf.runtime.openvino, dmf.runtime.trt, dmf.cpuinfo\n"
            "from dmf.runtime import Predictor, create_engine\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_onnxruntime_fallback_banner_becomes_one_engine_error(work, checkpoint, monkeypatch, capsys):
    """onnxruntime-gpu prints "EP Error ... Falling back" when CUDA fails; the user sees one line."""
    import onnxruntime as ort

    art = load_artifact(export_checkpoint(checkpoint, work / "onnx-banner"))
    real = ort.InferenceSession

    def falling_back(path, sess_options=None, providers=None):
        print("EP Error /onnxruntime_src/... CUDA failure 100: no CUDA-capable device\nFalling back to ['CPU']")
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", falling_back)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(EngineError, match=r"CUDAExecutionProvider.*failed to initialise") as err:
        create_engine(art, "onnx", providers="cuda")
    assert "\n" not in str(err.value) and "EP Error" not in capsys.readouterr().out
