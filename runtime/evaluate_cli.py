"""`dmf evaluate ARTIFACT`: an exported artifact scored on a labelled set (`dmf.runtime.evaluate`).

    dmf evaluate ARTIFACT --manifest labelled.csv [--out report.json] [--plot cm.png]
    dmf evaluate ARTIFACT --data CORPUS --fold K       # the session training held out in fold K

Everything is checked before the model loads (the options, the rows and their labels, --out and
--plot, scikit-learn and matplotlib); errors are one red `error: ...` line, exit status 2. Rows
whose audio only fails when decoded are left out of the metrics, listed, and the exit status is 2
after the report is written. Torch-free; needs the `eval` extra (scikit-learn).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dmf.cliutil import console, fail


def _check_args(manifest, data, fold, out, plot, batch_size: int) -> None:
    if (manifest is None) == (data is None):
        fail("give --manifest FILE (audio, text, label) or --data CORPUS --fold K, one of them")
    if (data is None) != (fold is None):
        fail("--data and --fold go together: --data CORPUS --fold K scores the session fold K held out")
    if batch_size < 1:
        fail(f"--batch-size {batch_size} is invalid: expected an integer >= 1")
    if out is not None and out.suffix.lower() != ".json":
        fail(f"--out {out}: expected a .json file")
    if plot is not None and plot.suffix.lower() != ".png":
        fail(f"--plot {plot}: expected a .png file")


def _plan(artifact: Path, manifest, data, fold, out, plot):
    """(source description, rows) with everything checked before the model loads."""
    from dmf.config import ConfigError
    from dmf.data import DataError, ManifestError

    from .artifact import ArtifactError, load_artifact
    from .conversation import require_matplotlib
    from .evaluate import load_held_out_fold, load_labelled_manifest, require_sklearn
    from .outputs import OutputError, check_writable

    try:
        require_sklearn()
        for path in (out, plot):
            if path is not None:
                check_writable(path)
        if plot is not None:
            require_matplotlib()
        labels = load_artifact(artifact, verify=False).labels  # Predictor.load verifies the files
        if manifest is not None:
            return {"manifest": str(manifest)}, load_labelled_manifest(manifest, labels)
        session, rows = load_held_out_fold(data, fold, labels)
        return {"data": str(data), "fold": fold, "session": session}, rows
    except ManifestError as exc:
        fail(f"{manifest or data}: {len(exc.problems)} bad row(s); nothing was scored", exc.problems)
    except (ImportError, ArtifactError, DataError, ConfigError, OutputError) as exc:
        fail(exc)


def _print(report: dict) -> None:
    from rich.table import Table

    con = console(stderr=False)
    con.print(f"{report['n']} clips: UA {report['ua']:.4f}  WA {report['wa']:.4f}  "
              f"macro F1 {report['macro_f1']:.4f}  weighted F1 {report['weighted_f1']:.4f}")
    table = Table("true", *report["labels"], "precision", "recall", "F1", "support")
    for lab, row in zip(report["labels"], report["confusion"]):
        c = report["per_class"][lab]
        table.add_row(lab, *map(str, row), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}",
                      str(c["support"]))
    con.print(table)  # rows: true label; label columns: predicted


def evaluate(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `dmf export`."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV/TSV/JSONL with audio, text, label[, id]."),
    data: Optional[Path] = typer.Option(None, "--data", help="A corpus as `dmf train` reads it (IEMOCAP tree or training manifest)."),
    fold: Optional[int] = typer.Option(None, "--fold", help="With --data: score the session this LOSO fold held out."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report (metrics, confusion, per-row predictions) as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the confusion matrix as a PNG (needs matplotlib)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Clips per batch (capped by dmf.json's max_batch)."),
    engine: str = typer.Option("auto", "--engine", help="auto, onnx, openvino or trt."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Score an artifact on a labelled set: UA, WA, macro F1, confusion matrix, per-class report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dmf.fileio import atomic_write_text

    from .artifact import ArtifactError
    from .engine import EngineError
    from .evaluate import evaluate as run, plot_confusion
    from .predictor import Predictor

    _check_args(manifest, data, fold, out, plot, batch_size)
    source, rows = _plan(artifact, manifest, data, fold, out, plot)
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Predictor.load(artifact, engine=engine, threads=threads) as predictor, \
                Progress(*columns, console=console(), disable=not progress) as bar:
            task = bar.add_task("evaluate", total=len(rows))
            report = run(predictor, rows, batch_size, lambda n: bar.advance(task, n))
            report = {"artifact": artifact.name, **predictor.running(), **source, **report}
        if out is not None:
            atomic_write_text(out, json.dumps(report, indent=2, allow_nan=False) + "\n")
        if plot is not None:
            plot_confusion(report, plot)
    except (ArtifactError, EngineError, ValueError) as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write: {exc.strerror or exc}: {exc.filename or ''}")
    _print(report)
    for path in (out, plot):
        if path is not None:
            console().print(f"wrote {path}")
    if report["errors"]:
        fail(f"{len(report['errors'])} row(s) could not be scored and are left out of the metrics", report["errors"])


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
