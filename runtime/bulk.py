"""Bulk prediction over a manifest (`dmf predict --manifest FILE --out FILE`), as a library.

Rows come from the one manifest reader (`dmf.data.manifest.load_prediction_rows`: every row is
checked before anything runs). The output is checked before any prediction (a known type, a
writable folder, not the manifest itself); results are written as each batch finishes to
`<out>.partial`, which `commit()` renames to `out` (atomic), so an interrupted run keeps what it
had done. A row whose audio turns out bad only when decoded, or whose scores are not finite, is
written with an empty label and its message in `error`. CSV cells that a spreadsheet would run
as a formula are escaped. Torch-free.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from dmf.data.manifest import PredictionRow

from .predictor import INPUT_ERRORS, Prediction, Predictor, ResultError

OUTPUT_KINDS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}  # --out suffix -> format
# A leading =, +, -, @, tab or CR makes a spreadsheet read a cell as a formula (OWASP, CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class OutputError(Exception):
    """The output file cannot be used; the one-line message names it."""


def check_output(manifest: Path, out: Path) -> str:
    """The output format for `out`, once it is known that `out` can be written and is not the
    manifest. Creates and removes a probe file in out's folder. Raises OutputError."""
    kind = OUTPUT_KINDS.get(out.suffix.lower())
    if kind is None:
        raise OutputError(f"{out}: unknown output type {out.suffix or '(no suffix)'!r}: expected "
                          f"{', '.join(OUTPUT_KINDS)}")
    if out.resolve() == manifest.resolve() or (out.exists() and os.path.samefile(out, manifest)):
        raise OutputError(f"{out}: is the manifest itself; choose another --out (it would be overwritten)")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; --out names a file")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write to {out.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return kind


def safe_cell(value: str) -> str:
    """A CSV cell a spreadsheet will show as text: formula-leading values get a ' in front."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


class RowWriter:
    """Result rows -> `<out>.partial` as they come; `commit()` renames it to `out`."""

    def __init__(self, out: Path, kind: str, labels: Sequence[str]) -> None:
        self.out, self.kind, self.labels = out, kind, tuple(labels)
        self.partial = out.with_name(out.name + ".partial")
        self.written = 0
        self._fh = open(self.partial, "w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._fh, lineterminator="\n") if kind == "csv" else None
        if self._csv:
            self._csv.writerow(["id", "label", *(f"prob_{lab}" for lab in self.labels), "error"])

    def write(self, row_id: str, pred: Prediction | None, error: str | None) -> None:
        if self._csv:
            probs = [f"{pred.probabilities[lab]:.6f}" for lab in self.labels] if pred else [""] * len(self.labels)
            self._csv.writerow([safe_cell(row_id), safe_cell(pred.label) if pred else "", *probs,
                                safe_cell(error or "")])
        else:
            rec = ({"id": row_id, "label": pred.label, "probabilities": pred.probabilities} if pred
                   else {"id": row_id, "label": None, "probabilities": None, "error": error})
            self._fh.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
        self.written += 1

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def commit(self) -> Path:
        self.flush()
        self._fh.close()
        os.replace(self.partial, self.out)
        return self.out

    def abort(self) -> Path:
        """Close, keeping the partial file; returns its path."""
        self._fh.close()
        return self.partial


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
