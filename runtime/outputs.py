"""Result files: the one table of output types, the check every `--out` gets before anything runs,
CSV cells safe in a spreadsheet, and the writers (manifest rows as they finish, conversation turns
at once), never half-written under the final name (`<out>.partial`, or `dmf.fileio.atomic_write`).
Torch-free.

Both `dmf predict --manifest` and `dmf predict --transcript` write through here, so they accept
the same suffixes (.csv, .jsonl, .ndjson, .parquet) and refuse the same bad paths with the same
messages. Parquet has the CSV's columns, typed (probabilities float64, empty cells null), and needs
pyarrow (installed with the [ray] extra); it is imported only for a .parquet --out.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from dmf.fileio import atomic_write

if TYPE_CHECKING:
    from .conversation import Conversation
    from .prediction import Prediction

OUTPUT_KINDS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}  # --out suffix -> format
# A leading =, +, -, @, tab or CR makes a spreadsheet read a cell as a formula (OWASP, CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class OutputError(ValueError):
    """The output file cannot be used; the one-line message names it."""


def check_output(out: str | Path, protect: str | Path | None = None, what: str = "input file") -> str:
    """The format for `out` ("csv" or "jsonl"), once it is known that `out` can be written (its
    folder exists and takes a new file) and is not `protect` (the input it would overwrite).
    Checked before any prediction, so a bad --out never throws results away. Creates and removes
    a probe file in out's folder. Raises OutputError."""
    out = Path(out)
    kind = OUTPUT_KINDS.get(out.suffix.lower())
    if kind is None:
        raise OutputError(f"{out}: unknown output type {out.suffix or '(no suffix)'!r}: expected "
                          f"{', '.join(OUTPUT_KINDS)}")
    if kind == "parquet":
        _pyarrow(out)
    if protect is not None and _same_file(out, Path(protect)):
        raise OutputError(f"{out}: is the {what} itself; choose another --out (it would be overwritten)")
    check_writable(out)
    return kind


def check_writable(out: Path) -> None:
    """`out` names a file whose folder exists and is writable (OutputError otherwise)."""
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


def _pyarrow(out: Path):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        from dmf import install_hint

        raise OutputError(f"{out}: Parquet output needs pyarrow (`{install_hint('ray')}`, or pip install pyarrow)") from None
    return pyarrow


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def safe_cell(value: str) -> str:
    """A CSV cell a spreadsheet will show as text: formula-leading values get a ' in front."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


class RowWriter:
    """Manifest result rows -> `<out>.partial` as they come; `commit()` renames it to `out`, and
    `abort()` keeps the partial file (an interrupted run keeps what it had done)."""

    def __init__(self, out: Path, kind: str, labels: Sequence[str]) -> None:
        self.out, self.kind, self.labels = out, kind, tuple(labels)
        self.partial = out.with_name(out.name + ".partial")
        self.written = 0
        if kind == "parquet":  # typed columns, one row group per flush (each finished batch)
            self._fh = open(self.partial, "wb")
            self._parquet = _ParquetRows(self._fh, self.labels)
            self._csv = None
            return
        self._parquet = None
        self._fh = open(self.partial, "w", encoding="utf-8", newline="")
        # CRLF rows (RFC 4180): Python quotes a cell only for the terminator's characters, so with "\n"
        # a bare CR inside an id or message went out unquoted and split the row (a new row, unescaped)
        self._csv = csv.writer(self._fh, lineterminator="\r\n") if kind == "csv" else None
        if self._csv:
            self._csv.writerow(["id", "label", *(f"prob_{lab}" for lab in self.labels), "error"])

    def write(self, row_id: str, pred: "Prediction | None", error: str | None) -> None:
        if self._parquet:
            self._parquet.add(row_id, pred, error)
        elif self._csv:
            probs = [f"{pred.probabilities[lab]:.6f}" for lab in self.labels] if pred else [""] * len(self.labels)
            self._csv.writerow([safe_cell(row_id), safe_cell(pred.label) if pred else "", *probs,
                                safe_cell(error or "")])
        else:
            rec = ({"id": row_id, "label": pred.label, "probabilities": pred.probabilities} if pred
                   else {"id": row_id, "label": None, "probabilities": None, "error": error})
            self._fh.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
        self.written += 1

    def flush(self) -> None:
        if self._parquet:
            self._parquet.flush()
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def commit(self) -> Path:
        self.flush()
        if self._parquet:
            self._parquet.close()
        self._fh.close()
        os.replace(self.partial, self.out)
        return self.out

    def abort(self) -> Path:
        """Close, keeping the partial file; returns its path."""
        if self._parquet:
            self._parquet.close()  # the rows written so far, as a readable file
        self._fh.close()
        return self.partial


class _ParquetRows:
    """Manifest result rows as Parquet: the CSV's columns, buffered and written a row group per flush."""

    def __init__(self, fh, labels: Sequence[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.labels, self._pa = tuple(labels), pa
        self.schema = pa.schema([("id", pa.string()), ("label", pa.string()),
                                 *((f"prob_{lab}", pa.float64()) for lab in self.labels), ("error", pa.string())])
        self._writer, self._rows = pq.ParquetWriter(fh, self.schema), []

    def add(self, row_id: str, pred: "Prediction | None", error: str | None) -> None:
        probs = {f"prob_{lab}": pred.probabilities[lab] if pred else None for lab in self.labels}
        self._rows.append({"id": row_id, "label": pred.label if pred else None, **probs, "error": error or None})

    def flush(self) -> None:
        if self._rows:
            self._writer.write_table(self._pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        self.flush()
        self._writer.close()


def write_turns(conversation: "Conversation", path: str | Path) -> None:
    """One line (JSONL) or row (CSV, a p_<label> column per label) per turn, written atomically."""
    kind, buf = check_output(path), io.StringIO()
    rows = [t.to_dict() for t in conversation.turns]
    if kind == "parquet":
        _write_turns_parquet(rows, Path(path))
        return
    if kind == "jsonl":
        buf.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    else:
        labels = list(rows[0]["probabilities"]) if rows else []
        writer = csv.writer(buf, lineterminator="\r\n")  # CRLF: a CR inside a cell is quoted (see RowWriter)
        writer.writerow(["start", "end", "speaker", "text", "label", "truncated", "windows"]
                        + [f"p_{x}" for x in labels])
        for r in rows:  # speaker and text as text in a spreadsheet, never a formula (as manifest CSVs)
            writer.writerow([r["start"], r["end"], safe_cell(r["speaker"] or ""), safe_cell(r["text"]), r["label"],
                             r["truncated"], r["windows"]] + [f"{r['probabilities'][x]:.6f}" for x in labels])
    atomic_write(Path(path), lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))


def _write_turns_parquet(rows: list[dict], path: Path) -> None:
    """The CSV's columns (start, end, speaker, text, label, truncated, windows, p_<label>...), typed."""
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    labels = list(rows[0]["probabilities"]) if rows else []
    table = pa.table({**{k: [r[k] for r in rows] for k in ("start", "end", "speaker", "text", "label", "truncated",
                                                             "windows")},
                      **{f"p_{x}": [float(r["probabilities"][x]) for r in rows] for x in labels}})
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))
