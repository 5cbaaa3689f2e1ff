"""`dmf bench` and `dmf demo`: parse options, call the library, render. Heavy imports stay inside.

Errors print one red `error: ...` line on stderr and exit with status 2 (`dmf.cliutil.fail`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dmf.bench.bench import DEFAULT_ENGINES, ENGINES, QUICK_ENGINES, QUICK_TIMING, BenchError
from dmf.cliutil import console, fail


def _csv(value: str, cast=str) -> tuple:
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        fail(f"cannot parse {value!r} as a comma-separated list")


def bench(
    artifacts: Optional[List[Path]] = typer.Argument(None, help="Exported artifact dirs to time."),
    preset: Optional[str] = typer.Option(None, help="Build random-weight models at a preset's shapes: paper | tiny."),
    quick: bool = typer.Option(False, "--quick", help="Engines " + ",".join(QUICK_ENGINES) + " (unless --engines), "
                               f"{QUICK_TIMING.min_runs} rounds after {QUICK_TIMING.warmup} warm-up call: a first look."),
    engines: Optional[str] = typer.Option(None, help="Engines, comma-separated: " + ", ".join(ENGINES)
                                          + f". [default: {','.join(DEFAULT_ENGINES)}]"),
    batch_sizes: str = typer.Option("1,8", help="Batch sizes, comma-separated."),
    fusion: str = typer.Option("memory,naive", help="Fusions to build with --preset."),
    out: Optional[Path] = typer.Option(None, help="Write bench.json, bench.md and bench.png (batcher.json/.md) here; "
                                       "bench.json and bench.md are rewritten after each batch size."),
    cache: Optional[Path] = typer.Option(None, help="--preset: keep checkpoints and exports here and reuse them "
                                         "next run. [default: ~/.cache/dmf/bench]"),
    no_cache: bool = typer.Option(False, "--no-cache", help="--preset: export into a temporary folder, removed after."),
    threads: int = typer.Option(2, help="Intra-op threads for every engine."),
    warmup: Optional[int] = typer.Option(None, help="Untimed warm-up calls per engine. [default: 2]"),
    min_runs: Optional[int] = typer.Option(None, help="Minimum timed rounds (each times every engine once). [default: 10]"),
    min_seconds: Optional[float] = typer.Option(None, help="Keep adding rounds until this much time has passed. "
                                                "[default: 2.0]"),
    head: bool = typer.Option(True, "--head/--no-head", help="Also time the fusion head alone (memory vs naive)."),
    head_threads: int = typer.Option(1, help="Threads of the fusion-head timing."),
    batcher: bool = typer.Option(False, "--batcher", help="Instead: the runtime's micro-batcher under concurrent "
                                 "load vs sequential batch-1 calls, on one ARTIFACT."),
    requests: int = typer.Option(256, help="--batcher: timed requests per mode."),
    concurrency: int = typer.Option(16, help="--batcher: client threads, one request in flight each."),
    max_batch: int = typer.Option(8, help="--batcher: MicroBatcher max_batch."),
    max_wait_ms: float = typer.Option(5.0, help="--batcher: MicroBatcher max_wait_ms."),
    workers: int = typer.Option(2, help="--batcher: workers of the multi-worker configurations."),
    live: bool = typer.Option(False, "--live", help="Instead: a live session on one ARTIFACT: latency from the VAD's "
                              "end of utterance to its event (p50/p95/p99) and the real-time factor, on a generated "
                              "conversation (docs/live.md)."),
    utterances: int = typer.Option(24, help="--live: utterances of the generated conversation."),
) -> None:
    """Latency and throughput per engine, fusion and batch size against torch fp32 and torch bf16.

    Engines are timed in interleaved rounds against torch eager fp32 and torch bf16 autocast
    (paired ratios with 95 % intervals), and against the paper's 91 ms (memory) / 63 ms (naive)
    per sample for paper-shaped models. How long: `--preset paper --quick --batch-sizes 1,4` took
    34 min the first time (23 of them exporting) and 14 min with the export cache, 8-10 GB RSS, on
    a loaded 2-core AVX2 CPU; without --quick expect far longer (docs/performance.md, "How long
    the paper bench takes")."""
    if live:
        if preset or batcher or len(artifacts or []) != 1:
            fail("--live times one exported artifact: give exactly one ARTIFACT dir (no --preset, no --batcher)")
        _live(artifacts[0], out, utterances, threads)
        return
    if batcher:
        if preset or len(artifacts or []) != 1:
            fail("--batcher times one exported artifact: give exactly one ARTIFACT dir (no --preset)")
        _batcher(artifacts[0], out, dict(requests=requests, concurrency=concurrency, max_batch=max_batch,
                                         max_wait_ms=max_wait_ms, workers=workers))
        return
    if bool(artifacts) == bool(preset):
        fail("give artifact dirs or --preset paper|tiny (one of the two)")
    timing = dict(warmup=warmup, min_runs=min_runs, min_seconds=min_seconds)
    options = _bench_options(quick, engines, batch_sizes, fusion, timing,
                             dict(threads=threads, head=head, head_threads=head_threads))
    _bench(list(artifacts or []), preset, options, out, cache, use_cache=not no_cache)


def _bench_options(quick: bool, engines, batch_sizes, fusion, timing: dict, fields: dict):
    """BenchOptions from the command line: --quick's engines and rounds unless given explicitly
    (`timing`: warmup / min_runs / min_seconds, None where not given)."""
    from dmf.bench.bench import BenchOptions
    from dmf.bench.measure import TimingOptions

    base = QUICK_TIMING if quick else TimingOptions()
    rounds = TimingOptions(**{k: getattr(base, k) if v is None else v for k, v in timing.items()})
    chosen = _csv(engines) if engines else (QUICK_ENGINES if quick else DEFAULT_ENGINES)
    try:
        return BenchOptions(engines=chosen, batch_sizes=_csv(batch_sizes, int), fusions=_csv(fusion),
                            timing=rounds, **fields)
    except BenchError as exc:
        fail(exc)


def _bench(artifacts: list[Path], preset: str | None, options, out: Path | None, cache: Path | None,
           use_cache: bool = True) -> None:
    from rich.markup import escape

    from dmf.bench.bench import (artifact_cases, default_cache_dir, preset_cases, remove_work_dir, run_bench,
                                 temporary_work_dir)
    from dmf.bench.render import print_result, write_outputs
    from dmf.checkpoint import CheckpointError
    from dmf.config import ConfigError
    from dmf.export import ExportError
    from dmf.runtime.artifact import ArtifactError
    from dmf.runtime.engine import EngineError

    err = console()
    work = temporary_work_dir() if preset else None
    cache = (cache or default_cache_dir()) if preset and use_cache else None
    partial = (lambda result: write_outputs(result, out, plot_too=False)) if out else None  # noqa: E731
    try:
        with err.status("dmf bench") as status:
            say = lambda msg: (status.update(escape(msg)), err.log(msg, markup=False))  # noqa: E731
            cases = (preset_cases(preset, options.fusions, options.engines, work, say, cache=cache) if preset
                     else artifact_cases(artifacts))
            result = run_bench(cases, options, progress=say, on_partial=partial)
    except (BenchError, ConfigError, ArtifactError, ExportError, CheckpointError, EngineError) as exc:
        fail(exc)
    finally:
        if work is not None:
            remove_work_dir(work)
    print_result(console(stderr=False), result)
    if out:
        paths = write_outputs(result, out)
        err.print(f"wrote {', '.join(str(p) for p in paths.values())}", markup=False)


def _batcher(artifact: Path, out: Path | None, settings: dict) -> None:
    """Torch-free: runs on a runtime-only install."""
    from dmf.bench.batcher import BatcherOptions, run_batcher
    from dmf.bench.render import print_batcher, write_batcher_outputs
    from dmf.runtime.artifact import ArtifactError
    from dmf.runtime.engine import EngineError

    err = console()
    try:
        options = BatcherOptions(**settings)
        with err.status(f"dmf bench --batcher {artifact}"):
            result = run_batcher(artifact, options)
    except (BenchError, ArtifactError, EngineError) as exc:
        fail(exc)
    print_batcher(console(stderr=False), result)
    if out:
        paths = write_batcher_outputs(result, out)
        err.print(f"wrote {', '.join(str(p) for p in paths.values())}", markup=False)


def _live(artifact: Path, out: Path | None, utterances: int, threads: int) -> None:
    """Torch-free: runs on a runtime-only install with the live extra."""
    from dmf.bench.live import LiveBenchOptions, live_markdown, run_live_bench, write_live_outputs
    from dmf.runtime.artifact import ArtifactError
    from dmf.runtime.engine import EngineError

    err = console()
    try:
        options = LiveBenchOptions(utterances=utterances, threads=threads)
        with err.status(f"dmf bench --live {artifact}"):
            result = run_live_bench(artifact, options, progress=lambda msg: err.log(msg, markup=False))
    except (BenchError, ArtifactError, EngineError, ImportError) as exc:
        fail(exc)
    console(stderr=False).print(live_markdown(result), markup=False)
    if out:
        err.print(f"wrote {', '.join(str(p) for p in write_live_outputs(result, out))}", markup=False)


def register(app: typer.Typer) -> None:
    from dmf.bench.demo import demo

    app.command("bench")(bench)
    app.command("demo")(demo)
