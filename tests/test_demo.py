"""dmf demo without its training run (that is `make demo`, minutes): the export step goes on past a
refused reduced-precision export and stops on a failed fp32 one, the summary (terminal, demo.md,
demo.json) shows every export, the refusals with their message and the bench's CPU line, and a bad
option is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dmf.export
from dmf.bench import demo as D
from dmf.bench.bench import ARTIFACT_ENGINES, ENGINES, BenchOptions, Case, run_bench
from dmf.bench.measure import TimingOptions
from dmf.config import preset
from dmf.export import ExportError
from dmf.model import DMFModel

REFUSAL = ("openvino int8 export failed the accuracy gate on 112 clips (2 near-ties not counted): "
           "argmax agreement with fp32 0.945 < 0.99 (6 of 110 decided clips flipped)")


def test_demo_engines_are_bench_engines():
    assert set(D.BENCH_ENGINES) <= set(ENGINES)
    assert all(name in ARTIFACT_ENGINES for names in D.EXPORTS.values() for name in names)
    for names in D.EXPORTS.values():  # fp32 first, then the gated ones; both fusions get the fast CPU engines
        assert names[0] == "onnx" and set(D.REDUCED) | {"onnx"} == set(names)


def test_export_reports_a_refused_reduced_precision_and_goes_on(monkeypatch, tmp_path):
    calls = []

    def fake_export(checkpoint, out, *, engine, precision, force, calibration):
        calls.append((out.name, engine, precision, calibration))
        if (engine, precision) == ("openvino", "int8"):
            raise ExportError(REFUSAL)
        return out

    monkeypatch.setattr(dmf.export, "export_checkpoint", fake_export)
    corpus = tmp_path / "corpus"
    done = D._export(tmp_path / "ckpt", tmp_path / "art", corpus, D.EXPORTS["memory"], lambda _msg: None)
    assert done == {"onnx": tmp_path / "art" / "onnx", "onnx-int8": tmp_path / "art" / "onnx-int8",
                    "openvino-bf16": tmp_path / "art" / "openvino-bf16", "openvino-int8": REFUSAL}
    assert calls == [("onnx", "onnx", "fp32", None), ("onnx-int8", "onnx", "int8", corpus),
                     ("openvino-bf16", "openvino", "bf16", corpus), ("openvino-int8", "openvino", "int8", corpus)]
    assert D._parity(REFUSAL) == {"refused": REFUSAL}

    def failing_fp32(checkpoint, out, **kwargs):
        raise ExportError("cannot load checkpoint: no config.json")

    monkeypatch.setattr(dmf.export, "export_checkpoint", failing_fp32)
    with pytest.raises(ExportError, match="cannot load checkpoint"):  # without fp32 there is no demo
        D._export(tmp_path / "ckpt", tmp_path / "art", corpus, D.EXPORTS["naive"], lambda _msg: None)


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> dict:
    """A demo summary around a real (tiny, torch-only) bench result."""
    work = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    ckpt = DMFModel(preset("tiny", max_audio_samples=4000), texts=["i am happy", "so sad"],
                    pretrained=False).save_pretrained(work / "ckpt")
    bench = run_bench([Case(fusion="memory", checkpoint=ckpt)],
                      BenchOptions(engines=("torch", "onnx"), batch_sizes=(1,), threads=1, measure_peak=False,
                                   head=False, timing=TimingOptions(warmup=1, min_runs=3, min_seconds=0.0)))
    fold = {"wa": 0.7, "ua": 0.71, "macro_f1": 0.69, "weighted_f1": 0.7, "train_utterances_per_s": 100.0}
    memory = {"onnx": {"max_abs_diff": 5.7e-6, "argmax_agreement": 1.0},
              "onnx-int8": {"int8_agreement": 1.0, "accuracy_gate": {"gated": False, "reason": "not gated: ..."}},
              "openvino-bf16": {"accuracy_gate": {"gated": True, "clips": 112, "argmax_agreement": 0.991,
                                                  "flips": 1, "near_tie_flips": 2, "ua_fp32": 0.7, "ua": 0.69}},
              "openvino-int8": {"refused": REFUSAL}}
    naive = dict(memory, **{"openvino-int8": {"accuracy_gate": {
        "gated": True, "clips": 112, "argmax_agreement": 1.0, "flips": 0, "near_tie_flips": 0, "ua_fp32": 0.6,
        "ua": 0.6}}})
    return {"corpus": str(work / "corpus"), "utterances": 400, "bench": bench,
            "models": {"memory": {"fold1": fold, "exports": memory}, "naive": {"fold1": fold, "exports": naive}},
            "predictions": [{"id": "Ses01F_x", "text": "so sad", "true": "sad", "predicted": "sad", "confidence": 0.8}]}


def test_summary_files_show_every_export_and_the_cpu_line(summary, tmp_path):
    D._write_summary(summary, tmp_path)
    assert json.loads((tmp_path / "demo.json").read_text())["models"]["memory"]["exports"]["openvino-int8"] == {
        "refused": REFUSAL}
    md = (tmp_path / "demo.md").read_text()
    assert "| memory | 0.700 | 0.710 | 0.690 |" in md and "| naive | 0.700 | 0.710 | 0.690 |" in md
    assert "| memory | onnx | torch | 1.000 | - | - | 5.7e-06 |" in md
    assert "| memory | openvino-bf16 | fp32, 112 clips | 0.991 | 1 (2) | 0.700 -> 0.690 | - |" in md
    assert "| memory | openvino-int8 | refused | 0.945 | 6 | - | - |" in md  # the figures its message gives
    assert "| memory | onnx-int8 | not gated | - | - | - | - |" in md
    assert "| naive | openvino-int8 | fp32, 112 clips | 1.000 | 0 (0) | 0.600 -> 0.600 | - |" in md
    assert f"memory openvino-int8 refused: {REFUSAL}" in md
    assert summary["bench"]["machine"]["cpu_line"] in md and "## dmf bench" in md and "xpaper" not in md
    assert "onnx (memory): no onnx artifact given" in md


def test_refused_rows_show_the_message_figures():
    ua = ("openvino int8 export failed the accuracy gate on 112 clips (0 near-ties not counted): UA 55.0 more "
          "than 1 point below fp32's 61.3")
    assert D.refused_figures(REFUSAL) == ["0.945", "6", "-"]
    assert D.refused_figures(ua) == ["-", "-", "0.613 -> 0.550"]
    assert D.refused_figures("some other failure") == ["-", "-", "-"]


def test_summary_says_what_one_fold_does_not_show_and_explains_its_codes(summary):
    models, predictions = D.models_section(summary), D.predictions_section(summary)
    assert "three seeds memory fusion averaged 71.7" in models.caption and "62.4" in models.caption
    assert "p: the predicted label's probability" in predictions.caption
    assert "hap happy+excited" in predictions.caption and "ang angry" in predictions.caption


def _utterance(root: Path, uid: str, seconds: float, label: str, seed: int):
    import numpy as np
    import soundfile as sf

    from dmf.data.records import Utterance

    path = root / f"{uid}.wav"
    audio = 0.1 * np.random.default_rng(seed).standard_normal(round(seconds * 16000))
    sf.write(str(path), audio, 16000, subtype="PCM_16")
    return Utterance(uid, path, f"words of {uid}", label, uid[:5], uid[:6])


def test_conversation_files_join_the_held_out_dialog(tmp_path):
    """conversation.wav is the held-out session's longest dialog in utterance order with GAP_S
    gaps; each VTT cue names its speaker and spans exactly its clip's samples in the recording."""
    import numpy as np
    import soundfile as sf

    from dmf.data.records import Corpus
    from dmf.runtime.conversation import read_transcript

    make = lambda uid, s, seed: _utterance(tmp_path, uid, s, "neu", seed)  # noqa: E731
    utts = [make("Ses01F_impro01_M010", 0.8, 1), make("Ses01F_impro01_F002", 1.25, 2),
            make("Ses01F_impro02_F000", 1.0, 3), make("Ses01F_impro01_F000", 0.6, 4), make("Ses02F_x_F000", 3.0, 5)]
    clips = D.held_out_dialog(Corpus(utts, ("neu", "hap", "sad", "ang")))
    assert [u.id for u in clips] == ["Ses01F_impro01_F000", "Ses01F_impro01_F002", "Ses01F_impro01_M010"]
    D.write_conversation(clips, tmp_path / "c.wav", tmp_path / "c.vtt")
    recording, rate = sf.read(str(tmp_path / "c.wav"), dtype="float32")
    assert rate == 16000 and len(recording) == round((0.6 + 1.25 + 0.8 + 2 * D.GAP_S) * 16000)
    segments = read_transcript(tmp_path / "c.vtt")
    assert [(s.speaker, s.text) for s in segments] == [(u.speaker, u.text) for u in clips]
    for seg, u in zip(segments, clips):
        clip = sf.read(str(u.audio_path), dtype="float32")[0]
        start = round(seg.start * rate)
        assert abs(seg.end - seg.start - len(clip) / rate) < 2e-3
        assert np.array_equal(recording[start:start + len(clip)], clip)  # PCM_16 both ways: exact


def test_missing_engines_are_explained():
    cases = [Case(fusion="memory", checkpoint=None, artifacts={"onnx": Path("a")}),
             Case(fusion="naive", checkpoint=None, artifacts={"onnx": Path("b")})]
    D.explain_missing(cases, {"memory": {"onnx-int8": REFUSAL}}, ("torch", "onnx", "onnx-int8", "openvino-int8"))
    assert cases[0].unavailable == {"onnx-int8": f"export refused: {REFUSAL}",
                                    "openvino-int8": "the demo does not export openvino-int8 for the memory model"}
    assert set(cases[1].unavailable) == {"onnx-int8", "openvino-int8"}  # torch and onnx need no explaining


def test_printed_summary_has_the_cpu_line_and_the_refusal(summary, capsys):
    D.print_summary(summary)
    out = capsys.readouterr().out
    assert f"CPU: {summary['bench']['machine']['cpu_line']}" in out
    assert "openvino-int8 refused" in " ".join(out.split()) and "held-out clips" in out
    # captions, refusals and notes wrap at the console's 80 columns (only table rows may be wider)
    long = [line for line in out.splitlines() if len(line) > 80]
    assert not [line for line in long if "refused:" in line or "argmax agreement" in line or "interval" in line], long
    assert max(len(line.rstrip()) for line in out.splitlines() if " refused " in line) <= 80  # the export row too
    assert "p: the predicted label's probability" in " ".join(out.split())


def test_demo_bad_option_is_one_line_error(tmp_path):
    from dmf.cli import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--utterances", "1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:") and "too few" in result.output
    assert "Traceback" not in result.output and not Path(tmp_path / "demo" / "demo.json").exists()


def test_demo_writes_the_bench_plot_beside_its_summary(summary, tmp_path):
    said = []
    D._plot(summary["bench"], tmp_path / "bench.png", said.append)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and said == [f"plot: {tmp_path / 'bench.png'}"]
    D._plot({"rows": []}, tmp_path / "empty.png", said.append)  # nothing timed: no empty plot
    assert not (tmp_path / "empty.png").exists()
