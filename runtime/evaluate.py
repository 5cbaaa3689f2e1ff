"""`dmf evaluate`, as a library: an exported artifact scored on a labelled set (UA, WA, macro and
weighted F1, confusion matrix, per-class precision / recall / F1).

Labelled sets: a manifest as `dmf predict` reads it plus a `label` column (`dmf.data.manifest`:
the same parsing, line numbers and checks), or a corpus as `dmf train` reads it (an IEMOCAP tree or
a training manifest) with the session a LOSO fold held out, i.e. the clips training reported its
test figures on. Labels must be the artifact's (dmf.json `labels`); any other value is refused
before anything runs, naming the file, row and value.

The metrics follow training's (`dmf.train.metrics`, the IEMOCAP protocol): WA = accuracy; UA = mean
recall over the classes present in the truth (scikit-learn's balanced accuracy); macro / weighted
F1 over the classes seen in truth or prediction. scikit-learn computes them: it is the `eval`
extra, not a runtime dependency (`require_sklearn`). Torch-free.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dmf import install_hint
from dmf.data import DataError
from dmf.data.manifest import ManifestError, load_prediction_rows, read_rows

from .bulk import predict_rows
from .predictor import Predictor

LABELLED_REQUIRED = ("audio", "text", "label")


@dataclass(frozen=True)
class LabelledRow:
    """One clip to score; the attributes `bulk.predict_rows` reads, plus its true label."""

    where: str  # "line N" / "item N" of a manifest, or the utterance id of a corpus
    id: str  # the row's id (manifest: its id or audio value; corpus: the utterance id)
    audio: Path
    text: str
    label: str  # one of the artifact's labels


def require_sklearn() -> None:
    """Checked before the model loads: the metrics need scikit-learn (the `eval` extra)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError(f"`dmf evaluate` needs the [eval] extra (scikit-learn): {install_hint('eval')}") from None


# -------------------------------------------------------------------------------------- inputs

def _label_problems(path: Path, labels: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({where: label}, problems) for every row of a labelled manifest: a missing, non-string or
    unknown label is a problem naming the row and the value."""
    parsed, problems = read_rows(path, LABELLED_REQUIRED)
    found: dict[str, str] = {}
    for where, row in parsed:
        value = row.get("label") if isinstance(row, dict) else None
        if not isinstance(row, dict):
            continue  # a malformed row: load_prediction_rows names its problem
        if isinstance(value, str) and value.strip() in labels:
            found[where] = value.strip()
        else:
            problems.append(f"{where}: unknown label {value!r}: expected one of {', '.join(labels)} "
                            "(the artifact's dmf.json labels)")
    return found, problems


def load_labelled_manifest(path: str | Path, labels: Sequence[str]) -> list[LabelledRow]:
    """The rows of a manifest with `audio`, `text`, `label` (and optional `id`), every one checked
    before anything runs: raises ManifestError listing each bad row (unknown labels included),
    DataError for an unreadable or empty file."""
    path = Path(path)
    found, problems = _label_problems(path, labels)
    try:
        rows = load_prediction_rows(path)
    except ManifestError as exc:
        problems = sorted(set(problems) | set(exc.problems), key=_line_order)
        raise ManifestError(path, problems) from None
    if problems:
        raise ManifestError(path, problems)
    return [LabelledRow(r.where, r.id, r.audio, r.text, found[r.where]) for r in rows]


def _line_order(problem: str) -> tuple[int, str]:
    head = problem.split(":", 1)[0].split()
    return (int(head[-1]) if head and head[-1].isdigit() else 0, problem)


def load_held_out_fold(data: str | Path, fold: int, labels: Sequence[str]) -> tuple[str, list[LabelledRow]]:
    """(session, rows): the session LOSO fold `fold` holds out of the corpus at `data` (an IEMOCAP
    tree or a training manifest, read as `dmf train` reads it), sorted by id as training tests it."""
    from dmf.data import load_corpus
    from dmf.data.splits import check_fold

    corpus = load_corpus(data, labels=tuple(labels) if Path(data).is_file() else None)
    session = check_fold(corpus, fold)
    test = sorted((u for u in corpus.utterances if u.session == session), key=lambda u: u.id)
    unknown = next((u for u in test if u.label not in labels), None)
    if unknown is not None:
        raise DataError(f"{data}: utterance {unknown.id} has label {unknown.label!r}, not one of the "
                        f"artifact's labels ({', '.join(labels)})")
    return session, [LabelledRow(u.id, u.id, u.audio_path, u.text, u.label) for u in test]


# ------------------------------------------------------------------------------------- scoring

class _Collected:
    """The writer `bulk.predict_rows` fills: keeps each row's Prediction (None when it failed)."""

    def __init__(self) -> None:
        self.predictions: dict[str, Any] = {}

    def write(self, row_id: str, prediction, error: str | None) -> None:
        self.predictions[row_id] = prediction

    def flush(self) -> None:
        pass


def metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """{n, wa, ua, macro_f1, weighted_f1, confusion (rows = true, columns = predicted, in `labels`
    order), per_class {label: precision, recall, f1, support}}; y_* are indices into `labels`."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, classification_report,
                                 confusion_matrix, f1_score)

    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    everything = list(range(len(labels)))
    seen = sorted(set(y_true.tolist()) | set(y_pred.tolist()))  # training's F1 classes
    with warnings.catch_warnings():  # balanced accuracy warns about predicted-only classes, then drops them (UA's rule)
        warnings.simplefilter("ignore")
        ua = balanced_accuracy_score(y_true, y_pred)
    report = classification_report(y_true, y_pred, labels=everything, target_names=list(labels),
                                   output_dict=True, zero_division=0)
    return {
        "n": int(y_true.size),
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(ua),
        "macro_f1": float(f1_score(y_true, y_pred, labels=seen, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=seen, average="weighted", zero_division=0)),
        "confusion": confusion_matrix(y_true, y_pred, labels=everything).tolist(),
        "per_class": {lab: {"precision": report[lab]["precision"], "recall": report[lab]["recall"],
                            "f1": report[lab]["f1-score"], "support": int(report[lab]["support"])}
                      for lab in labels},
    }


def evaluate(predictor: Predictor, rows: Sequence[LabelledRow], batch_size: int = 16,
             advance: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Score every row (batches of `batch_size`, capped by max_batch) and measure. Returns
    `metrics(...)` plus `labels`, `predictions` [{id, label, predicted}] and `errors` ('line N:
    message' for rows whose audio failed to decode or whose scores were not finite: left out of the
    metrics). Raises ValueError when no row could be scored."""
    require_sklearn()
    collected = _Collected()
    errors = predict_rows(predictor, rows, collected, batch_size, advance)
    scored = [(r, collected.predictions[r.id]) for r in rows if collected.predictions.get(r.id) is not None]
    if not scored:
        raise ValueError(f"none of the {len(rows)} rows could be scored: {errors[0] if errors else ''}")
    index = {lab: i for i, lab in enumerate(predictor.labels)}
    result = metrics([index[r.label] for r, _ in scored], [index[p.label] for _, p in scored], predictor.labels)
    return {**result, "labels": list(predictor.labels),
            "predictions": [{"id": r.id, "label": r.label, "predicted": p.label} for r, p in scored],
            "errors": errors}


def plot_confusion(report: dict[str, Any], path: str | Path, title: str = "") -> None:
    """The report's confusion matrix as a PNG (scikit-learn's display, counts annotated), written
    atomically. Needs matplotlib."""
    from dmf.fileio import atomic_write

    from .conversation import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.4, 4.0), dpi=120)
    try:
        ConfusionMatrixDisplay(np.asarray(report["confusion"]), display_labels=report["labels"]).plot(
            ax=ax, cmap="Blues", colorbar=True)
        ax.set_title(title or f"UA {report['ua']:.3f}, WA {report['wa']:.3f}, n = {report['n']}")
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
