"""Evaluation metrics (issue "Data and training"): WA, UA, F1, confusion, pooling, the figure."""

from __future__ import annotations

import pytest

from dmf.train.loso import loso_average, pooled_metrics
from dmf.train.metrics import compute_metrics, confusion_title, plot_confusion

LABELS = ("neu", "hap", "sad")
# Hand-computed example. Confusion (rows true, cols predicted): [[3,1,0],[1,1,0],[0,1,1]].
TRUE = [0, 0, 0, 0, 1, 1, 2, 2]
PRED = [0, 0, 0, 1, 1, 0, 2, 1]


def test_hand_computed_example():
    m = compute_metrics(TRUE, PRED, LABELS)
    assert m["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert m["wa"] == pytest.approx(5 / 8)
    assert m["ua"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)  # mean recall
    # per-class F1: neu P=3/4 R=3/4 -> 0.75; hap P=1/3 R=1/2 -> 0.4; sad P=1 R=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.75 + 0.4 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((4 * 0.75 + 2 * 0.4 + 2 * 2 / 3) / 8)
    assert m["labels"] == list(LABELS) and m["n_test"] == 8


def test_ua_is_mean_recall_not_accuracy():
    # 6 neutral, 2 sad; always predicting neutral: accuracy 0.75 but UA (1 + 0) / 2
    m = compute_metrics([0] * 6 + [2] * 2, [0] * 8, LABELS)
    assert m["wa"] == pytest.approx(0.75)
    assert m["ua"] == pytest.approx(0.5)  # hap has no true example: no recall, not a zero


def test_perfect_and_rejects_bad_input():
    m = compute_metrics([0, 1, 2], [0, 1, 2], LABELS)
    assert m["wa"] == m["ua"] == m["macro_f1"] == m["weighted_f1"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        compute_metrics([0, 1], [0], LABELS)
    with pytest.raises(ValueError):
        compute_metrics([], [], LABELS)


def test_pooled_over_predictions_not_mean_of_folds():
    folds = {
        1: {"labels": list(LABELS), "predictions": {"true": [0, 0, 0, 0], "pred": [0, 0, 0, 0]}},
        2: {"labels": list(LABELS), "predictions": {"true": [1, 2], "pred": [0, 2]}},
    }
    pooled = pooled_metrics(folds)
    assert pooled["n_test"] == 6
    assert pooled["wa"] == pytest.approx(5 / 6)  # mean of fold WAs would be (1 + 0.5) / 2
    assert pooled["ua"] == pytest.approx((1 + 0 + 1) / 3)
    assert pooled["confusion"] == [[4, 0, 0], [1, 0, 0], [0, 0, 1]]


def test_loso_average_is_mean_and_std_over_folds():
    folds = {2: {"wa": 0.5, "ua": 0.4, "macro_f1": 0.3, "weighted_f1": 0.2},
             1: {"wa": 0.7, "ua": 0.8, "macro_f1": 0.5, "weighted_f1": 0.6}}
    average = loso_average(folds)
    assert average["folds"] == [1, 2] and average["std_ddof"] == 0
    assert average["mean"] == pytest.approx({"wa": 0.6, "ua": 0.6, "macro_f1": 0.4, "weighted_f1": 0.4})
    assert average["std"] == pytest.approx({"wa": 0.1, "ua": 0.2, "macro_f1": 0.1, "weighted_f1": 0.2})


def test_confusion_png(tmp_path):
    path = plot_confusion([[3, 1, 0], [1, 1, 0], [0, 1, 1]], LABELS, tmp_path / "c.png", title="fold 1")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # no temp file left behind


def test_confusion_titles_name_the_fusion():
    """The demo trains memory and naive fusion on the same fold: their figures must not share a title."""
    memory, naive = (confusion_title(f, 1, "Ses01", 0.6125) for f in ("memory", "naive"))
    assert memory == "memory fusion, fold 1 (test Ses01): UA 61.3%" and naive.startswith("naive fusion,")
