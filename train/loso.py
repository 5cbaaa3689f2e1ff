"""The leave-one-session-out driver: folds, per-fold files, pooled metrics, report
(docs/design.md, 'Evaluation protocol').

out_dir/
  config.json      the DMFConfig of the run (a re-run must use the same one)
  foldK/           complete checkpoint of fold K (best validation UA) + metrics.json + confusion.png
  metrics.json     per fold; "loso_average": mean +- std of each metric over the finished folds
                   (the paper's "average"); "pooled": over all their test predictions; throughput
  report.md        the same as tables, with the paper's figures

In a multi-process run (torchrun) every rank runs the folds together; rank 0 alone writes files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from dmf.config import ConfigError, DMFConfig
from dmf.data.corpus import Corpus, DataError
from dmf.fileio import atomic_write_json, atomic_write_text
from dmf.train import distributed
from dmf.train.dataset import AudioCache, check_fold, loso_split
from dmf.train.metrics import compute_metrics, confusion_title, plot_confusion
from dmf.train.report import render_report
from dmf.train.trainer import FitOptions, clear_resume, fit

METRICS_NAME = "metrics.json"


def _check_run_config(out_dir: Path, config: DMFConfig) -> None:
    """Resuming into a folder trained with another config would mix runs: refuse."""
    path = out_dir / "config.json"
    if path.is_file() and path.read_text() != config.to_json():
        raise ConfigError(f"{path} holds a different config: resume with the same options or use a new --out")
    if not path.is_file() and distributed.context().is_main:
        config.save(path)


def _check_labels(corpus: Corpus, config: DMFConfig) -> None:
    unknown = sorted({u.label for u in corpus.utterances} - set(config.model.labels))
    if unknown:
        raise DataError(f"corpus labels {unknown} are not among the model labels {config.model.labels}")


def run_fold(config: DMFConfig, corpus: Corpus, fold: int, out_dir: Path, audio: AudioCache,
             options: FitOptions) -> dict:
    """Train and test one fold; a fold with metrics.json is finished and only read back."""
    fold_dir = out_dir / f"fold{fold}"
    done = fold_dir / METRICS_NAME
    main = distributed.context().is_main
    if done.is_file():
        if main:
            clear_resume(fold_dir)  # a kill between writing metrics and clearing leaves one behind
        return json.loads(done.read_text())
    split = loso_split(corpus, fold, config.data.val_fraction, config.data.seed)
    metrics = fit(config, split, fold_dir, audio, options)
    if not main:
        return metrics
    plot_confusion(metrics["confusion"], metrics["labels"], fold_dir / "confusion.png",
                   title=confusion_title(config.model.fusion, fold, split.test_session, metrics["ua"]))
    atomic_write_json(done, metrics)
    clear_resume(fold_dir)
    return metrics


def finished_folds(out_dir: Path, n_sessions: int) -> dict[int, dict]:
    """Every fold of out_dir with a metrics.json (pooling covers folds of earlier invocations too)."""
    found = {}
    for fold in range(1, n_sessions + 1):
        path = out_dir / f"fold{fold}" / METRICS_NAME
        if path.is_file():
            found[fold] = json.loads(path.read_text())
    return found


def pooled_metrics(folds: dict[int, dict]) -> dict:
    """Metrics over the concatenated test predictions of all folds (not a mean of fold metrics)."""
    true = [y for f in folds.values() for y in f["predictions"]["true"]]
    pred = [y for f in folds.values() for y in f["predictions"]["pred"]]
    labels = next(iter(folds.values()))["labels"]
    return compute_metrics(true, pred, labels)


AVERAGED = ("wa", "ua", "macro_f1", "weighted_f1")  # the metrics averaged over folds


def loso_average(folds: dict[int, dict]) -> dict:
    """The paper's "average" of a LOSO run: mean and standard deviation over the folds of each
    fold's own metrics (population std, ddof = 0: the folds are the whole protocol, not a sample)."""
    values = {key: np.array([f[key] for _, f in sorted(folds.items())], dtype=np.float64) for key in AVERAGED}
    return {"folds": sorted(folds), "std_ddof": 0,
            "mean": {key: float(v.mean()) for key, v in values.items()},
            "std": {key: float(v.std()) for key, v in values.items()}}


def summarize(folds: dict[int, dict], n_sessions: int) -> dict:
    seconds = sum(f["train_seconds"] for f in folds.values())
    utterances = sum(f["trained_utterances"] for f in folds.values())
    per_fold = {str(k): {key: v for key, v in f.items() if key not in ("predictions", "history")}
                for k, f in sorted(folds.items())}
    return {"n_sessions": n_sessions, "folds": per_fold, "loso_average": loso_average(folds),
            "pooled": pooled_metrics(folds),
            "throughput": {"utterances_per_s": utterances / seconds if seconds > 0 else 0.0,
                           "seconds": seconds}}


def run_training(config: DMFConfig, corpus: Corpus, out_dir: str | Path, folds: Sequence[int] | None = None,
                 progress: bool = True, options: FitOptions | None = None) -> dict:
    """Train and test the given LOSO folds (default: all). Writes out_dir as described above and
    returns the summary (the content of out_dir/metrics.json). Re-running resumes or skips folds."""
    out_dir = Path(out_dir)
    n_sessions = len(corpus.sessions())
    folds = list(range(1, n_sessions + 1)) if folds is None else list(folds)
    if not folds:
        raise ConfigError("no folds to run")
    for fold in folds:
        check_fold(corpus, fold)
    _check_labels(corpus, config)
    options = options or FitOptions(progress=progress)
    _check_run_config(out_dir, config)
    audio = AudioCache()
    for fold in folds:
        run_fold(config, corpus, fold, out_dir, audio, options)
        distributed.barrier()  # rank 0 has written the fold's files before any rank reads them
    if not distributed.context().is_main:
        return distributed.broadcast_object(None)
    summary = summarize(finished_folds(out_dir, n_sessions), n_sessions)
    atomic_write_json(out_dir / METRICS_NAME, summary)
    atomic_write_text(out_dir / "report.md", render_report(summary, config))
    return distributed.broadcast_object(summary)
