"""CLI commands for corpora: `dmf data stats PATH` and `dmf synth OUT`.

Library code raises DataError / AudioError; only this layer prints and exits (code 2).
`register(app)` adds the commands to the main typer app (wired in dmf/cli.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dmf.cliutil import fail
from dmf.data.corpus import FORMATS, load_corpus
from dmf.data.records import DataError
from dmf.preprocess import AudioError

data_app = typer.Typer(name="data", help="Inspect corpora (IEMOCAP trees, manifests).", no_args_is_help=True)


def _parse_labels(labels: str | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    parsed = tuple(x.strip() for x in labels.split(",") if x.strip())
    if len(parsed) < 2 or len(set(parsed)) != len(parsed):
        raise DataError(f"--labels {labels!r}: expected at least 2 distinct comma-separated class names")
    return parsed


def _stats_table(counts: dict, path: Path) -> Table:
    # the path alone: "corpus corpus" read oddly when the folder is called corpus
    table = Table(title=f"{path}: utterances by label, session and speaker", show_header=True)
    table.add_column("group")
    table.add_column("name")
    table.add_column("utterances", justify="right")
    table.add_row("total", "", str(counts["total"]))
    table.add_section()
    for label, n in counts["by_label"].items():
        table.add_row("label", label, str(n))
    table.add_section()
    for session, n in counts["by_session"].items():
        table.add_row("session", session, str(n))
    table.add_section()
    table.add_row("speakers", f"{len(counts['speakers'])}: {', '.join(counts['speakers'])}", "")
    return table


@data_app.command("stats")
def stats(
    path: Path = typer.Argument(..., help="IEMOCAP root (Session1..5/) or manifest (.csv/.jsonl)."),
    format: str = typer.Option("auto", "--format", help=f"One of {', '.join(FORMATS)}."),
    labels: str = typer.Option(None, "--labels", help="Comma-separated class names, e.g. neu,hap,sad,ang."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: total, by_label, by_session, speakers."),
) -> None:
    """Count utterances per label, session and speaker."""
    try:
        counts = load_corpus(path, format=format, labels=_parse_labels(labels)).counts()
    except (DataError, AudioError) as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(counts, indent=2))
    else:
        Console().print(_stats_table(counts, path))


def synth(
    out: Path = typer.Argument(..., help="Folder to write the synthetic IEMOCAP-layout corpus to."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    utterances: int = typer.Option(400, "--utterances", help="Labelled utterances (at least 20)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists and is not empty."),
) -> None:
    """Write a synthetic demo corpus (prosody and wording carry the emotion)."""
    from dmf.data.synth import synthesize  # numpy-heavy planning only when the command runs

    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("wav", total=None)
            summary = synthesize(out, seed=seed, utterances=utterances, overwrite=overwrite,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (DataError, AudioError) as exc:
        fail(exc)
    by_label = " ".join(f"{k}={v}" for k, v in summary["by_label"].items())
    typer.echo(f"wrote {summary['total']} utterances ({by_label}; {len(summary['by_session'])} sessions, "
               f"{len(summary['speakers'])} speakers, {summary['dropped']} dropped-code) to {out}")


def register(app: typer.Typer) -> None:
    """Add the `data` sub-app and the top-level `synth` command to `app`."""
    app.add_typer(data_app, name="data")
    app.command("synth")(synth)
