"""`dmf bench` and `dmf demo`: parse options, call the library, render. Heavy imports stay inside."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dmf.bench.bench import DEFAULT_ENGINES, ENGINES


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _csv(value: str, cast=str) -> tuple:
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        _fail(f"cannot parse {value!r} as a comma-separated list")
        raise  # unreachable: _fail exits


def bench(
    artifacts: Optional[List[Path]] = typer.Argument(None, help="Exported artifact dirs to time."),
    preset: Optional[str] = typer.Option(None, help="Build random-weight models at a preset's shapes: paper | tiny."),
    engines: str = typer.Option(",".join(DEFAULT_ENGINES), help="Engines, comma-separated: " + ", ".join(ENGINES) + "."),
    batch_sizes: str = typer.Option("1,8", help="Batch sizes, comma-separated."),
    fusion: str = typer.Option("memory,naive", help="Fusions to build with --preset."),
    out: Optional[Path] = typer.Option(None, help="Write bench.json, bench.md and bench.png here."),
    threads: int = typer.Option(2, help="Intra-op threads for every engine."),
    warmup: int = typer.Option(2, help="Untimed warm-up calls per engine."),
    min_runs: int = typer.Option(10, help="Minimum timed rounds (each round times every engine once)."),
    min_seconds: float = typer.Option(2.0, help="Keep adding rounds until this much time has passed."),
    head: bool = typer.Option(True, "--head/--no-head", help="Also time the fusion head alone (memory vs naive)."),
) -> None:
    """Latency and throughput per engine, fusion and batch size, against torch eager (same run) and
    against the paper's 91 ms (memory) / 63 ms (naive) per sample."""
    from rich.console import Console
    from rich.markup import escape

    from dmf.bench.bench import BenchError, BenchOptions, artifact_cases, preset_cases, run_bench
    from dmf.bench.bench import remove_work_dir, temporary_work_dir
    from dmf.bench.measure import TimingOptions
    from dmf.bench.render import rich_table, write_outputs

    console = Console(stderr=True)
    if bool(artifacts) == bool(preset):
        _fail("give artifact dirs or --preset paper|tiny (one of the two)")
    try:
        options = BenchOptions(engines=_csv(engines), batch_sizes=_csv(batch_sizes, int), fusions=_csv(fusion),
                               threads=threads, head=head,
                               timing=TimingOptions(warmup=warmup, min_runs=min_runs, min_seconds=min_seconds))
        work = temporary_work_dir() if preset else None
        try:
            with console.status("dmf bench") as status:
                say = lambda msg: (status.update(escape(msg)), console.log(msg, markup=False))  # noqa: E731
                cases = (preset_cases(preset, options.fusions, options.engines, work, say) if preset
                         else artifact_cases(list(artifacts)))
                result = run_bench(cases, options, progress=say)
        finally:
            if work is not None:
                remove_work_dir(work)
    except Exception as exc:  # library errors are one-liners; show them without a traceback
        if type(exc).__name__ in ("BenchError", "ConfigError", "ArtifactError", "ExportError", "CheckpointError"):
            _fail(str(exc))
        raise
    Console().print(rich_table(result))
    for skip in result["skipped"]:
        console.print(f"skipped {skip['engine']} ({skip['fusion']}): {skip['reason']}", style="yellow", markup=False)
    if out:
        paths = write_outputs(result, out)
        console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    _ = BenchError  # imported for the error names above


def register(app: typer.Typer) -> None:
    from dmf.bench.demo import demo

    app.command("bench")(bench)
    app.command("demo")(demo)
