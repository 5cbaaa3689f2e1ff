"""`dmf evaluate`: an artifact scored on a labelled set gives the figures training reports for the
same checkpoint and clips; bad labels are refused before anything runs, naming file, row, value."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest_runtime import rt  # noqa: F401

from dmf.cli import app

pytest.importorskip("sklearn", reason="dmf evaluate needs the [eval] extra (scikit-learn)")

LABELS = ("neu", "hap", "sad", "ang")
CLIPS = ("good0.wav", "good1.wav", "good2.wav", "good3.wav", "good4.wav", "good5.wav", "stereo.wav", "rate8k.wav")


@pytest.fixture(scope="module")
def corpus_manifest(rt, tmp_path_factory) -> Path:
    """A training manifest of two sessions (8 clips each, 2 per label), as `dmf train` reads it."""
    path = tmp_path_factory.mktemp("evaluate") / "corpus.csv"
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "audio", "text", "label", "speaker", "session"])
        for s, session in enumerate(("Ses01", "Ses02")):
            for i, clip in enumerate(CLIPS):
                out.writerow([f"{session}F_{i:02d}", rt.clips[clip], f"utterance {i} of session {s + 1}",
                              LABELS[(i + s) % 4], f"{session}F", session])
    return path


def _evaluate(*args: str):
    return CliRunner().invoke(app, ["evaluate", *args, "--no-progress"])


def test_evaluate_gives_the_figures_training_reports(rt, corpus_manifest, tmp_path):
    """Training's own evaluation (dmf.train.trainer.evaluate on the fold's held-out clips, what
    `dmf train` writes to metrics.json) against `dmf evaluate --data --fold` on the exported artifact."""
    if rt.checkpoint is None:
        pytest.skip("DMF_TEST_ARTIFACT given without DMF_TEST_CHECKPOINT: no checkpoint to compare with")
    from dmf.data import load_corpus
    from dmf.data.splits import loso_split
    from dmf.model import DMFModel
    from dmf.train.dataset import encode_utterances
    from dmf.train.trainer import evaluate

    model = DMFModel.from_pretrained(rt.checkpoint)
    split = loso_split(load_corpus(corpus_manifest), 1, model.config.data.val_fraction, model.config.data.seed)
    trained = evaluate(model, encode_utterances(split.test, model), batch_size=4)

    result = _evaluate(str(rt.artifact), "--data", str(corpus_manifest), "--fold", "1",
                       "--out", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["session"] == split.test_session == "Ses01"
    for key in ("wa", "ua", "macro_f1", "weighted_f1"):
        assert report[key] == pytest.approx(trained[key], abs=1e-12), key
    assert report["confusion"] == trained["confusion"]
    ids, pred = trained["predictions"]["ids"], trained["predictions"]["pred"]
    assert [(p["id"], p["predicted"]) for p in report["predictions"]] == [(i, LABELS[k]) for i, k in zip(ids, pred)]
    assert f"UA {trained['ua']:.4f}" in result.output


def test_manifest_report_and_plot(rt, corpus_manifest, tmp_path):
    """A plain labelled manifest (audio, text, label): per-class figures add up to the confusion
    matrix, and the plot is a PNG."""
    pytest.importorskip("matplotlib")
    manifest = tmp_path / "labelled.jsonl"
    rows = [{"audio": str(rt.clips[c]), "text": "hello there", "label": LABELS[i % 4]} for i, c in enumerate(CLIPS)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, plot = tmp_path / "r.json", tmp_path / "cm.png"
    result = _evaluate(str(rt.artifact), "--manifest", str(manifest), "--out", str(out), "--plot", str(plot))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    matrix = report["confusion"]
    assert report["n"] == len(rows) == sum(map(sum, matrix))
    assert [report["per_class"][lab]["support"] for lab in LABELS] == [sum(r) for r in matrix]
    correct = sum(matrix[i][i] for i in range(4))
    assert report["wa"] == pytest.approx(correct / len(rows))
    assert [p["id"] for p in report["predictions"]] == [r["audio"] for r in rows]  # the id defaults to the audio value
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_label_is_one_line_naming_file_row_and_value(rt, tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text(f"audio,text,label\n{rt.clips['good0.wav']},hi,neu\n{rt.clips['good1.wav']},hi,joy\n")
    out = tmp_path / "r.json"
    result = _evaluate(str(rt.artifact), "--manifest", str(manifest), "--out", str(out))
    assert result.exit_code == 2
    assert "line 3: unknown label 'joy'" in result.output and str(manifest) in result.output
    assert "neu, hap, sad, ang" in result.output
    assert not out.exists()


def test_missing_label_column_and_bad_options(rt, tmp_path):
    manifest = tmp_path / "nolabel.csv"
    manifest.write_text(f"audio,text\n{rt.clips['good0.wav']},hi\n")
    result = _evaluate(str(rt.artifact), "--manifest", str(manifest))
    assert result.exit_code == 2 and "line 1: missing column(s) label" in result.output
    result = _evaluate(str(rt.artifact), "--data", str(manifest))
    assert result.exit_code == 2 and "--data and --fold go together" in result.output
    result = _evaluate(str(rt.artifact), "--manifest", str(manifest), "--out", str(tmp_path / "r.csv"))
    assert result.exit_code == 2 and "expected a .json file" in result.output


def test_fold_out_of_range(rt, corpus_manifest):
    result = _evaluate(str(rt.artifact), "--data", str(corpus_manifest), "--fold", "3")
    assert result.exit_code == 2 and "fold 3 is out of range" in result.output
