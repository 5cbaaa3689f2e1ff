"""`dmf predict` and `dmf serve`: the torch-free runtime commands. Options are parsed here; the
work is done by `Predictor`, `dmf.runtime.bulk` (manifests) and `dmf.runtime.server`.

Errors print one red `error: ...` line on stderr and exit with status 2 (`dmf.cliutil.fail`).

Manifest policy (`dmf predict ARTIFACT --manifest FILE --out FILE`): every row is checked before
anything runs (parseable line, `audio` and `text` present, audio file exists, ids unique), and so
is `--out` (known type, writable, not the manifest); if anything is wrong, every problem is listed
with its line number and nothing is predicted or written (exit 2). Problems only visible when
decoding (a corrupt or NaN-filled clip, a clip under the minimum length) or in the scores (not
finite) do not stop the run: that row is written with an empty label and its message in the
`error` column (JSONL: `"label": null, "error": "..."`), the rows are listed at the end, and the
exit status is 2. Rows are written as they finish to `<out>.partial`, renamed to `out` at the
end; an interrupted run (Ctrl-C: exit 130; SIGTERM, as a service manager or `kill` sends: exit
143) keeps the partial file and says so.

Text from the input (speaker names, labels) is printed with control characters escaped, so a
transcript cannot drive the terminal (colour, cursor, title) through `dmf predict`'s output.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import typer

from dmf import install_hint
from dmf.cliutil import console, fail
from dmf.contract import MAX_CLIP_SECONDS
from dmf.preprocess import check_seconds

from .batcher import MAX_WAIT_MS
from .conversation import MAX_RECORDING_SECONDS
from .server import ServeOptions

EXIT_INTERRUPTED = 130  # the shell's code for SIGINT
EXIT_TERMINATED = 143  # the shell's code for SIGTERM (128 + 15)


class Terminated(BaseException):
    """SIGTERM arrived while a manifest was being predicted. A BaseException, as KeyboardInterrupt is,
    so no `except Exception` on the way (an engine wrapper) turns it into an ordinary error."""


@contextmanager
def _sigterm_raises():
    """Within the block, SIGTERM raises Terminated in the main thread (as SIGINT raises
    KeyboardInterrupt), so a killed run reports what it wrote instead of vanishing silently."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding caller): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def printable(text: str) -> str:
    """`text` with control and format characters (ESC, bidi overrides, ...) written as escapes,
    for the terminal: what a transcript holds is shown, never obeyed."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in str(text))


def _checked_limits(max_clip_seconds: float, max_recording_seconds: float) -> None:
    """The length limits before anything loads: NaN would switch a limit off, a negative one would
    refuse everything."""
    try:
        check_seconds("--max-clip-seconds", max_clip_seconds)
        check_seconds("--max-recording-seconds", max_recording_seconds)
    except ValueError as exc:
        fail(exc)


def _load_predictor(artifact: Path, engine: str, providers: Optional[str], threads: Optional[int],
                    max_clip_seconds: float):
    from .artifact import ArtifactError
    from .engine import EngineError
    from .predictor import Predictor

    try:
        return Predictor.load(artifact, engine=engine, providers=providers, threads=threads,
                              max_clip_seconds=max_clip_seconds)
    except (ArtifactError, EngineError) as exc:
        fail(exc)


# ------------------------------------------------------------------------------------- predict

def _check_predict_args(audio, text, manifest, out, batch_size: int) -> None:
    single = audio is not None or text is not None
    if single and manifest is not None:
        fail("give either --audio/--text or --manifest/--out, not both")
    if not single and manifest is None:
        fail("nothing to predict: give --audio WAV --text TEXT, or --manifest FILE --out FILE")
    if single and (audio is None or text is None):
        fail("--audio and --text go together: give both")
    if manifest is not None and out is None:
        fail("--manifest needs --out FILE (.csv or .jsonl)")
    if batch_size < 1:
        fail(f"--batch-size {batch_size} is invalid: expected an integer >= 1")


def _predict_one(predictor, audio: Path, text: str, as_json: bool, top_k: Optional[int]) -> None:
    from .engine import EngineError
    from .predictor import INPUT_ERRORS

    try:
        pred = predictor.predict(str(audio), text)
    except INPUT_ERRORS + (EngineError,) as exc:
        fail(exc)
    ranked = pred.top(top_k or len(pred.probabilities))
    if as_json:
        extra = {"top_k": ranked} if top_k else {}
        typer.echo(json.dumps({**pred.to_dict(), **extra, **predictor.running()}, allow_nan=False))  # finite: ResultError otherwise
        return
    typer.echo(f"{printable(pred.label_name)} ({printable(pred.label)})")
    for entry in ranked:
        typer.echo(f"  {printable(entry['name']):<10} {printable(entry['label']):<6} {entry['probability']:.4f}")


def _manifest_plan(manifest: Path, out: Path):
    """The rows to predict and the output format, or exit 2 listing every problem."""
    from dmf.data import DataError, ManifestError
    from dmf.data.manifest import load_prediction_rows

    from .outputs import OutputError, check_output

    try:
        kind = check_output(out, protect=manifest, what="manifest")
        return load_prediction_rows(manifest), kind
    except ManifestError as exc:
        fail(f"{manifest}: {len(exc.problems)} bad row(s); nothing was predicted", exc.problems)
    except (DataError, OutputError) as exc:
        fail(exc)


def _predict_manifest(predictor, rows, out: Path, kind: str, batch_size: int, progress: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .bulk import predict_rows
    from .engine import EngineError
    from .outputs import RowWriter

    try:
        writer = RowWriter(out, kind, predictor.labels)
    except OSError as exc:
        fail(f"{out}: cannot write: {exc.strerror or exc}")
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with _sigterm_raises(), Progress(*columns, console=console(), disable=not progress) as bar:
            task = bar.add_task("predict", total=len(rows))
            row_errors = predict_rows(predictor, rows, writer, batch_size, lambda n: bar.advance(task, n))
            writer.commit()
    except (KeyboardInterrupt, Terminated) as exc:
        how, code = ("terminated", EXIT_TERMINATED) if isinstance(exc, Terminated) else ("interrupted", EXIT_INTERRUPTED)
        console().print(f"{how}: {writer.written} of {len(rows)} rows written to {writer.abort()}")
        raise typer.Exit(code) from None
    except (EngineError, OSError) as exc:
        fail(f"{exc} ({writer.written} of {len(rows)} rows written to {writer.abort()})")
    if row_errors:
        fail(f"{len(row_errors)} row(s) could not be predicted (see the 'error' field in {out})", row_errors)
    console().print(f"wrote {out}")


# -------------------------------------------------------------------------- predict --transcript

def _conversation_plan(audio, text, manifest, out, plot, policy: str, transcript: Path):
    """Everything checked before the model loads (nothing is run or written on error): the
    options, --out's and --plot's types, matplotlib for --plot, and the transcript itself."""
    from .conversation import POLICIES, TranscriptError, read_transcript, require_matplotlib
    from .outputs import check_output, check_writable

    if text is not None or manifest is not None:
        fail("--transcript goes with --audio RECORDING only, not with --text or --manifest")
    if audio is None:
        fail("--transcript needs --audio RECORDING")
    if policy not in POLICIES:
        fail(f"--policy {policy!r} is invalid: expected one of {', '.join(POLICIES)}")
    if plot is not None and plot.suffix.lower() != ".png":
        fail(f"--plot {plot}: expected a .png file")
    try:
        if out is not None:
            check_output(out, protect=audio, what="recording")  # its folder too: a missing one would throw the results away
        if plot is not None:
            check_writable(plot)
            require_matplotlib()
        return read_transcript(transcript)
    except (TranscriptError, ValueError, ImportError) as exc:
        fail(exc)


def _predict_conversation(predictor, audio: Path, transcript: Path, segments, out, plot, policy: str,
                          limits: tuple[float, int], progress: bool) -> None:
    """limits: (longest recording in s, segments per batch): the batch, not the recording, sets memory."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .conversation import TranscriptError, plot_timeline
    from .engine import EngineError
    from .outputs import write_turns
    from .predictor import INPUT_ERRORS

    columns = (TextColumn("segments"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console(), disable=not progress) as bar:
            task = bar.add_task("predict", total=len(segments))
            result = predictor.predict_conversation(
                str(audio), segments, policy=policy, name=str(transcript), max_recording_seconds=limits[0], batch_size=limits[1],
                progress=lambda n: bar.advance(task, n))
        if plot is not None:
            plot_timeline(result, plot)
        if out is not None:
            write_turns(result, out)
    except INPUT_ERRORS + (TranscriptError, EngineError) as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write: {exc.strerror or exc}: {exc.filename or ''}")
    _print_conversation(result, out, plot)


def _print_conversation(result, out, plot) -> None:
    """Warnings and the per-speaker summary on stderr; the turns on stdout when there is no --out."""
    from rich.markup import escape

    con = console()
    for warning in result.warnings:
        con.print(f"[yellow]warning:[/yellow] {escape(printable(warning))}")
    if out is None:
        for t in result.turns:
            p, s = t.prediction, t.segment
            typer.echo(f"{s.start:9.3f} {s.end:9.3f}  {printable(s.speaker or '?'):<12} {printable(p.label):<8} "
                       f"{p.probabilities[p.label]:.3f}{'  (truncated)' if t.truncated else ''}")
    for speaker, shares in result.summary.items():
        parts = ", ".join(f"{printable(lab)} {share:.0%}" for lab, share in sorted(shares.items(), key=lambda kv: -kv[1])
                          if share)
        con.print(f"{escape(printable(speaker))}: {escape(parts)}")
    truncated = sum(t.truncated for t in result.turns)
    if truncated:
        con.print(f"{truncated} segment(s) longer than the model's window (policy {result.policy})")
    for path in (out, plot):
        if path is not None:
            con.print(f"wrote {path}")


def predict(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `dmf export`."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="One audio file (WAV, FLAC, ...)."),
    text: Optional[str] = typer.Option(None, "--text", help="Its transcript."),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="CSV/TSV/JSONL with audio, text[, id] (with --ray also Parquet, or any URI Ray reads)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Manifest or --transcript output: .csv, .jsonl, .ndjson or .parquet (needs pyarrow)."),
    as_json: bool = typer.Option(False, "--json", help="Print the single prediction as JSON."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="One clip: show only the K most probable labels (with --json: a top_k list)."),
    engine: str = typer.Option("auto", "--engine", help="auto (the fastest the artifact, installed packages and CPU allow), onnx, openvino or trt."),
    providers: Optional[str] = typer.Option(None, "--providers", help="ORT providers, e.g. cuda,cpu."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    batch_size: int = typer.Option(16, "--batch-size", help="Manifest rows or transcript segments per batch (capped by max_batch)."),
    max_clip_seconds: float = typer.Option(MAX_CLIP_SECONDS, "--max-clip-seconds", "--max-seconds", help="Longest accepted clip, s (--max-seconds: the older name)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar for manifests and recordings."),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="With --audio RECORDING: a .vtt, .srt or .json transcript; one prediction per segment."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --transcript: an emotion timeline PNG (needs matplotlib)."),
    policy: str = typer.Option("first", "--policy", help="With --transcript, segments longer than the model's window: first (its first window) or windows (average of all)."),
    max_recording_seconds: float = typer.Option(MAX_RECORDING_SECONDS, "--max-recording-seconds", help="With --transcript: longest accepted recording, s."),
    conversations: Optional[Path] = typer.Option(None, "--conversations", help="CSV/TSV/JSONL of recordings: audio, transcript[, id]; one row per turn in --out."),
    use_ray: bool = typer.Option(False, "--ray", help="Run --manifest / --conversations on Ray: a local instance with this machine's cores, or --ray-address."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (auto, HOST:6379, ray://HOST:10001); implies --ray."),
    actors: Optional[int] = typer.Option(None, "--actors", help="With --ray: actors (each loads the artifact once); default: cluster CPUs / --cpus-per-actor."),
    cpus_per_actor: float = typer.Option(1.0, "--cpus-per-actor", help="With --ray: CPUs per actor (its engine threads)."),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", help="With --ray: GPUs per actor (onnxruntime-gpu, --engine trt)."),
) -> None:
    """Predict the emotion of one clip + transcript, of every row of a manifest, or of every
    segment of a recording's time-stamped transcript (--audio RECORDING --transcript FILE)."""
    _checked_limits(max_clip_seconds, max_recording_seconds)
    if top_k is not None and (top_k < 1 or manifest is not None or transcript is not None or conversations is not None):
        fail(f"--top-k {top_k} is invalid: expected an integer >= 1, for one clip (--audio, --text)")
    ray_opts = _ray_plan(use_ray or ray_address is not None, ray_address, actors, cpus_per_actor, gpus_per_actor,
                         batch_size, progress)
    load = LoadRequest(artifact, engine, providers, threads, max_clip_seconds)
    if conversations is not None:
        if audio is not None or text is not None or manifest is not None or transcript is not None:
            fail("--conversations goes with --out only, not with --audio, --text, --manifest or --transcript")
        _predict_conversation_list(load, conversations, out, policy, (max_recording_seconds, batch_size), ray_opts)
        return
    if ray_opts is not None and manifest is None:
        fail("--ray goes with --manifest FILE or --conversations FILE")
    if transcript is not None:
        if batch_size < 1:
            fail(f"--batch-size {batch_size} is invalid: expected an integer >= 1")
        segments = _conversation_plan(audio, text, manifest, out, plot, policy, transcript)
        _predict_conversation(_predictor(load), audio, transcript, segments, out, plot, policy,
                              (max_recording_seconds, batch_size), progress)
        return
    if plot is not None:
        fail("--plot goes with --audio RECORDING --transcript FILE")
    _check_predict_args(audio, text, manifest, out, batch_size)
    if manifest is None:
        _predict_one(_predictor(load), audio, text, as_json, top_k)
        return
    if ray_opts is not None:
        _predict_manifest_ray(load, manifest, out, ray_opts)
        return
    rows, kind = _manifest_plan(Path(manifest), out)
    _predict_manifest(_predictor(load), rows, out, kind, batch_size, progress)


def _predictor(load: "LoadRequest"):
    """The Predictor for the command line's artifact options (one-line error and exit 2 otherwise)."""
    return _load_predictor(load.artifact, load.engine, load.providers, load.threads, load.max_clip_seconds)


# ------------------------------------------------------------------- predict --ray, --conversations

@dataclass(frozen=True)
class LoadRequest:
    """The artifact options as given on the command line."""

    artifact: Path  # artifact folder
    engine: str  # auto, onnx, openvino or trt
    providers: Optional[str]  # onnxruntime providers
    threads: Optional[int]  # engine threads (None: as many as the actor's CPUs under --ray)
    max_clip_seconds: float  # longest accepted clip, s


def _ray_plan(use_ray: bool, address, actors, cpus: float, gpus: float, batch_size: int, progress: bool):
    """(address, PoolOptions, progress) for --ray, checked before anything loads; None without --ray."""
    if not use_ray:
        return None
    if actors is not None and actors < 1:
        fail(f"--actors {actors} is invalid: expected an integer >= 1")
    if not (math.isfinite(cpus) and math.isfinite(gpus) and cpus > 0 and gpus >= 0):
        fail(f"--cpus-per-actor {cpus:g} / --gpus-per-actor {gpus:g}: expected finite numbers, CPUs > 0, GPUs >= 0")
    if batch_size < 1:
        fail(f"--batch-size {batch_size} is invalid: expected an integer >= 1")
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        fail(f"--ray needs the [ray] extra (`{install_hint('ray')}`): {exc}")
    from .ray import PoolOptions

    return address, PoolOptions(actors=actors, cpus_per_actor=cpus, gpus_per_actor=gpus, batch_size=batch_size), progress


def _labels(artifact: Path) -> tuple[str, ...]:
    """The artifact checked on this machine before any actor starts (each actor loads it again)."""
    from .artifact import ArtifactError, load_artifact

    try:
        return load_artifact(artifact).labels
    except ArtifactError as exc:
        fail(exc)


def _ray_load(load: LoadRequest):
    from .ray import LoadOptions

    return LoadOptions(str(load.artifact), load.engine, load.providers, load.threads, load.max_clip_seconds)


def _predict_manifest_ray(load: LoadRequest, manifest: str, out: Path, ray_opts) -> None:
    """`--manifest M --out O --ray`: the rows scored on Ray, written here as `--manifest` writes them."""
    from dmf.data import DataError, ManifestError

    from . import ray as dray
    from .outputs import OutputError, RowWriter, check_output

    if out is None:
        fail("--manifest needs --out FILE (.csv or .jsonl)")
    try:
        kind = check_output(out, protect=manifest if "://" not in manifest else None, what="manifest")
    except OutputError as exc:
        fail(exc)
    labels = _labels(load.artifact)
    dray.connect(ray_opts[0], progress=ray_opts[2])
    try:
        ds, expected = dray.manifest_dataset(manifest)
    except ManifestError as exc:
        fail(f"{manifest}: {len(exc.problems)} bad row(s); nothing was predicted", exc.problems)
    except (DataError, ValueError) as exc:
        fail(exc)
    writer = RowWriter(out, kind, labels)
    try:
        with _sigterm_raises():
            row_errors = dray.write_manifest(dray.scored_batches(ds, dray.ManifestScorer, (_ray_load(load),), ray_opts[1]),
                                             writer, expected)
            writer.commit()
    except (KeyboardInterrupt, Terminated) as exc:
        how, code = ("terminated", EXIT_TERMINATED) if isinstance(exc, Terminated) else ("interrupted", EXIT_INTERRUPTED)
        console().print(f"{how}: {writer.written} rows written to {writer.abort()}")
        raise typer.Exit(code) from None
    except (dray.ClusterError, RuntimeError, OSError) as exc:
        fail(f"{exc} ({writer.written} rows written to {writer.abort()})")
    if row_errors:
        fail(f"{len(row_errors)} row(s) could not be predicted (see the 'error' field in {out})", row_errors)
    console().print(f"wrote {out}")


def _predict_conversation_list(load: LoadRequest, conversations: Path, out, policy: str,
                               limits: tuple[float, int], ray_opts) -> None:
    """`--conversations LIST --out O [--ray]`: every recording's turns in one table, a failed
    recording as one row with its message (exit 2 at the end, as bad manifest rows)."""
    from dmf.data import DataError, ManifestError

    from . import ray as dray
    from .artifact import ArtifactError
    from .conversation import POLICIES
    from .engine import EngineError
    from .outputs import OutputError, check_output

    if out is None:
        fail("--conversations needs --out FILE (.csv or .jsonl)")
    if policy not in POLICIES:
        fail(f"--policy {policy!r} is invalid: expected one of {', '.join(POLICIES)}")
    try:
        kind = check_output(out, protect=conversations, what="conversation list")
        if kind == "parquet":
            raise OutputError(f"{out}: a conversation list is written as .csv or .jsonl (Parquet: per recording, --transcript)")
        rows = dray.pair_rows(conversations)
    except ManifestError as exc:
        fail(f"{conversations}: {len(exc.problems)} bad row(s); nothing was predicted", exc.problems)
    except (DataError, OutputError) as exc:
        fail(exc)
    labels = _labels(load.artifact)
    conv = dray.ConversationOptions(policy=policy, max_recording_seconds=limits[0], batch_size=limits[1])
    try:
        if ray_opts is None:
            results = dray.run_here(rows, dray.ConversationScorer(_ray_load(load), conv), 1)
        else:
            dray.connect(ray_opts[0], progress=ray_opts[2])
            ds = dray.pairs_dataset(rows)
            pool = replace(ray_opts[1], batch_size=1)  # a recording per call: --batch-size counts segments
            results = dray.scored_batches(ds, dray.ConversationScorer, (_ray_load(load), conv), pool)
        failures = dray.write_conversations(results, out, kind, labels, len(rows))
    except (ArtifactError, EngineError, dray.ClusterError, RuntimeError) as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write: {exc.strerror or exc}: {exc.filename or ''}")
    if failures:
        fail(f"{len(failures)} recording(s) could not be predicted (see the 'error' field in {out})", failures)
    console().print(f"wrote {out}")


# --------------------------------------------------------------------------------------- serve

def serve(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `dmf export`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Requests per batch (capped by dmf.json). [default: 2 on a CPU, 8 on a GPU]"),
    max_wait_ms: float = typer.Option(ServeOptions.max_wait_ms, "--max-wait-ms", help="Wait for more requests after the first, ms."),
    max_upload_mb: float = typer.Option(ServeOptions.max_upload_mb, "--max-upload-mb", help="Request body limit, MiB (413 above)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Batches run at once. [default: one per CPU core, each with 1 engine thread; 1 on a GPU]"),
    max_clip_seconds: float = typer.Option(ServeOptions.max_clip_seconds, "--max-clip-seconds", "--max-audio-seconds", help="Longest accepted clip, s (--max-audio-seconds: the older name)."),
    max_recording_seconds: float = typer.Option(ServeOptions.max_recording_seconds, "--max-recording-seconds", help="Longest recording for /v1/conversation, s."),
    timeout: float = typer.Option(ServeOptions.request_timeout_s, "--timeout", help="Per request, s: body (else 408) and result (else 503)."),
    max_queue: int = typer.Option(ServeOptions.max_queue, "--max-queue", help="Predict requests at once; one more gets 503."),
    max_streams: int = typer.Option(ServeOptions.max_streams, "--max-streams", help="/v1/stream: live streams at once; one more is closed with 1013."),
    grace: float = typer.Option(ServeOptions.grace_s, "--grace", help="On SIGTERM, s before unanswered requests get 503."),
    engine: str = typer.Option("auto", "--engine", help="auto (the fastest the artifact, installed packages and CPU allow), onnx, openvino or trt."),
    providers: Optional[str] = typer.Option(None, "--providers", help="ORT providers, e.g. cuda,cpu."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve predictions over HTTP (POST /v1/predict, POST /v1/conversation, GET /healthz, GET /metrics,
    GET /openapi.json), live streams over a WebSocket (/v1/stream) and the /live page."""
    try:
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        fail(f"`dmf serve` needs the [serve] extra (`{install_hint('serve')}`): {exc}")
    from .server import serve as run_server

    try:
        options = ServeOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb,
                               max_clip_seconds=max_clip_seconds, max_recording_seconds=max_recording_seconds,
                               workers=workers, request_timeout_s=timeout,
                               max_queue=max_queue, max_streams=max_streams, grace_s=grace)
    except ValueError as exc:
        fail(exc)
    if max_wait_ms > MAX_WAIT_MS:  # the batcher's own bound, checked before the model loads
        fail(f"--max-wait-ms {max_wait_ms:g} is invalid: expected at most {MAX_WAIT_MS} ms")
    if not 0 < port < 65536:
        fail(f"--port {port} is invalid: expected 1..65535")
    if threads is None and workers != 1:  # several workers (the CPU default): one engine thread each, not all cores each
        threads = 1
    predictor = _load_predictor(artifact, engine, providers, threads, max_clip_seconds)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console().print(f"[yellow]warning:[/yellow] listening on {host}: reachable from other machines; "
                        "the server has no authentication")
    try:
        run_server(predictor, options, host=host, port=port, log_level=log_level)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    finally:
        predictor.close()


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
    app.command("serve")(serve)


if __name__ == "__main__":  # `python -m dmf.runtime.cli ...`: the runtime commands alone
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(_app)
    _app(prog_name="dmf", args=sys.argv[1:])
