"""`dmf demo`: the whole pipeline in one command on the synthetic corpus, tiny preset, fold 1:
synthesise, train memory and naive fusion, export both to ONNX fp32 and int8 and the memory model
to OpenVINO bf16 and static int8 (calibrated on the corpus), predict held-out clips with the
torch-free runtime, benchmark against torch and torch bf16, and print one summary (with the CPU
line). A reduced-precision export refused by its accuracy gate is reported with its message and
the demo goes on. Re-running resumes (finished training folds are kept)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from dmf.config import atomic_write_text
from dmf.contract import META_FILE

FUSIONS = ("memory", "naive")
# What each fusion is exported to (bench engine names, bench.ARTIFACT_ENGINES gives engine and
# precision); fp32 first. OpenVINO for the memory model only: it is the model the speed is about,
# and each OpenVINO export (NNCF calibration, accuracy gate) adds to `make demo`'s run time.
EXPORTS = {"memory": ("onnx", "onnx-int8", "openvino-bf16", "openvino-int8"), "naive": ("onnx", "onnx-int8")}
REDUCED = ("onnx-int8", "openvino-bf16", "openvino-int8")  # gated exports: a refusal is reported, not fatal
BENCH_ENGINES = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino-bf16", "openvino-int8")


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("runs/demo")  # everything the demo writes goes under here
    seed: int = 0  # corpus and training seed
    utterances: int = 400  # size of the synthetic corpus
    epochs: int | None = None  # None: the tiny preset's default
    batch_sizes: tuple[int, ...] = (1, 8)  # bench batch sizes
    bench_engines: tuple[str, ...] = BENCH_ENGINES  # engines `dmf bench` times (torch-bf16 skips without bf16)
    predict_clips: int = 5  # held-out clips shown with their predictions


def run_demo(options: DemoOptions, say) -> dict:
    """Returns the summary dict (also written to out/demo.json and out/demo.md)."""
    from dmf.data import load_corpus

    corpus_dir = _corpus(options, say)
    corpus = load_corpus(corpus_dir)
    summary: dict = {"corpus": str(corpus_dir), "utterances": len(corpus.utterances), "models": {}}
    artifacts: dict[str, dict[str, Path | str]] = {}
    for fusion in FUSIONS:
        run_dir = options.out / fusion
        metrics = _train(corpus, fusion, run_dir, options, say)
        artifacts[fusion] = _export(run_dir / "fold1", options.out / "artifacts" / fusion, corpus_dir,
                                    EXPORTS[fusion], say)
        summary["models"][fusion] = {"fold1": metrics,
                                     "exports": {name: _parity(p) for name, p in artifacts[fusion].items()}}
    summary["predictions"] = _predict_heldout(corpus, artifacts["memory"]["onnx"], options, say)
    written = [p for by_name in artifacts.values() for p in by_name.values() if isinstance(p, Path)]
    summary["bench"] = _bench(written, options, say)
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


def _export(checkpoint: Path, out: Path, corpus_dir: Path, names: tuple[str, ...], say) -> dict[str, Path | str]:
    """bench engine name -> its artifact, or for a reduced precision that fails its accuracy gate
    (a near-tie in the held-out fold can flip) the reason it was refused: the demo reports it and
    goes on. Reduced precisions calibrate (static int8) and are gated on the corpus: its training
    sessions and the fold's held-out session (the checkpoint's metrics.json)."""
    from dmf.bench.bench import ARTIFACT_ENGINES
    from dmf.export import ExportError, export_checkpoint

    done: dict[str, Path | str] = {}
    for name in names:
        engine, precision = ARTIFACT_ENGINES[name]
        say(f"export: {checkpoint} -> {name} ({engine} {precision})")
        try:
            done[name] = export_checkpoint(checkpoint, out / name, engine=engine, precision=precision, force=True,
                                           calibration=corpus_dir if name in REDUCED else None)
        except ExportError as exc:
            if name not in REDUCED:
                raise
            say(f"{name} not written: {exc}")
            done[name] = str(exc)
    return done


def _parity(artifact: Path | str) -> dict:
    if isinstance(artifact, str):  # the export was refused: keep why
        return {"refused": artifact}
    return json.loads((artifact / META_FILE).read_text()).get("parity", {})


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

    bench_options = BenchOptions(engines=options.bench_engines, batch_sizes=options.batch_sizes,
                                 timing=TimingOptions(warmup=2, min_runs=10, min_seconds=1.0))
    return run_bench(artifact_cases(artifacts), bench_options, progress=say)


# ------------------------------------------------------------------------------------- summary
def _agreement(parity: dict | None) -> str:
    """Held-out argmax agreement of a reduced-precision export with fp32, "refused" or "-"."""
    if parity is None:
        return "-"  # not exported for this fusion
    if "refused" in parity:
        return "refused"
    value = (parity.get("accuracy_gate") or {}).get("argmax_agreement", parity.get("int8_agreement"))
    return "-" if value is None else f"{value:.3f}"


def models_section(summary: dict):
    from dmf.bench.render import Section

    rows = []
    for fusion, m in summary["models"].items():
        f, fp32 = m["fold1"], m["exports"].get("onnx", {})
        rows.append([fusion, f"{f.get('wa', 0):.3f}", f"{f.get('ua', 0):.3f}", f"{f.get('macro_f1', 0):.3f}",
                     f"{fp32.get('max_abs_diff', float('nan')):.1e}", f"{fp32.get('argmax_agreement', float('nan')):.3f}",
                     *(_agreement(m["exports"].get(name)) for name in REDUCED)])
    return Section("dmf demo: synthetic corpus, tiny preset, fold 1 held out",
                   ["fusion", "WA", "UA", "macro F1", "onnx max |diff|", "onnx agree", *(f"{n} agree" for n in REDUCED)],
                   rows, "onnx: fp32 ONNX vs torch on the verify inputs; reduced precisions: argmax agreement "
                   "with fp32 on the held-out fold (accuracy gate: >= 0.99, UA within 1 point)")


def refusals(summary: dict) -> list[str]:
    return [f"{fusion} {name} refused: {p['refused']}" for fusion, m in summary["models"].items()
            for name, p in m["exports"].items() if "refused" in p]


def predictions_section(summary: dict):
    from dmf.bench.render import Section

    rows = [[p["id"], p["text"][:40], p["true"], p["predicted"], f"{p['confidence']:.2f}"]
            for p in summary["predictions"]]
    return Section("held-out clips (torch-free runtime, memory fusion, ONNX fp32)",
                   ["id", "transcript", "true", "predicted", "p"], rows, text_columns=4)


def _write_summary(summary: dict, out: Path) -> None:
    from dmf.bench.render import markdown, markdown_sections

    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2, default=str))
    lines = ["# dmf demo", *markdown_sections([models_section(summary)])]
    lines += ["", *(f"- {line}" for line in refusals(summary))] if refusals(summary) else []
    # the bench report follows, one heading level down
    bench = markdown(summary["bench"]).replace("\n#", "\n##").replace("# dmf bench", "## dmf bench", 1)
    atomic_write_text(out / "demo.md", "\n".join(lines) + "\n\n" + bench)


def print_summary(summary: dict) -> None:
    from dmf.bench.render import print_result, rich_tables
    from dmf.cliutil import console

    out = console(stderr=False)
    for table in rich_tables([models_section(summary), predictions_section(summary)]):
        out.print(table)
    for line in refusals(summary):
        out.print(line, style="yellow", markup=False)
    print_result(out, summary["bench"])


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (corpus, runs, artifacts, summary)."),
    seed: int = typer.Option(0, help="Corpus and training seed."),
    utterances: int = typer.Option(400, help="Synthetic corpus size."),
    epochs: int = typer.Option(0, help="Training epochs (0: the tiny preset's default)."),
) -> None:
    """Synthesise, train memory + naive fusion, export (ONNX fp32/int8, OpenVINO bf16/int8), predict,
    benchmark against torch and torch bf16: one summary."""
    from rich.markup import escape

    from dmf.bench.bench import BenchError
    from dmf.checkpoint import CheckpointError
    from dmf.cliutil import console, fail
    from dmf.config import ConfigError
    from dmf.data import DataError
    from dmf.export import ExportError
    from dmf.runtime.artifact import ArtifactError
    from dmf.runtime.engines import EngineError

    err = console()
    options = DemoOptions(out=out, seed=seed, utterances=utterances, epochs=epochs or None)
    try:
        summary = run_demo(options, say=lambda msg: err.rule(f"[bold]{escape(msg)}"))
    except (DataError, ConfigError, ExportError, CheckpointError, ArtifactError, EngineError, BenchError) as exc:
        fail(exc)
    print_summary(summary)
    err.print(f"wrote {out / 'demo.json'} and {out / 'demo.md'}", markup=False)
