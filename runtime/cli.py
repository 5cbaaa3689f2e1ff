"""`dmf predict` and `dmf serve`: the torch-free runtime commands.

Errors print one red `error: ...` line on stderr and exit with status 2.

Manifest policy (`dmf predict ARTIFACT --manifest FILE --out FILE`): every row is checked before
anything runs (parseable line, `audio` and `text` present, audio file exists, text not empty, ids
unique); if any row is bad, all of them are listed with their line numbers and nothing is
predicted or written (exit 2). Problems only visible when decoding (a corrupt or NaN-filled clip,
a clip under the minimum length) do not stop the run: that row is written with an empty label and
its message in the `error` column (JSONL: `"label": null, "error": "..."`), the rows are listed at
the end, and the exit status is 2. The output is written atomically (temp file + rename).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class CLIError(Exception):
    """One-line user-facing error; the command prints it in red and exits 2."""


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _fail(message: str, details: list[str] | None = None) -> None:
    from rich.markup import escape

    con = _console()
    for line in details or []:
        con.print(escape(line))
    con.print(f"[bold red]error:[/bold red] {escape(message)}")
    raise typer.Exit(2)


def _load_predictor(artifact: Path, engine: str, providers: Optional[str], threads: Optional[int],
                    max_seconds: float):
    from .artifact import ArtifactError
    from .engines import EngineError
    from .predictor import Predictor

    try:
        return Predictor.load(artifact, engine=engine, providers=providers, threads=threads,
                              max_seconds=max_seconds)
    except (ArtifactError, EngineError) as exc:
        _fail(str(exc))


# ------------------------------------------------------------------------------------ manifests

@dataclass
class ManifestRow:
    line: int
    id: str
    audio: Path
    text: str


def _manifest_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise CLIError(f"{path}: unknown manifest type {suffix or '(no suffix)'!r}: expected .csv, .tsv, .jsonl or .ndjson")


def read_manifest(path: Path) -> tuple[list[ManifestRow], list[str]]:
    """Rows and every problem found (as 'line N: ...'). Relative audio paths are resolved
    against the manifest's folder."""
    kind = _manifest_kind(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CLIError(f"{path}: manifest not found") from None
    except UnicodeDecodeError:
        raise CLIError(f"{path}: manifest is not UTF-8 text") from None
    except OSError as exc:
        raise CLIError(f"{path}: cannot read manifest: {exc.strerror or exc}") from None

    records: list[tuple[int, dict]] = []
    problems: list[str] = []
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("audio", "text") if c not in header]
        if missing:
            raise CLIError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'empty'})")
        reader.fieldnames = header
        start = 2
        for rec in reader:
            records.append((start, {k: v for k, v in rec.items() if k is not None}))
            start = reader.line_num + 1
    else:
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {n}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(rec, dict):
                problems.append(f"line {n}: expected a JSON object, got {type(rec).__name__}")
                continue
            records.append((n, rec))

    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    for n, rec in records:
        audio, text, rid = rec.get("audio"), rec.get("text"), rec.get("id")
        bad = []
        if not isinstance(audio, str) or not audio.strip():
            bad.append("missing or empty 'audio'")
        if not isinstance(text, str) or not text.strip():
            bad.append("missing or empty 'text'")
        if rid is not None and not isinstance(rid, (str, int)):
            bad.append(f"'id' must be a string, got {type(rid).__name__}")
        if not bad:
            audio_path = Path(audio.strip())
            if not audio_path.is_absolute():
                audio_path = path.parent / audio_path
            if not audio_path.is_file():
                bad.append(f"audio file not found: {audio_path}")
            rid = str(rid) if rid not in (None, "") else audio.strip()
            if rid in seen:
                bad.append(f"duplicate id {rid!r} (first on line {seen[rid]})")
            else:
                seen[rid] = n
        if bad:
            problems.append(f"line {n}: {'; '.join(bad)}")
        else:
            rows.append(ManifestRow(n, rid, audio_path, text))
    if not records and not problems:
        problems.append("no rows")
    return rows, problems


def _output_kind(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise CLIError(f"{out}: unknown output type {suffix or '(no suffix)'!r}: expected .csv, .jsonl or .ndjson")


def _render(kind: str, labels: tuple[str, ...], results: list[tuple[ManifestRow, object, str | None]]) -> str:
    buf = io.StringIO()
    if kind == "csv":
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", "label", *(f"prob_{lab}" for lab in labels), "error"])
        for row, pred, err in results:
            if pred is None:
                writer.writerow([row.id, "", *([""] * len(labels)), err])
            else:
                writer.writerow([row.id, pred.label, *(f"{pred.probabilities[lab]:.6f}" for lab in labels), ""])
    else:
        for row, pred, err in results:
            rec = ({"id": row.id, "label": pred.label, "probabilities": pred.probabilities} if pred is not None
                   else {"id": row.id, "label": None, "probabilities": None, "error": err})
            buf.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return buf.getvalue()


def predict_manifest(predictor, manifest: Path, out: Path, batch_size: int, progress: bool = True) -> list[str]:
    """Predict every row of `manifest` into `out`. Returns the row errors found while decoding."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dmf.config import atomic_write_text

    from .predictor import INPUT_ERRORS

    out_kind = _output_kind(out)
    rows, problems = read_manifest(manifest)
    if problems:
        raise _BadRows(f"{manifest}: {len(problems)} bad row(s); nothing was predicted", problems)

    results: list[tuple[ManifestRow, object, str | None]] = []
    row_errors: list[str] = []
    step = max(1, min(batch_size, predictor.max_batch))
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_console(), disable=not progress, transient=False) as bar:
        task = bar.add_task("predict", total=len(rows))
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            prepared, ok = [], []
            errors: dict[int, str] = {}
            for i, row in enumerate(chunk):
                try:
                    prepared.append(predictor.preprocess(str(row.audio), row.text))
                    ok.append(i)
                except INPUT_ERRORS as exc:
                    errors[i] = str(exc)
                    row_errors.append(f"line {row.line}: {exc}")
            preds = [predictor.postprocess(r) for r in predictor.infer(prepared)] if prepared else []
            by_index = dict(zip(ok, preds))
            for i, row in enumerate(chunk):
                results.append((row, by_index.get(i), errors.get(i)))
            bar.advance(task, len(chunk))
    atomic_write_text(out, _render(out_kind, predictor.labels, results))
    return row_errors


class _BadRows(CLIError):
    def __init__(self, message: str, details: list[str]) -> None:
        super().__init__(message)
        self.details = details


# ------------------------------------------------------------------------------------- commands

def predict(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `dmf export`."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="One audio file (WAV, FLAC, ...)."),
    text: Optional[str] = typer.Option(None, "--text", help="Its transcript."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV/TSV/JSONL with audio, text[, id]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Manifest output: .csv or .jsonl."),
    as_json: bool = typer.Option(False, "--json", help="Print the single prediction as JSON."),
    engine: str = typer.Option("auto", "--engine", help="auto (dmf.json's), onnx or trt."),
    providers: Optional[str] = typer.Option(None, "--providers", help="ORT providers, e.g. cuda,cpu."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    batch_size: int = typer.Option(16, "--batch-size", help="Manifest rows per batch (capped by max_batch)."),
    max_seconds: float = typer.Option(60.0, "--max-seconds", help="Longest accepted clip, in seconds."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar for manifests."),
) -> None:
    """Predict the emotion of one clip + transcript, or of every row of a manifest."""
    from .predictor import INPUT_ERRORS

    single = audio is not None or text is not None
    if single and manifest is not None:
        _fail("give either --audio/--text or --manifest/--out, not both")
    if not single and manifest is None:
        _fail("nothing to predict: give --audio WAV --text TEXT, or --manifest FILE --out FILE")
    if single and (audio is None or text is None):
        _fail("--audio and --text go together: give both")
    if manifest is not None and out is None:
        _fail("--manifest needs --out FILE (.csv or .jsonl)")
    if batch_size < 1:
        _fail(f"--batch-size {batch_size} is invalid: expected an integer >= 1")
    try:
        if manifest is not None:
            _output_kind(out)
            _manifest_kind(manifest)
    except CLIError as exc:
        _fail(str(exc))

    predictor = _load_predictor(artifact, engine, providers, threads, max_seconds)
    if single:
        try:
            pred = predictor.predict(str(audio), text)
        except INPUT_ERRORS as exc:
            _fail(str(exc))
        if as_json:
            typer.echo(json.dumps(pred.to_dict()))
        else:
            typer.echo(pred.label)
            for lab, p in sorted(pred.probabilities.items(), key=lambda kv: -kv[1]):
                typer.echo(f"  {lab:<8} {p:.4f}")
        return

    try:
        row_errors = predict_manifest(predictor, manifest, out, batch_size, progress=progress)
    except _BadRows as exc:
        _fail(str(exc), exc.details)
    except CLIError as exc:
        _fail(str(exc))
    if row_errors:
        _fail(f"{len(row_errors)} row(s) could not be predicted (see the 'error' field in {out})", row_errors)
    _console().print(f"wrote {out}")


def serve(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `dmf export`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests per batch (capped by dmf.json max_batch)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="Wait for more requests after the first, ms."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Request body limit, MiB (413 above)."),
    workers: int = typer.Option(1, "--workers", help="Batches run at once (CPU: 2 with --threads 1)."),
    max_audio_seconds: float = typer.Option(60.0, "--max-audio-seconds", help="Longest accepted clip, s."),
    engine: str = typer.Option("auto", "--engine", help="auto (dmf.json's), onnx or trt."),
    providers: Optional[str] = typer.Option(None, "--providers", help="ORT providers, e.g. cuda,cpu."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve predictions over HTTP: POST /v1/predict, GET /healthz, GET /metrics."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        _fail(f"`dmf serve` needs the [serve] extra (`pip install dmf[serve]`): {exc}")
    from .server import ServeOptions
    from .server import serve as run_server

    try:
        options = ServeOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb,
                               max_audio_seconds=max_audio_seconds, workers=workers)
    except ValueError as exc:
        _fail(str(exc))
    if not 0 < port < 65536:
        _fail(f"--port {port} is invalid: expected 1..65535")
    predictor = _load_predictor(artifact, engine, providers, threads, max_audio_seconds)
    if host not in ("127.0.0.1", "localhost", "::1"):
        _console().print(f"[yellow]warning:[/yellow] listening on {host}: reachable from other machines; "
                         "the server has no authentication")
    try:
        run_server(predictor, options, host=host, port=port, log_level=log_level)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    finally:
        predictor.close()


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
    app.command("serve")(serve)


if __name__ == "__main__":  # `python -m dmf.runtime.cli ...`: the runtime commands alone
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(_app)
    _app(prog_name="dmf", args=sys.argv[1:])
