"""Settings chosen on validation splits only (`dmf train --select sweep.json`, issue 28).

A sweep file lists candidates, each a partial config (sections "model" and "train") laid over the
run's config (preset < --config < flags < candidate):

    {"candidates": {"preset": {}, "tau-min-0.1": {"model": {"read_temperature_min": 0.1}}}}

For each fold, every candidate is trained on the fold's training sessions (`run_training`, one
LOSO run folder per candidate under out/candidates/NAME/) and scored by its best validation UA,
the UA of the checkpoint it keeps, on the fold's validation split: a stratified share of the
training sessions, the same for every candidate (a candidate may not change the "data" section).
The candidate with the highest validation UA is chosen for that fold, the first listed on a tie
(list the current setting first, so it stays unless beaten). The fold's reported result is the
chosen candidate's test UA. The held-out session never enters the choice: its figures are
computed by each candidate's run (the trainer tests every fold) but the choice reads
`best_val_ua` only.

"overall" names the candidate with the best mean validation UA over the folds: a setting to
keep as a default. It has seen every session's validation utterances, so its own LOSO test
figure is optimistic; a second corpus that no setting was chosen on is its honest check.

out/selection.json and out/selection.md hold the choice per fold, the LOSO mean +- std and the
pooled metrics of the chosen candidates' test predictions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from dmf.config import ConfigError, DMFConfig
from dmf.data.corpus import Corpus
from dmf.fileio import atomic_write_json, atomic_write_text
from dmf.train import distributed
from dmf.train.loso import AVERAGED, finished_folds, loso_average, pooled_metrics, run_training
from dmf.train.options import FitOptions

CANDIDATE_SECTIONS = ("model", "train")  # what a candidate may change ("data" would change the validation split)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a candidate name is a folder name


def load_sweep(path: str | Path) -> dict[str, dict]:
    """The sweep file's candidates {name: partial config}, in file order; ConfigError names the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file not found: {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep file {path} is not readable JSON: {exc}") from None
    candidates = data.get("candidates") if isinstance(data, dict) else None
    if not isinstance(candidates, dict) or not candidates:
        raise ConfigError(f"sweep file {path}: expected {{\"candidates\": {{NAME: {{\"model\": ..., \"train\": ...}}}}}} "
                          "with at least one candidate")
    for name, layer in candidates.items():
        _check_candidate(path, name, layer)
    return candidates


def _check_candidate(path: Path, name: str, layer: object) -> None:
    if not NAME.match(name):
        raise ConfigError(f"sweep file {path}: candidate name {name!r} must be a folder name (letters, digits, _ . -)")
    if not isinstance(layer, dict):
        raise ConfigError(f"sweep file {path}: candidate {name!r} must be an object of config sections")
    if "data" in layer:
        raise ConfigError(f"sweep file {path}: candidate {name!r} sets 'data': every candidate must be scored "
                          "on the same validation split")
    unknown = set(layer) - set(CANDIDATE_SECTIONS)
    if unknown:
        raise ConfigError(f"sweep file {path}: candidate {name!r} has unknown section(s) {sorted(unknown)}; "
                          f"expected {CANDIDATE_SECTIONS}")


def choose(val_ua: dict[str, float]) -> str:
    """The candidate with the highest validation UA; the first listed on a tie."""
    best = max(val_ua.values())
    return next(name for name, ua in val_ua.items() if ua == best)


def run_selection(configs: dict[str, DMFConfig], corpus: Corpus, out_dir: str | Path,
                  folds: Sequence[int] | None = None, options: FitOptions | None = None) -> dict:
    """Train every candidate config on every fold (fold by fold, so an interrupted sweep has whole
    folds; re-running resumes), choose per fold on validation UA, write selection.json/.md and
    return the summary."""
    out_dir = Path(out_dir)
    if not configs:
        raise ConfigError("no candidates to select from")
    if len({c.data for c in configs.values()}) != 1:
        raise ConfigError("the candidates differ in the 'data' section: they must share the validation split")
    n_sessions = len(corpus.sessions())
    folds = list(range(1, n_sessions + 1)) if folds is None else list(folds)
    for fold in folds:
        for name, config in configs.items():
            run_training(config, corpus, out_dir / "candidates" / name, [fold], options=options)
    if not distributed.context().is_main:
        return distributed.broadcast_object(None)
    runs = {name: finished_folds(out_dir / "candidates" / name, n_sessions) for name in configs}
    summary = summarize_selection(runs, folds)
    atomic_write_json(out_dir / "selection.json", summary)
    atomic_write_text(out_dir / "selection.md", render_selection(summary))
    return distributed.broadcast_object(summary)


def summarize_selection(runs: dict[str, dict[int, dict]], folds: Sequence[int]) -> dict:
    """runs: {candidate: {fold: that fold's metrics.json}} -> the choice per fold and the chosen
    candidates' test figures (LOSO mean +- std, pooled)."""
    per_fold, chosen_metrics = {}, {}
    for fold in folds:
        val_ua = {name: float(run[fold]["best_val_ua"]) for name, run in runs.items()}
        name = choose(val_ua)
        chosen_metrics[fold] = runs[name][fold]
        per_fold[str(fold)] = {"val_ua": val_ua, "chosen": name, "test_session": runs[name][fold]["test_session"],
                               **{key: runs[name][fold][key] for key in (*AVERAGED, "n_test")}}
    mean_val = {name: float(np.mean([run[f]["best_val_ua"] for f in folds])) for name, run in runs.items()}
    return {"rule": "per fold, the highest best_val_ua on the fold's validation split (first listed on a tie)",
            "candidates": list(runs), "folds": per_fold, "loso_average": loso_average(chosen_metrics),
            "pooled": pooled_metrics(chosen_metrics),
            "overall": {"mean_val_ua": mean_val, "chosen": choose(mean_val)}}


def render_selection(summary: dict) -> str:
    """Markdown: validation UA of each candidate per fold, the choice and its test UA, the average."""
    names = summary["candidates"]
    lines = ["# Selection on validation splits", "", f"Rule: {summary['rule']}. Test UA is the chosen candidate's.", "",
             "| fold (test) | " + " | ".join(f"val UA % {n}" for n in names) + " | chosen | test UA % |",
             "|---|" + "---:|" * len(names) + "---|---:|"]
    for fold, row in summary["folds"].items():
        cells = " | ".join(f"{100 * row['val_ua'][n]:.1f}" for n in names)
        lines.append(f"| {fold} ({row['test_session']}) | {cells} | {row['chosen']} | {100 * row['ua']:.1f} |")
    avg = summary["loso_average"]
    lines += ["", f"LOSO average of the chosen: UA {100 * avg['mean']['ua']:.1f} ± {100 * avg['std']['ua']:.1f} % "
                  f"(mean ± std over {len(avg['folds'])} folds), pooled UA {100 * summary['pooled']['ua']:.1f} %.",
              "", "Best mean validation UA over the folds (a default to keep; its test figure is optimistic): "
                  f"**{summary['overall']['chosen']}** "
                  + ", ".join(f"{n} {100 * v:.1f}" for n, v in summary["overall"]["mean_val_ua"].items()) + "."]
    return "\n".join(lines) + "\n"
