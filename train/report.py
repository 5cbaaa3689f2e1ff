"""The run's Markdown report: per-fold metrics, their LOSO average (mean +- std, the figure the
paper reports) and the pooled metrics, next to the paper's figures."""

from __future__ import annotations

from dmf.config import DMFConfig

# Paper, the average over the five IEMOCAP LOSO folds (WA %, UA %, F1).
PAPER = {"memory": (76.8, 77.3, 0.77), "naive": (74.3, 75.2, 0.74)}


def _row(name: str, m: dict) -> str:
    return (f"| {name} | {m['n_test']} | {100 * m['wa']:.1f} | {100 * m['ua']:.1f} | "
            f"{m['macro_f1']:.3f} | {m['weighted_f1']:.3f} |")


def _results_table(summary: dict) -> list[str]:
    lines = ["| Fold (test session) | n | WA % | UA % | macro F1 | weighted F1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, fold in sorted(summary["folds"].items(), key=lambda kv: int(kv[0])):
        lines.append(_row(f"{key} ({fold['test_session']})", fold))
    if summary.get("loso_average"):
        lines.append(_average_row(summary["loso_average"]))
    if summary.get("pooled"):
        lines.append(_row("**pooled** (all test predictions)", summary["pooled"]))
    return lines


def _average_row(average: dict) -> str:
    mean, std = average["mean"], average["std"]
    cells = [f"{100 * mean[k]:.1f} ± {100 * std[k]:.1f}" for k in ("wa", "ua")]
    cells += [f"{mean[k]:.3f} ± {std[k]:.3f}" for k in ("macro_f1", "weighted_f1")]
    return f"| **LOSO average** (mean ± std over {len(average['folds'])} folds) | | " + " | ".join(cells) + " |"


def average_line(summary: dict) -> str:
    """One line: the LOSO mean +- std of WA, UA, macro F1 (what `dmf train` prints)."""
    average = summary["loso_average"]
    mean, std = average["mean"], average["std"]
    return (f"LOSO average over {len(average['folds'])} fold(s) (mean ± std, the paper's \"average\"): "
            f"WA {100 * mean['wa']:.1f} ± {100 * std['wa']:.1f} %, UA {100 * mean['ua']:.1f} ± {100 * std['ua']:.1f} %, "
            f"macro F1 {mean['macro_f1']:.3f} ± {std['macro_f1']:.3f}")


def _training_table(summary: dict) -> list[str]:
    lines = ["| Fold | train / val | epochs | best epoch | best val UA % | train s | utt/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, fold in sorted(summary["folds"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {key} | {fold['n_train']} / {fold['n_val']} | {fold['epochs_run']} | "
                     f"{fold['best_epoch']} | {100 * fold['best_val_ua']:.1f} | {fold['train_seconds']:.1f} | "
                     f"{fold['utterances_per_s']:.1f} |")
    return lines


def _confusion_table(pooled: dict) -> list[str]:
    labels = pooled["labels"]
    lines = ["| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name, row in zip(labels, pooled["confusion"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def render_report(summary: dict, config: DMFConfig) -> str:
    """Markdown for out_dir/report.md from the out_dir/metrics.json summary."""
    m, t = config.model, config.train
    lines = [f"# DMF training report: fusion `{m.fusion}`", "",
             f"Leave-one-session-out, folds {', '.join(sorted(summary['folds'], key=int))} "
             f"of {summary['n_sessions']}. Audio encoder `{m.audio_encoder}`, text encoder `{m.text_encoder}`, "
             f"optimizer {t.optimizer} (lr {t.lr}, memory lr {t.memory_lr}), batch {t.batch_size}, "
             f"up to {t.epochs} epochs (patience {t.patience}), seed {t.seed}, "
             f"gradient clipping {t.grad_clip or 'none'}, precision {t.precision}. "
             "The checkpoint of each fold is the best validation UA on a split of the training sessions. "
             "The LOSO average is the mean ± std (ddof 0) of the folds' own metrics, which is what the paper "
             "reports; pooled is computed over all folds' test predictions together.",
             "", "## Test results", "", *_results_table(summary), ""]
    if summary.get("pooled"):
        lines += ["Pooled confusion matrix (counts):", "", *_confusion_table(summary["pooled"]), ""]
    lines += ["Per-fold confusion matrices: `foldK/confusion.png`.", "", "## Training", "",
              *_training_table(summary), "",
              f"Throughput over all folds: {summary['throughput']['utterances_per_s']:.1f} utterances/s "
              f"in {summary['throughput']['seconds']:.1f} s of training steps.", "",
              "## Paper (IEMOCAP, average over the 5 LOSO folds), for reference", "",
              "| Model | WA % | UA % | F1 |", "|---|---:|---:|---:|"]
    for name, (wa, ua, f1) in PAPER.items():
        lines.append(f"| {name} fusion | {wa} | {ua} | {f1} |")
    return "\n".join(lines) + "\n"
