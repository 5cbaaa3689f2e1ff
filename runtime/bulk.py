"""Bulk prediction over a manifest (`dmf predict --manifest FILE --out FILE`), as a library.

Rows come from the one manifest reader (`dmf.data.manifest.load_prediction_rows`: every row is
checked before anything runs). The output is checked before any prediction
(`outputs.check_output`: a known type, a writable folder, not the manifest itself); results are
written as each batch finishes through `outputs.RowWriter`, so an interrupted run keeps what it
had done. A row whose audio turns out bad only when decoded, or whose scores are not finite, is
written with an empty label and its message in `error`. Torch-free.
"""

from __future__ import annotations

from typing import Callable, Sequence

from dmf.data.manifest import PredictionRow

from .outputs import RowWriter
from .predictor import INPUT_ERRORS, Predictor, ResultError


def _predict_chunk(predictor: Predictor, chunk: Sequence[PredictionRow]):
    """[(row, Prediction or None, error message or None)] for one batch of rows."""
    prepared, ok, errors = [], [], {}
    for i, row in enumerate(chunk):
        try:
            prepared.append(predictor.preprocess(str(row.audio), row.text))
            ok.append(i)
        except INPUT_ERRORS as exc:
            errors[i] = str(exc)
    preds = {}
    for i, log_probs in zip(ok, predictor.infer(prepared) if prepared else []):
        try:
            preds[i] = predictor.postprocess(log_probs)
        except ResultError as exc:
            errors[i] = str(exc)
    return [(row, preds.get(i), errors.get(i)) for i, row in enumerate(chunk)]


def predict_rows(predictor: Predictor, rows: Sequence[PredictionRow], writer: RowWriter, batch_size: int,
                 advance: Callable[[int], None] = lambda n: None) -> list[str]:
    """Predict `rows` in batches (batch_size, capped by the predictor's max_batch), writing each
    batch as it finishes. Returns the row errors as 'line N: message'."""
    row_errors = []
    step = max(1, min(batch_size, predictor.max_batch))
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        for row, pred, error in _predict_chunk(predictor, chunk):
            writer.write(row.id, pred, error)
            if error:
                row_errors.append(f"{row.where}: {error}")
        writer.flush()
        advance(len(chunk))
    return row_errors
