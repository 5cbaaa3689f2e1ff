"""Issue 28: the per-epoch diagnostics of memory fusion, and the selection procedure on validation splits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dmf.config import ConfigError, preset
from dmf.fusion import MemoryReader
from dmf.model import DMFModel
from dmf.train import diagnostics
from dmf.train.diagnostics import batchnorm_stats, effective_rank, memory_diversity, read_stats
from dmf.train.loso import run_training
from dmf.train.trainer import FitOptions



def tiny_config(**train):
    """The tiny preset at 1 s clips, batches of 4, 2 epochs: seconds per fold."""
    cfg = preset("tiny", max_audio_samples=16000)
    values = dict(epochs=2, batch_size=4, patience=2, seed=0)
    values.update(train)
    return cfg.replace("train", **values)




@pytest.fixture(scope="module")
def logged_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "memory"
    run_training(tiny_config(), corpus, out, [1], options=FitOptions(progress=False, checkpoint_every=0))
    return json.loads((out / "fold1" / "metrics.json").read_text())


# ------------------------------------------------------------------------------------ the run's log


def test_each_epoch_logs_the_diagnostics_with_sane_values(logged_run):
    history = logged_run["history"]
    assert len(history) == 2
    for entry in history:
        # writer detached (tiny preset): the similarity term still trains the writer itself
        for group in ("reader", "composer", "writer", "network"):
            assert math.isfinite(entry[f"grad_{group}"]) and entry[f"grad_{group}"] > 0, group
        assert -2.0 <= entry["train_similarity"] <= 2.0  # two memories, each a mean cosine in [-1, 1]
        figures = entry["diagnostics"]
        for reader in ("read_text", "read_audio"):
            r = figures[reader]
            assert 0.0 <= r["tau_at_min"] <= 1.0 and 0.0 <= r["tau_at_max"] <= 1.0
            assert 1e-4 <= r["tau_mean"] <= 10.0  # inside the clamp
            assert 0.0 <= r["entropy"] <= 1.0 + 1e-6 and 0.0 <= r["entropy_gumbel"] <= 1.0 + 1e-6
            assert 1 <= r["slots_used"] <= 16
        for memory in ("memory_audio", "memory_text"):
            m = figures[memory]
            assert 1.0 <= m["effective_rank"] <= 16.0 + 1e-6 and -1.0 <= m["mean_cosine"] <= 1.0
        for norm in ("batchnorm_norm1", "batchnorm_norm2"):
            assert figures[norm]["mean_shift"] >= 0 and math.isfinite(figures[norm]["log_var_ratio"])


def test_the_log_does_not_change_the_training(logged_run, corpus, tmp_path, monkeypatch):
    """The diagnostics draw no number from the training RNG streams and write no state: the same
    run with them switched off gives the same losses, validation UAs and test predictions."""
    monkeypatch.setattr(diagnostics, "epoch_diagnostics", lambda *a, **k: {})
    monkeypatch.setattr(diagnostics, "grad_norms", lambda model: {})
    run_training(tiny_config(), corpus, tmp_path / "quiet", [1], options=FitOptions(progress=False, checkpoint_every=0))
    quiet = json.loads((tmp_path / "quiet" / "fold1" / "metrics.json").read_text())
    assert [(e["train_loss"], e["val_ua"]) for e in quiet["history"]] == \
           [(e["train_loss"], e["val_ua"]) for e in logged_run["history"]]
    assert quiet["predictions"] == logged_run["predictions"]
    assert "diagnostics" not in quiet["history"][0] and "grad_reader" not in quiet["history"][0]


def test_naive_fusion_logs_network_gradients_only():
    model = DMFModel(preset("tiny", fusion="naive", max_audio_samples=16000), texts=["a b"], pretrained=False)
    assert set(diagnostics.grad_groups(model)) == {"network"}
    assert diagnostics.epoch_diagnostics(model, (None, None, None), 4) == {}


# ---------------------------------------------------------------------------------- the figures


def test_a_collapsed_memory_has_effective_rank_one():
    row = torch.randn(1, 32)
    collapsed = row.repeat(16, 1)  # 16 identical slots
    figures = memory_diversity(collapsed)
    assert figures["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert figures["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    diverse = torch.linalg.qr(torch.randn(32, 16))[0].T  # 16 orthonormal slots
    assert effective_rank(diverse) == pytest.approx(16.0, rel=1e-6)
    assert memory_diversity(diverse)["mean_cosine"] == pytest.approx(0.0, abs=1e-5)


def test_a_temperature_at_the_clamp_is_counted_and_reads_one_slot():
    reader = MemoryReader(slots=8, tau_min=1e-4, tau_max=10.0)
    with torch.no_grad():  # |Linear(s)| = 0 -> clamped up to tau_min for every row
        reader.temperature.weight.zero_()
        reader.temperature.bias.zero_()
    x, memory = torch.randn(5, 4), torch.randn(8, 4)
    stats = read_stats(reader, x, memory, torch.Generator().manual_seed(0))
    assert stats["tau_at_min"] == 1.0 and stats["tau_at_max"] == 0.0
    assert stats["entropy"] < 1e-3  # softmax(s / 1e-4): one slot per row
    with torch.no_grad():
        reader.temperature.bias.fill_(1e6)  # -> clamped down to tau_max: near-uniform reads
    stats = read_stats(reader, x, memory, torch.Generator().manual_seed(0))
    assert stats["tau_at_max"] == 1.0 and stats["entropy"] > 0.9


def test_batchnorm_statistics_against_small_batches():
    norm = torch.nn.BatchNorm1d(6)
    inputs = torch.randn(64, 6) * 3 + 2
    with torch.no_grad():
        norm.running_mean.copy_(inputs.mean(0))
        norm.running_var.copy_(inputs.var(0, unbiased=False))
    whole = batchnorm_stats(norm, inputs, batch_size=64)  # one batch = the set: no gap
    assert whole["mean_shift"] == pytest.approx(0.0, abs=1e-5) and whole["log_var_ratio"] == pytest.approx(0.0, abs=1e-4)
    small = batchnorm_stats(norm, inputs, batch_size=4)  # batches of 4 drift from the running statistics
    assert small["mean_shift"] > 0.2 and small["log_var_ratio"] < 0


# ------------------------------------------------------------------------- selection on validation


def _fold(val_ua: float, ua: float, session: str = "Ses01") -> dict:
    preds = {"ids": ["a", "b"], "true": [0, 1], "pred": [0, 1] if ua == 1.0 else [0, 0]}
    return {"best_val_ua": val_ua, "ua": ua, "wa": ua, "macro_f1": ua, "weighted_f1": ua, "n_test": 2,
            "test_session": session, "labels": ["neu", "hap"], "predictions": preds}


def test_the_choice_reads_validation_ua_never_the_test():
    from dmf.train.select import summarize_selection

    runs = {"preset": {1: _fold(0.50, 1.0), 2: _fold(0.70, 0.5, "Ses02")},
            "other": {1: _fold(0.60, 0.5), 2: _fold(0.70, 1.0, "Ses02")}}
    summary = summarize_selection(runs, [1, 2])
    assert summary["folds"]["1"]["chosen"] == "other"  # higher validation UA, lower test UA
    assert summary["folds"]["1"]["ua"] == 0.5  # the chosen candidate's test UA is reported
    assert summary["folds"]["2"]["chosen"] == "preset"  # a tie keeps the first listed
    assert summary["loso_average"]["mean"]["ua"] == pytest.approx(0.5)
    assert summary["overall"]["chosen"] == "other"  # mean val 0.65 against 0.60
    assert summary["overall"]["mean_val_ua"]["preset"] == pytest.approx(0.6)


@pytest.mark.parametrize("content, message", [
    ({"candidates": {}}, "at least one candidate"),
    ({"candidates": {"a": {"data": {"seed": 3}}}}, "same validation split"),
    ({"candidates": {"../x": {}}}, "folder name"),
    ({"candidates": {"a": {"modle": {}}}}, "unknown section"),
])
def test_bad_sweep_files_are_refused_by_name(tmp_path, content, message):
    from dmf.train.select import load_sweep

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_cli_select_trains_each_candidate_and_keeps_the_best_on_validation(corpus_dir, tmp_path):
    from typer.testing import CliRunner

    from dmf.cli import app

    (tmp_path / "base.json").write_text(json.dumps({"model": {"max_audio_samples": 16000},
                                                    "train": {"batch_size": 4, "epochs": 1}}))
    (tmp_path / "sweep.json").write_text(json.dumps({"candidates": {
        "preset": {}, "w1": {"model": {"similarity_weight": 1.0}}}}))
    out = tmp_path / "sel"
    result = CliRunner().invoke(app, ["train", "--data", str(corpus_dir),
                                      "--out", str(out), "--preset", "tiny", "--config", str(tmp_path / "base.json"),
                                      "--fold", "2", "--select", str(tmp_path / "sweep.json"), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "selection.json").read_text())
    val = {name: json.loads((out / "candidates" / name / "fold2" / "metrics.json").read_text())["best_val_ua"]
           for name in ("preset", "w1")}
    assert summary["folds"]["2"]["val_ua"] == val
    chosen = summary["folds"]["2"]["chosen"]
    assert val[chosen] == max(val.values())
    chosen_test = json.loads((out / "candidates" / chosen / "fold2" / "metrics.json").read_text())["ua"]
    assert summary["folds"]["2"]["ua"] == chosen_test
    weights = {name: json.loads((out / "candidates" / name / "config.json").read_text())["model"]["similarity_weight"]
               for name in ("preset", "w1")}
    assert weights == {"preset": 0.1, "w1": 1.0}  # the candidate's layer lands over preset, file and flags


def test_plot_command_draws_runs_and_names_a_missing_fold(logged_run, tmp_path):
    import subprocess
    import sys

    fold = tmp_path / "fold1"
    fold.mkdir()
    (fold / "metrics.json").write_text(json.dumps(logged_run))
    naive = {"history": [{k: v for k, v in e.items() if k != "diagnostics"} for e in logged_run["history"]]}
    (tmp_path / "naive.json").write_text(json.dumps(naive))  # no memory figures: those panels stay empty
    out = tmp_path / "diag.png"
    command = [sys.executable, "-m", "dmf.train.diagnostics", f"memory={fold}", f"naive={tmp_path / 'naive.json'}",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(command[:3] + [str(tmp_path / "nowhere"), "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------- BatchNorm recalibration (#28)


def _random_rows(cfg, n: int, seed: int = 0) -> "Batchable":
    from dmf.train.dataset import Batchable

    g = torch.Generator().manual_seed(seed)
    tokens = cfg.model.max_tokens
    return Batchable(audio=torch.randn(n, cfg.model.max_audio_samples, generator=g) * 0.1,
                     input_ids=torch.randint(5, 60, (n, tokens), generator=g),
                     attention_mask=torch.ones(n, tokens, dtype=torch.long),
                     labels=torch.randint(0, len(cfg.model.labels), (n,), generator=g), ids=[str(i) for i in range(n)])


def test_recalibrated_batchnorm_holds_the_statistics_evaluation_sees():
    """After recalibration each composer BatchNorm's running mean / variance are the averages of
    the per-batch mean / unbiased variance of its inputs in eval mode (noiseless read, dropout off),
    the memory is not written, and momentum and eval mode are restored."""
    from dmf.train import distributed
    from dmf.train.trainer import recalibrate_batchnorm

    cfg = tiny_config()
    model = DMFModel(cfg, texts=["a b c"], pretrained=False)
    data = _random_rows(cfg, 12)
    model.train()
    model(*data.rows(torch.arange(4))[:3])  # a training forward: writes memory, moves the running stats
    norms = (model.fusion.composer.norm1, model.fusion.composer.norm2)
    memory = [b.clone() for name, b in model.named_buffers() if "memory" in name]
    recalibrate_batchnorm(model, data, 4, distributed.Context())
    assert not model.training and all(n.momentum == 0.1 for n in norms)
    assert all(torch.equal(a, b) for a, b in zip(memory, [b for name, b in model.named_buffers() if "memory" in name]))
    handles, captured = diagnostics._capture_inputs(norms)
    with torch.no_grad():
        for index in torch.arange(12).split(4):
            model(*data.rows(index)[:3])
    for h in handles:
        h.remove()
    for norm, inputs in zip(norms, captured):
        assert len(inputs) == 3  # three eval batches of 4
        torch.testing.assert_close(norm.running_mean, torch.stack([x.mean(0) for x in inputs]).mean(0))
        torch.testing.assert_close(norm.running_var, torch.stack([x.var(0) for x in inputs]).mean(0))
        assert batchnorm_stats(norm, torch.cat(inputs), 4)["mean_shift"] < 1.0


def test_training_recalibrates_before_each_validation_when_asked(corpus, tmp_path, monkeypatch):
    from dmf.train import trainer

    calls = []
    monkeypatch.setattr(trainer, "recalibrate_batchnorm", lambda model, data, bs, ctx: calls.append((len(data), bs)))
    run_training(tiny_config(recalibrate_batchnorm=False), corpus, tmp_path / "off", [1],
                 options=FitOptions(progress=False, checkpoint_every=0))
    assert calls == []
    assert preset("tiny").train.recalibrate_batchnorm and not preset("paper").train.recalibrate_batchnorm
    run_training(tiny_config(), corpus, tmp_path / "on", [1], options=FitOptions(progress=False, checkpoint_every=0))
    metrics = json.loads((tmp_path / "on" / "fold1" / "metrics.json").read_text())
    assert calls == [(metrics["n_train"], 4)] * 2  # once per epoch, over the training rows
