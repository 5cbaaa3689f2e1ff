"""Evaluation metrics of the IEMOCAP protocol: WA, UA, macro/weighted F1, confusion.

The protocol is in docs/design.md, 'Evaluation protocol'.

Predictions are class indices into `labels`. UA is the mean per-class recall over the classes that
occur in the ground truth (a class with no test utterance has no recall); it is not accuracy.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from dmf.fileio import atomic_write_bytes


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> np.ndarray:
    """(C, C) counts; row = true class, column = predicted class, in `labels` order."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(num_labels)))


def unweighted_accuracy(matrix: np.ndarray) -> float:
    """Mean recall over the classes with at least one true example (balanced accuracy)."""
    support = matrix.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    recall = np.diag(matrix)[present] / support[present]
    return float(recall.mean())


def compute_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """{wa, ua, macro_f1, weighted_f1, confusion (list of rows), labels, n_test}."""
    from sklearn.metrics import accuracy_score, f1_score

    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need equally long, non-empty label lists; got {y_true.size} and {y_pred.size}")
    matrix = confusion(y_true, y_pred, len(labels))
    # Macro F1 over classes seen in truth or prediction: a class absent from both has no F1.
    seen = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    return {
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": unweighted_accuracy(matrix),
        "macro_f1": float(f1_score(y_true, y_pred, labels=seen, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=seen, average="weighted", zero_division=0)),
        "confusion": matrix.tolist(),
        "labels": list(labels),
        "n_test": int(y_true.size),
    }


def confusion_title(fusion: str, fold: int, test_session: str, ua: float) -> str:
    """A fold's confusion-matrix title; it names the fusion, so the memory and naive figures of the
    same fold (the demo trains both) can be told apart."""
    return f"{fusion} fusion, fold {fold} (test {test_session}): UA {100 * ua:.1f}%"


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                   title: str = "") -> Path:
    """Confusion matrix PNG in the style of the paper's Fig. 3 (counts annotated), written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training runs headless
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=120)
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    if title:
        ax.set_title(title)
    threshold = counts.max() / 2 if counts.size else 0
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center",
                    color="white" if counts[i, j] > threshold else "black")
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Lay out and render a matplotlib figure, write it atomically (never half a PNG), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
