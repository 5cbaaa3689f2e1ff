"""`dmf demo`: the whole pipeline in one command on the synthetic corpus, tiny preset, fold 1:
synthesise, train memory and naive fusion, export both to ONNX fp32 and int8, predict held-out
clips with the torch-free runtime, benchmark, and print one summary. Re-running resumes (finished
training folds are kept)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from dmf.config import atomic_write_text

FUSIONS = ("memory", "naive")


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("runs/demo")  # everything the demo writes goes under here
    seed: int = 0  # corpus and training seed
    utterances: int = 400  # size of the synthetic corpus
    epochs: int | None = None  # None: the tiny preset's default
    batch_sizes: tuple[int, ...] = (1, 8)  # bench batch sizes
    predict_clips: int = 5  # held-out clips shown with their predictions


def run_demo(options: DemoOptions, say) -> dict:
    """Returns the summary dict (also written to out/demo.json and out/demo.md)."""
    from dmf.data import load_corpus

    corpus_dir = _corpus(options, say)
    corpus = load_corpus(corpus_dir)
    summary: dict = {"corpus": str(corpus_dir), "utterances": len(corpus.utterances), "models": {}}
    artifacts: list[Path] = []
    for fusion in FUSIONS:
        run_dir = options.out / fusion
        metrics = _train(corpus, fusion, run_dir, options, say)
        agreement = _test_fold_arrays(corpus, run_dir / "fold1", options)
        fp32, int8 = _export(run_dir / "fold1", options.out / "artifacts" / fusion, agreement, say)
        artifacts += [fp32] + ([int8] if isinstance(int8, Path) else [])
        summary["models"][fusion] = {"fold1": metrics, "fp32": _parity(fp32), "int8": _parity(int8)}
    summary["predictions"] = _predict_heldout(corpus, artifacts[0], options, say)
    summary["bench"] = _bench(artifacts, options, say)
    _write_summary(summary, options.out)
    return summary


def _corpus(options: DemoOptions, say) -> Path:
    from dmf.data.synth import synthesize

    path = options.out / "corpus"
    if (path / "SYNTH.json").is_file():
        say(f"corpus: reusing {path}")
    else:
        say(f"corpus: synthesising {options.utterances} utterances into {path}")
        synthesize(path, seed=options.seed, utterances=options.utterances, overwrite=True)
    return path


def _train(corpus, fusion: str, run_dir: Path, options: DemoOptions, say) -> dict:
    from dmf.config import preset
    from dmf.train import run_training

    config = preset("tiny", fusion=fusion).replace("train", seed=options.seed)
    if options.epochs:
        config = config.replace("train", epochs=options.epochs)
    say(f"train: {fusion} fusion, tiny preset, fold 1 held out -> {run_dir}")
    result = run_training(config, corpus, run_dir, folds=[1], progress=True)
    fold = result["folds"]["1"]
    metrics = {k: fold[k] for k in ("wa", "ua", "macro_f1", "weighted_f1")}
    metrics["train_utterances_per_s"] = result["throughput"]["utterances_per_s"]
    return metrics


def _test_fold_arrays(corpus, checkpoint: Path, options: DemoOptions) -> dict:
    """The held-out session as preprocessed arrays: what int8 must agree with fp32 on."""
    from dmf.config import preset
    from dmf.model import DMFModel
    from dmf.train.dataset import encode_utterances, loso_split

    model = DMFModel.from_pretrained(checkpoint)
    data = preset("tiny").data
    split = loso_split(corpus, 1, data.val_fraction, data.seed)
    batch = encode_utterances(split.test, model)
    return {"audio": batch.audio.numpy(), "input_ids": batch.input_ids.numpy(),
            "attention_mask": batch.attention_mask.numpy()}


def _export(checkpoint: Path, out: Path, agreement: dict, say) -> tuple[Path, Path | str]:
    """fp32 artifact, and the int8 one or, when int8 fails its agreement gate (a near-tie in the
    held-out fold can flip), the reason it was refused: the demo reports it and goes on."""
    from dmf.export import ExportError, export_checkpoint

    say(f"export: {checkpoint} -> ONNX fp32 and int8")
    fp32 = export_checkpoint(checkpoint, out / "fp32", precision="fp32", force=True)
    try:
        int8 = export_checkpoint(checkpoint, out / "int8", precision="int8", force=True, agreement_data=agreement)
    except ExportError as exc:
        say(f"int8 not written: {exc}")
        return fp32, str(exc)
    return fp32, int8


def _parity(artifact: Path | str) -> dict:
    if isinstance(artifact, str):  # the int8 export was refused: keep why
        return {"refused": artifact}
    return json.loads((artifact / "dmf.json").read_text()).get("parity", {})


def _predict_heldout(corpus, artifact: Path, options: DemoOptions, say) -> list[dict]:
    from dmf.runtime import Predictor

    say(f"predict: {options.predict_clips} held-out clips with the torch-free runtime ({artifact})")
    test = [u for u in corpus.utterances if u.session == corpus.sessions()[0]][: options.predict_clips]
    with Predictor.load(artifact) as predictor:
        preds = predictor.predict_batch([(str(u.audio_path), u.text) for u in test])
    return [{"id": u.id, "text": u.text, "true": u.label, "predicted": p.label,
             "confidence": max(p.probabilities.values())} for u, p in zip(test, preds)]


def _bench(artifacts: list[Path], options: DemoOptions, say) -> dict:
    from dmf.bench.bench import BenchOptions, artifact_cases, run_bench
    from dmf.bench.measure import TimingOptions

    bench_options = BenchOptions(engines=("torch", "onnx", "onnx-int8"), batch_sizes=options.batch_sizes,
                                 timing=TimingOptions(warmup=2, min_runs=10, min_seconds=1.0))
    return run_bench(artifact_cases(artifacts), bench_options, progress=say)


def _write_summary(summary: dict, out: Path) -> None:
    from dmf.bench.render import markdown

    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2, default=str))
    lines = ["# dmf demo", "", "| fusion | WA | UA | macro F1 | fp32 max abs diff | int8 agreement |",
             "|---|---|---|---|---|---|"]
    for fusion, m in summary["models"].items():
        f = m["fold1"]
        lines.append(f"| {fusion} | {f.get('wa', 0):.3f} | {f.get('ua', 0):.3f} | {f.get('macro_f1', 0):.3f} | "
                     f"{m['fp32'].get('max_abs_diff', float('nan')):.2e} | "
                     f"{m['int8'].get('int8_agreement', 'refused: ' + m['int8'].get('refused', ''))} |")
    atomic_write_text(out / "demo.md", "\n".join(lines) + "\n\n" + markdown(summary["bench"]))


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from dmf.bench.render import rich_table

    console = Console()
    models = Table(title="dmf demo: synthetic corpus, tiny preset, fold 1 held out")
    for col in ("fusion", "WA", "UA", "macro F1", "ONNX fp32 max |diff|", "fp32 argmax agree", "int8 agree"):
        models.add_column(col)
    for fusion, m in summary["models"].items():
        f = m["fold1"]
        int8 = m["int8"].get("int8_agreement")
        models.add_row(fusion, f"{f.get('wa', 0):.3f}", f"{f.get('ua', 0):.3f}", f"{f.get('macro_f1', 0):.3f}",
                       f"{m['fp32'].get('max_abs_diff', float('nan')):.1e}",
                       f"{m['fp32'].get('argmax_agreement', float('nan')):.3f}",
                       "refused" if "refused" in m["int8"] else ("-" if int8 is None else f"{int8:.3f}"))
    console.print(models)
    preds = Table(title="held-out clips (torch-free runtime, memory fusion, ONNX fp32)")
    for col in ("id", "transcript", "true", "predicted", "p"):
        preds.add_column(col)
    for p in summary["predictions"]:
        preds.add_row(p["id"], p["text"][:40], p["true"], p["predicted"], f"{p['confidence']:.2f}")
    console.print(preds)
    console.print(rich_table(summary["bench"]))


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (corpus, runs, artifacts, summary)."),
    seed: int = typer.Option(0, help="Corpus and training seed."),
    utterances: int = typer.Option(400, help="Synthetic corpus size."),
    epochs: int = typer.Option(0, help="Training epochs (0: the tiny preset's default)."),
) -> None:
    """Synthesise, train memory + naive fusion, export ONNX fp32/int8, predict, benchmark: one summary."""
    from rich.console import Console

    console = Console(stderr=True)
    options = DemoOptions(out=out, seed=seed, utterances=utterances, epochs=epochs or None)
    try:
        summary = run_demo(options, say=lambda msg: console.rule(f"[bold]{msg}"))
    except (ValueError, RuntimeError) as exc:  # library errors (DataError, ExportError, ...) are one-liners
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    print_summary(summary)
    console.print(f"wrote {out / 'demo.json'} and {out / 'demo.md'}")
