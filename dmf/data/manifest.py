"""Reader for user corpora described by a manifest: CSV (header row) or JSON Lines.

Fields: `audio`, `text`, `label`, `speaker`, `session`, optional `id` (default: derived from the
line number). Relative audio paths resolve against the manifest's folder. Every bad row is
collected and reported in one ManifestError (`line N: problem`); a half-read corpus is never
returned. Line numbers: a CSV's header is line 1; JSONL lines count from 1. A `.json` file holding
one top-level array is accepted too (rows numbered `item N`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import soundfile as sf

from dmf.data.corpus import IEMOCAP_LABELS, Corpus, DataError, Utterance

REQUIRED = ("audio", "text", "label", "speaker", "session")
MAX_LISTED = 50  # problems spelled out in the message; all of them stay in `.problems`


class ManifestError(DataError):
    """Bad rows in a manifest; `.problems` lists every one as 'line N: problem'."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        shown = "; ".join(self.problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        super().__init__(f"{path}: {len(problems)} bad row(s): {shown}{more}")


class _Malformed(str):
    """A row that could not be parsed, kept in place so problems stay in line order."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often write a BOM
    except UnicodeDecodeError:
        raise DataError(f"{path}: manifest is not valid UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read manifest: {exc.strerror or exc}") from None


def _csv_rows(text: str, problems: list[str]) -> list[tuple[str, object]]:
    """(where, row) for each CSV data row; a header missing required columns is a line-1 problem."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        found = ", ".join(header) or "nothing"
        problems.append(f"line 1: missing column(s) {', '.join(missing)} (header has {found})")
        return []
    return [(f"line {reader.line_num}", row) for row in reader]


def _json_rows(text: str, problems: list[str]) -> list[tuple[str, object]]:
    """(where, object) for each JSONL line (blank lines skipped) or each item of a top-level array;
    a malformed line becomes a _Malformed row."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            problems.append(f"line {exc.lineno}: malformed JSON ({exc.msg})")
            return []
        return [(f"item {i}", item) for i, item in enumerate(items, start=1)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append((f"line {n}", _Malformed(f"malformed JSON ({exc.msg} at column {exc.colno})")))
    return rows


def _audio_problem(audio: Path) -> str | None:
    if not audio.is_file():
        return f"audio file not found: {audio}"
    try:
        sf.info(str(audio))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        return f"unreadable audio {audio} ({str(exc).split(':')[-1].strip()})"
    return None


def _row_problem(row: object, labels: tuple[str, ...]) -> str | None:
    """What is wrong with the fields of one row (before touching the audio file), or None."""
    if isinstance(row, _Malformed):
        return str(row)
    if not isinstance(row, dict):
        return f"expected an object with keys {', '.join(REQUIRED)}, got {type(row).__name__}"
    missing = [k for k in REQUIRED if row.get(k) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    bad_type = [k for k in REQUIRED if not isinstance(row[k], str)]
    if bad_type:
        return f"{bad_type[0]} must be a string, got {type(row[bad_type[0]]).__name__}"
    for key in ("audio", "speaker", "session"):
        if not row[key].strip():
            return f"empty {key}"
    if not row["text"].strip():
        return "empty text"
    if row["label"].strip() not in labels:
        return f"unknown label {row['label']!r}: expected one of {', '.join(labels)}"
    return None


def _parse_row(where: str, row: object, base: Path, labels: tuple[str, ...], stem: str) -> Utterance | str:
    """An Utterance, or the problem string 'where: problem'."""
    problem = _row_problem(row, labels)
    if problem is None:
        audio = Path(row["audio"].strip())
        audio = audio if audio.is_absolute() else base / audio
        problem = _audio_problem(audio)
    if problem:
        return f"{where}: {problem}"
    utt_id = str(row.get("id") or f"{stem}-{where.replace(' ', '')}").strip()
    return Utterance(utt_id, audio, row["text"].strip(), row["label"].strip(),
                     row["session"].strip(), row["speaker"].strip())


def load_manifest(path: str | Path, labels: tuple[str, ...] | None = None) -> Corpus:
    """Read a .csv / .jsonl / .json manifest into a Corpus (rows in file order).
    Raises ManifestError listing every bad row, DataError for an unreadable or empty file."""
    path = Path(path)
    labels = tuple(labels) if labels else IEMOCAP_LABELS
    text = _read_text(path)
    problems: list[str] = []
    rows = _csv_rows(text, problems) if path.suffix.lower() == ".csv" else _json_rows(text, problems)
    utterances, seen = [], {}
    for where, row in rows:
        result = _parse_row(where, row, path.parent, labels, path.stem)
        if isinstance(result, str):
            problems.append(result)
        elif result.id in seen:
            problems.append(f"{where}: duplicate id {result.id!r} (first at {seen[result.id]})")
        else:
            seen[result.id] = where
            utterances.append(result)
    if problems:
        raise ManifestError(path, problems)
    if not utterances:
        raise DataError(f"{path}: manifest has no rows")
    return Corpus(utterances, labels)
