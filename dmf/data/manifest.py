"""The one manifest reader: CSV/TSV (header row) or JSON Lines (or one JSON array) -> rows.

Two callers share it: training (`load_manifest`: a labelled Corpus) and `dmf predict --manifest`
(`load_prediction_rows`: audio + text + id). Both get the same parsing, line numbers, audio path
resolution and messages. Relative audio paths resolve against the manifest's folder. Every bad row
is collected and reported in one ManifestError (`line N: problem`); a half-read manifest is never
returned. Line numbers: a CSV's header is line 1 and a row is named by the line it starts on; JSONL
lines count from 1 (blank lines too); rows of a JSON array are `item N`.

Torch-free (csv, json, soundfile): the runtime's `dmf predict` imports it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import soundfile as sf

from dmf.data.records import IEMOCAP_LABELS, Corpus, DataError, Utterance

REQUIRED = ("audio", "text", "label", "speaker", "session")  # training rows
PREDICT_REQUIRED = ("audio", "text")  # `dmf predict` rows (plus an optional id)
# The one table of manifest types (training's load_corpus and `dmf predict --manifest` both read it):
# suffix -> "csv" / "tsv" (a header row, comma / tab separated) or "json" (JSON Lines, or one array)
MANIFEST_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}
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


@dataclass(frozen=True)
class PredictionRow:
    """One row of a `dmf predict` manifest."""

    where: str  # "line N" / "item N", for messages
    id: str  # the row's id, or its audio value when it has none
    audio: Path  # resolved against the manifest's folder
    text: str


# -------------------------------------------------------------------------------------- parsing

def manifest_kind(path: Path) -> str | None:
    """The manifest type of `path` by its suffix ("csv", "tsv" or "json"); None for any other file."""
    return MANIFEST_KINDS.get(path.suffix.lower())


def _read_text(path: Path) -> str:
    if manifest_kind(path) is None:
        raise DataError(f"{path}: unknown manifest type {path.suffix or '(no suffix)'!r}: expected "
                        f"{', '.join(MANIFEST_KINDS)}")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often write a BOM
    except UnicodeDecodeError:
        raise DataError(f"{path}: manifest is not valid UTF-8") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a manifest file") from None
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read manifest: {exc.strerror or exc}") from None


class _Lines:
    """Iterates a text's physical lines and counts them, so a CSV record is named by the line it
    starts on even after a record the csv module refused."""

    def __init__(self, text: str) -> None:
        self._it = iter(io.StringIO(text, newline=""))
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self._it)
        self.count += 1
        return line


def _csv_rows(text: str, delimiter: str, required: tuple[str, ...],
              problems: list[str]) -> list[tuple[str, object]]:
    """(where, row dict) for each CSV data row; a header missing required columns is a line-1
    problem; a record the csv module refuses (a field over its 128 KiB limit) is a row problem."""
    lines = _Lines(text)
    # strict: a quote left open is an error at the end of the file, not a field that silently
    # swallows every later row (the default reader's behaviour)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in required if c not in header]
    if missing:
        problems.append(f"line 1: missing column(s) {', '.join(missing)} (header has {', '.join(header) or 'nothing'})")
        return []
    rows: list[tuple[str, object]] = []
    while True:
        where = f"line {lines.count + 1}"
        try:
            values = next(reader)
        except StopIteration:
            return rows
        except csv.Error as exc:
            rows.append((where, _Malformed(_csv_problem(exc, where, lines.count))))
            continue
        if values:  # blank lines are skipped
            rows.append((where, {k: (values[i] if i < len(values) else None) for i, k in enumerate(header)}))


def _csv_problem(exc: csv.Error, where: str, last_line: int) -> str:
    if "unexpected end of data" in str(exc):
        return (f"unreadable CSV record: a quoted field opened here is never closed (lines "
                f"{where.split()[-1]}-{last_line} would be one field)")
    return f"unreadable CSV record ({exc})"


def _json_rows(text: str, problems: list[str]) -> list[tuple[str, object]]:
    """(where, object) for each JSONL line (blank lines skipped) or each item of a top-level array;
    a malformed line becomes a _Malformed row."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except (ValueError, RecursionError) as exc:
            problems.append(f"line {getattr(exc, 'lineno', 1)}: {_json_problem(exc)}")
            return []
        return [(f"item {i}", item) for i, item in enumerate(items, start=1)]
    rows: list[tuple[str, object]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except (ValueError, RecursionError) as exc:
            rows.append((f"line {n}", _Malformed(_json_problem(exc))))
    return rows


def _json_problem(exc: BaseException) -> str:
    """json.loads' failure in a row's terms: a syntax error (with its column), nesting past the
    interpreter's recursion limit, or an integer over Python's 4300-digit limit (whose message
    would tell the user to call sys.set_int_max_str_digits)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "malformed JSON (nested too deeply)"
    return f"malformed JSON ({str(exc).split(';')[0].strip()})"


def read_rows(path: Path, required: tuple[str, ...]) -> tuple[list[tuple[str, object]], list[str]]:
    """Every data row of a manifest, in file order, as (where, row), and the problems found while
    parsing. A row is a dict, or a _Malformed (its problem), or whatever a JSON line held."""
    text = _read_text(path)
    problems: list[str] = []
    kind = manifest_kind(path)
    if kind in ("csv", "tsv"):
        rows = _csv_rows(text, "\t" if kind == "tsv" else ",", required, problems)
    else:
        rows = _json_rows(text, problems)
    return rows, problems


# ------------------------------------------------------------------------------------- checking

def field_problem(row: object, required: tuple[str, ...]) -> str | None:
    """What is wrong with the required fields of one row (before touching any file), or None."""
    if isinstance(row, _Malformed):
        return str(row)
    if not isinstance(row, dict):
        return f"expected an object with keys {', '.join(required)}, got {type(row).__name__}"
    missing = [k for k in required if row.get(k) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    bad_type = [k for k in required if not isinstance(row[k], str)]
    if bad_type:
        return f"{bad_type[0]} must be a string, got {type(row[bad_type[0]]).__name__}"
    empty = [k for k in required if not row[k].strip()]
    if empty:
        return f"empty {empty[0]}"
    return None


def audio_path(value: str, base: Path) -> Path:
    audio = Path(value.strip())
    return audio if audio.is_absolute() else base / audio


def missing_audio(audio: Path) -> str | None:
    """Why `audio` cannot be read as a file, or None. A FIFO or device is named as such: opening
    it would block (no writer) or never end (/dev/zero)."""
    if audio.is_dir():
        return f"audio is a folder, not a file: {audio}"
    if audio.is_file():
        return None
    if audio.exists():
        return f"audio is not a regular file (a FIFO, device or socket): {audio}"
    return f"audio file not found: {audio}"


def _unreadable_audio(audio: Path) -> str | None:
    problem = missing_audio(audio)
    if problem:
        return problem
    try:
        sf.info(str(audio))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        return f"unreadable audio {audio} ({str(exc).split(':')[-1].strip()})"
    return None


def _checked(row: object, required: tuple[str, ...], base: Path, row_problem: Callable[[dict], str | None],
             audio_problem: Callable[[Path], str | None]) -> tuple[Path | None, str | None]:
    """The row's audio path (resolved against `base`) and the first problem found: its required
    fields, then `row_problem(row)`, then `audio_problem(audio)`; (None, problem) if any."""
    problem = field_problem(row, required) or row_problem(row)
    if problem:
        return None, problem
    audio = audio_path(row["audio"], base)
    problem = audio_problem(audio)
    return (None, problem) if problem else (audio, None)


def _load(path: Path, required: tuple[str, ...], row_problem: Callable[[dict], str | None],
          audio_problem: Callable[[Path], str | None], build: Callable[[str, dict, Path], Any]) -> list:
    """Every row of the manifest at `path` checked (`_checked`) and built by build(where, row, audio);
    duplicate ids are problems. Raises ManifestError if anything is wrong, DataError if there is
    no row at all."""
    parsed, problems = read_rows(path, required)
    items, seen = [], {}
    for where, row in parsed:
        audio, problem = _checked(row, required, path.parent, row_problem, audio_problem)
        item = build(where, row, audio) if problem is None else None
        if problem:
            problems.append(f"{where}: {problem}")
        elif item.id in seen:
            problems.append(f"{where}: duplicate id {item.id!r} (first at {seen[item.id]})")
        else:
            seen[item.id] = where
            items.append(item)
    if problems:
        raise ManifestError(path, problems)
    if not items:
        raise DataError(f"{path}: manifest has no rows")
    return items


# -------------------------------------------------------------------------------------- readers

def load_manifest(path: str | Path, labels: tuple[str, ...] | None = None) -> Corpus:
    """Read a training manifest (.csv / .tsv / .jsonl / .json) into a Corpus (rows in file order).
    Raises ManifestError listing every bad row, DataError for an unreadable or empty file."""
    path = Path(path)
    labels = tuple(labels) if labels else IEMOCAP_LABELS

    def label_problem(row: dict) -> str | None:
        if row["label"].strip() not in labels:
            return f"unknown label {row['label']!r}: expected one of {', '.join(labels)}"
        return None

    def utterance(where: str, row: dict, audio: Path) -> Utterance:
        utt_id = str(row.get("id") or f"{path.stem}-{where.replace(' ', '')}").strip()
        return Utterance(utt_id, audio, row["text"].strip(), row["label"].strip(),
                         row["session"].strip(), row["speaker"].strip())

    return Corpus(_load(path, REQUIRED, label_problem, _unreadable_audio, utterance), labels)


def _id_problem(row: dict) -> str | None:
    rid = row.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int, type(None))):
        return f"id must be a string or an integer, got {type(rid).__name__}"
    return None


def _prediction_row(where: str, row: dict, audio: Path) -> PredictionRow:
    rid = row.get("id")
    return PredictionRow(where, str(rid).strip() if rid not in (None, "") else row["audio"].strip(), audio, row["text"])


def load_prediction_rows(path: str | Path) -> list[PredictionRow]:
    """Read a `dmf predict` manifest: `audio` and `text` required, `id` optional (a string or an
    integer; default: the audio value). Every row is checked before anything runs (fields, audio
    file present, ids unique); raises ManifestError listing every bad row, DataError for an
    unreadable or empty file. Audio is not decoded here: that happens, row by row, at prediction."""
    return _load(Path(path), PREDICT_REQUIRED, _id_problem, missing_audio, _prediction_row)
