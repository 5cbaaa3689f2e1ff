"""Training (issue "Data and training"): LOSO splits, the trainer, checkpoints, resume, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dmf.config import ConfigError, preset
from dmf.data.corpus import Corpus, Utterance
from dmf.model import DMFModel
from dmf.train import trainer
from dmf.train.cli import build_config
from dmf.train.dataset import encode_utterances, loso_split, stratified_split
from dmf.train.loso import run_training
from dmf.train.trainer import FitOptions, epoch_batches, evaluate

LABELS = ("neu", "hap", "sad", "ang")
TIMING = ("train_seconds", "utterances_per_s")  # wall-clock fields: never compared


def fake_corpus(per_session: int = 40, sessions: int = 5) -> Corpus:
    """Utterances without audio (splits only look at ids, labels and sessions)."""
    utts = []
    for s in range(1, sessions + 1):
        for i in range(per_session):
            label = LABELS[(i * 7 + s) % 4] if i % 5 else "neu"  # unbalanced: neu is the majority
            utts.append(Utterance(f"Ses{s:02d}F_x_{i:03d}", Path(f"/nowhere/{s}/{i}.wav"), f"text {i}",
                                  label, f"Ses{s:02d}", f"Ses{s:02d}{'FM'[i % 2]}"))
    return Corpus(utts, LABELS)


def tiny_config(**train):
    """The tiny preset made smaller still: 1 s clips, small batches, a few epochs."""
    cfg = preset("tiny", max_audio_samples=16000)
    values = dict(epochs=3, batch_size=4, patience=3, seed=0)
    values.update(train)
    return cfg.replace("train", **values)


def strip_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


# ------------------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("fold", [1, 3, 5])
def test_test_session_never_in_train_or_val(fold):
    corpus = fake_corpus()
    split = loso_split(corpus, fold, val_fraction=0.2, seed=0)
    assert split.test_session == corpus.sessions()[fold - 1]
    assert {u.session for u in split.test} == {split.test_session}
    assert split.test_session not in {u.session for u in split.train + split.val}
    ids = [u.id for u in split.train + split.val + split.test]
    assert len(ids) == len(set(ids)) == len(corpus)  # a partition of the corpus


def test_validation_is_stratified_and_seeded():
    corpus = fake_corpus()
    split = loso_split(corpus, 1, val_fraction=0.2, seed=0)
    rest = Counter(u.label for u in split.train + split.val)
    val = Counter(u.label for u in split.val)
    for label in LABELS:  # each class keeps its share (rounding: within one utterance)
        assert abs(val[label] - 0.2 * rest[label]) <= 1, (label, val[label], rest[label])
    again = loso_split(corpus, 1, val_fraction=0.2, seed=0)
    other = loso_split(corpus, 1, val_fraction=0.2, seed=1)
    assert [u.id for u in again.val] == [u.id for u in split.val]
    assert [u.id for u in other.val] != [u.id for u in split.val]
    shuffled = list(reversed(corpus.utterances))  # independent of the corpus order
    assert [u.id for u in stratified_split(shuffled[:160], 0.2, 0)[1]] == \
           [u.id for u in stratified_split(corpus.utterances[-160:], 0.2, 0)[1]]


def test_small_classes_still_reach_train_and_val():
    utts = [Utterance(f"u{i}", Path("x.wav"), "t", lab, "S", "SF")
            for i, lab in enumerate(["neu"] * 10 + ["sad"] * 2 + ["ang"])]
    train, val = stratified_split(utts, 0.1, 0)
    assert Counter(u.label for u in val) == {"neu": 1, "sad": 1}  # ang (1 utterance) stays in train
    assert Counter(u.label for u in train) == {"neu": 9, "sad": 1, "ang": 1}


@pytest.mark.parametrize("fold", [0, 6, -1])
def test_fold_out_of_range(fold):
    with pytest.raises(ConfigError, match="out of range"):
        loso_split(fake_corpus(), fold, 0.1, 0)


def test_epoch_batches_drop_a_last_batch_of_one():
    batches = epoch_batches(9, 4, seed=0, epoch=0)
    assert [len(b) for b in batches] == [4, 4]  # 4 + 4 + 1: the single row would break BatchNorm
    assert [len(b) for b in epoch_batches(10, 4, 0, 0)] == [4, 4, 2]
    assert torch.equal(torch.cat(epoch_batches(10, 4, 3, 2)), torch.cat(epoch_batches(10, 4, 3, 2)))
    assert not torch.equal(torch.cat(epoch_batches(10, 4, 3, 2)), torch.cat(epoch_batches(10, 4, 3, 3)))


# -------------------------------------------------------------------------------------- integration




@pytest.fixture(scope="module")
def memory_run(corpus, tmp_path_factory):
    """One uninterrupted memory-fusion run on fold 1 (shared by several tests)."""
    out = tmp_path_factory.mktemp("run") / "memory"
    summary = run_training(tiny_config(), corpus, out, [1], options=FitOptions(progress=False, checkpoint_every=2))
    return out, summary


def test_run_writes_checkpoint_metrics_report(memory_run):
    out, summary = memory_run
    fold = out / "fold1"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", "confusion.png"):
        assert (fold / name).is_file(), name
    assert not (fold / "_resume").exists()  # removed once the fold finished
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary))
    pooled, fold1 = written["pooled"], written["folds"]["1"]
    for key in ("wa", "ua", "macro_f1", "weighted_f1", "confusion", "labels", "n_test"):
        assert key in pooled and key in fold1
    assert fold1["n_test"] == pooled["n_test"] == sum(map(sum, pooled["confusion"]))
    assert written["throughput"]["utterances_per_s"] > 0
    assert json.loads((out / "config.json").read_text()) == json.loads(tiny_config().to_json())
    _check_report_figures((out / "report.md").read_text(), written)


def _table_rows(report: str) -> dict[str, list[str]]:
    """Markdown table rows of the report: first cell -> the other cells (later tables win a clash)."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _check_report_figures(report: str, summary: dict) -> None:
    """The report's results, confusion and training tables show this run's figures (the paper's
    constants are printed whatever the run did, so they prove nothing about it)."""
    rows = _table_rows(report)
    fold = summary["folds"]["1"]
    results = next(cells for name, cells in rows.items() if name.startswith(f"1 ({fold['test_session']}"))
    pooled = next(cells for name, cells in rows.items() if "pooled" in name)
    for cells, m in ((results, fold), (pooled, summary["pooled"])):
        assert int(cells[0]) == m["n_test"]
        assert float(cells[1]) == pytest.approx(100 * m["wa"], abs=0.051)
        assert float(cells[2]) == pytest.approx(100 * m["ua"], abs=0.051)
        assert float(cells[3]) == pytest.approx(m["macro_f1"], abs=5e-4)
        assert float(cells[4]) == pytest.approx(m["weighted_f1"], abs=5e-4)
    average = next(cells for name, cells in rows.items() if "LOSO average" in name)
    mean = summary["loso_average"]["mean"]
    assert float(average[1].split("±")[0]) == pytest.approx(100 * mean["wa"], abs=0.051)
    for label, counts in zip(summary["pooled"]["labels"], summary["pooled"]["confusion"]):
        assert [int(c) for c in rows[label]] == counts, label
    training = rows["1"]
    assert training[0] == f"{fold['n_train']} / {fold['n_val']}"
    assert [int(training[1]), int(training[2])] == [fold["epochs_run"], fold["best_epoch"]]
    assert float(training[3]) == pytest.approx(100 * fold["best_val_ua"], abs=0.051)


def test_best_checkpoint_reloads_to_the_recorded_metrics(memory_run, corpus):
    out, _ = memory_run
    recorded = json.loads((out / "fold1" / "metrics.json").read_text())
    model = DMFModel.from_pretrained(out / "fold1")
    split = loso_split(corpus, 1, model.config.data.val_fraction, model.config.data.seed)
    again = evaluate(model, encode_utterances(split.test, model), batch_size=3)  # other batching, same result
    for key in ("wa", "ua", "macro_f1", "weighted_f1", "confusion", "predictions"):
        assert again[key] == recorded[key], key


def test_same_seed_same_metrics(memory_run, corpus, tmp_path):
    out, _ = memory_run
    run_training(tiny_config(), corpus, tmp_path / "again", [1], options=FitOptions(progress=False))
    first = strip_timing(json.loads((out / "fold1" / "metrics.json").read_text()))
    second = strip_timing(json.loads((tmp_path / "again" / "fold1" / "metrics.json").read_text()))
    assert first == second  # history (losses), predictions and metrics


def test_loss_falls(corpus, tmp_path):
    # naive fusion: its NLL falls steadily from random init (the memory term adds noise at this size)
    cfg = tiny_config(epochs=10, patience=10).replace("model", fusion="naive")
    run_training(cfg, corpus, tmp_path / "naive", [1], options=FitOptions(progress=False))
    history = json.loads((tmp_path / "naive" / "fold1" / "metrics.json").read_text())["history"]
    nll = [h["train_nll"] for h in history]
    assert len(nll) == 10
    assert sum(nll[-2:]) / 2 < nll[0] - 0.2, nll  # ln 4 = 1.39 at the start
    assert history[-1]["train_acc"] > history[0]["train_acc"], history


def test_rerun_skips_a_finished_fold(memory_run, corpus):
    out, summary = memory_run
    weights = out / "fold1" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_training(tiny_config(), corpus, out, [1], options=FitOptions(progress=False))
    assert weights.stat().st_mtime_ns == before
    assert again["pooled"] == json.loads(json.dumps(summary["pooled"]))


def test_other_config_into_same_out_dir_is_refused(memory_run, corpus):
    out, _ = memory_run
    with pytest.raises(ConfigError, match="different config"):
        run_training(tiny_config(lr=0.5), corpus, out, [1], options=FitOptions(progress=False))


@pytest.mark.parametrize("through_read", [False, True])
def test_interrupted_run_resumes_to_identical_results(memory_run, corpus, tmp_path, monkeypatch, through_read):
    # write_through_read keeps the last write's inputs pending: they must travel in the resume state
    config = tiny_config()
    if through_read:
        config = config.replace("model", write_through_read=True)
        out = tmp_path / "uninterrupted"
        run_training(config, corpus, out, [1], options=FitOptions(progress=False, checkpoint_every=2))
    else:
        out, _ = memory_run
    calls = {"n": 0}
    real_step = trainer.train_step

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # mid-epoch 1, after the resume state of step 4
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", failing_step)
    options = FitOptions(progress=False, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run_training(config, corpus, tmp_path / "r", [1], options=options)
    assert (tmp_path / "r" / "fold1" / "_resume" / "latest.json").is_file()
    monkeypatch.setattr(trainer, "train_step", real_step)
    notes = []
    run_training(config, corpus, tmp_path / "r", [1],
                 options=FitOptions(progress=False, checkpoint_every=2, log=notes.append))
    assert any("resuming at epoch 1, step 4" in n for n in notes), notes
    resumed = strip_timing(json.loads((tmp_path / "r" / "fold1" / "metrics.json").read_text()))
    uninterrupted = strip_timing(json.loads((out / "fold1" / "metrics.json").read_text()))
    resumed.pop("trained_utterances"), uninterrupted.pop("trained_utterances")
    assert resumed == uninterrupted


# -------------------------------------------------------------------------------------------- CLI


def _cli_config(tmp_path: Path) -> Path:
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"model": {"max_audio_samples": 16000}, "train": {"patience": 5}}))
    return path


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_finishes(corpus_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dmf.train", "--data", str(corpus_dir), "--out", str(out), "--preset", "tiny",
           "--fold", "2", "--epochs", "4", "--batch-size", "4", "--config", str(_cli_config(tmp_path)),
           "--checkpoint-every", "3", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    latest = out / "fold2" / "_resume" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists(), proc.stdout.read().decode()
    assert not (out / "fold2" / "metrics.json").exists()  # killed before the fold finished
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming at epoch" in done.stdout
    metrics = json.loads((out / "fold2" / "metrics.json").read_text())
    assert metrics["epochs_run"] >= 1 and len(metrics["history"]) == metrics["epochs_run"]
    assert (out / "metrics.json").is_file() and not (out / "fold2" / "_resume").exists()
    assert not list(out.glob(".fold2*"))  # nothing parked or staged left behind


def _invoke(args: list[str]):
    from dmf.train.__main__ import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("extra, message", [
    (["--fold", "9"], "fold 9 is out of range"),
    (["--fold", "x"], "--fold 'x'"),
    (["--fusion", "bogus"], "model.fusion"),
    (["--optimizer", "rmsprop"], "train.optimizer"),
    (["--precision", "fp16"], "train.precision"),
    (["--clip-grad", "-1"], "train.grad_clip"),
    (["--device", "gpu"], "--device 'gpu'"),
])
def test_cli_bad_options_one_line_exit_2(corpus_dir, tmp_path, extra, message):
    result = _invoke(["--data", str(corpus_dir), "--out", str(tmp_path / "o"), "--preset", "tiny", *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "o" / "fold1").exists()


def test_cli_missing_data_one_line_exit_2(tmp_path):
    result = _invoke(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]


def test_config_precedence_preset_file_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"epochs": 7, "lr": 0.1}, "model": {"dropout": 0.3}}))
    flags = dict(data="d", format=None, fusion="naive", audio_encoder="some/wav2vec2", text_encoder=None,
                 epochs=2, batch_size=None, optimizer=None, lr=None, seed=5)
    cfg = build_config("tiny", path, flags)
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.1  # flag beats file; file beats preset
    assert cfg.train.optimizer == "adamw" and cfg.model.embed_dim == 32  # preset kept
    assert cfg.model.dropout == 0.3 and cfg.model.fusion == "naive"
    assert cfg.model.audio_encoder == "some/wav2vec2" and cfg.model.audio_encoder_config is None
    assert cfg.model.text_encoder_config is not None  # untouched side keeps the tiny encoder
    assert cfg.train.seed == cfg.data.seed == 5 and cfg.data.path == "d"


def test_cli_module_imports_without_torch():
    code = "import sys, dmf.train.cli, dmf.train; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
