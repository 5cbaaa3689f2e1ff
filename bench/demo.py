"""`dmf demo`: the whole pipeline in one command on the synthetic corpus, tiny preset, fold 1:
synthesise, train memory and naive fusion, export both to ONNX fp32 and int8 and to OpenVINO bf16
and mixed static int8 (calibrated on the corpus's training clips, every reduced precision gated on
the held-out session and the validation split), predict held-out clips with the torch-free
runtime, make a conversation (one held-out dialog's clips joined into conversation.wav with its
conversation.vtt transcript, the files the README's conversation commands use) and predict it
turn by turn, benchmark against torch and torch bf16, and print one summary (with the CPU line)
and the bench's plot. A reduced-precision export refused by its accuracy gate is reported with
its message and the demo goes on. Re-running resumes (finished training folds are kept)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from dmf.contract import META_FILE
from dmf.fileio import atomic_write_text

FUSIONS = ("memory", "naive")
# What each fusion is exported to (bench engine names, bench.ARTIFACT_ENGINES gives engine and
# precision); fp32 first. Both fusions get the fast CPU engines, so memory vs naive is compared on each.
EXPORTS = {fusion: ("onnx", "onnx-int8", "openvino-bf16", "openvino-int8") for fusion in ("memory", "naive")}
REDUCED = ("onnx-int8", "openvino-bf16", "openvino-int8")  # gated exports: a refusal is reported, not fatal
BENCH_ENGINES = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino-bf16", "openvino-int8")
GAP_S = 0.4  # silence between the dialog's clips in conversation.wav
LABEL_NAMES = {"neu": "neutral", "hap": "happy+excited", "sad": "sad", "ang": "angry"}  # the IEMOCAP codes
# docs/results.md, "After: BatchNorm recalibrated": what one fold does not show
FIVE_FOLDS = ("fold 1 only: over five folds and three seeds memory fusion averaged 71.7 against naive "
              "fusion's 62.4 LOSO UA on this corpus, with a spread over folds 1.4 times naive's "
              "(docs/results.md, \"After: BatchNorm recalibrated\")")


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
    summary["conversation"] = _conversation(corpus, artifacts["memory"]["onnx"], options.out, say)
    summary["bench"] = _bench(artifacts, options, say)
    _write_summary(summary, options.out)
    _plot(summary["bench"], options.out / "bench.png", say)
    return summary


def _plot(bench: dict, path: Path, say) -> None:
    """The bench's plot (dmf bench's bench.png); matplotlib comes with the train extra the demo needs."""
    from dmf.bench.render import plot

    if bench.get("rows"):
        plot(bench, path)
        say(f"plot: {path}")


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


def _conversation(corpus, artifact: Path, out: Path, say) -> dict:
    """conversation.wav + conversation.vtt: the longest dialog of the held-out session, its clips
    in order joined with GAP_S of silence, each cue '<speaker>: <transcript>'; then its turns
    through the torch-free runtime and conversation_timeline.png. Returns paths and counts."""
    from dmf.runtime import Predictor
    from dmf.runtime.conversation import plot_timeline

    clips = held_out_dialog(corpus)
    wav, vtt, png = out / "conversation.wav", out / "conversation.vtt", out / "conversation_timeline.png"
    say(f"conversation: {len(clips)} held-out clips -> {wav}, {vtt}")
    write_conversation(clips, wav, vtt)
    with Predictor.load(artifact) as predictor:
        result = predictor.predict_conversation(wav, vtt)
    plot_timeline(result, png)
    matched = sum(t.prediction.label == u.label for t, u in zip(result.turns, clips))
    return {"recording": str(wav), "transcript": str(vtt), "plot": str(png), "turns": len(result.turns),
            "matching_corpus_label": matched}


def held_out_dialog(corpus) -> list:
    """The held-out session's (fold 1's) longest dialog, in utterance order: clips no model saw."""
    session = corpus.sessions()[0]
    dialogs: dict[str, list] = {}
    for u in corpus.utterances:
        if u.session == session:
            dialogs.setdefault(u.id.rsplit("_", 1)[0], []).append(u)
    longest = max(dialogs.values(), key=len)
    return sorted(longest, key=lambda u: int(re.sub(r"\D", "", u.id.rsplit("_", 1)[1]) or 0))


def write_conversation(clips: list, wav: Path, vtt: Path) -> None:
    """The clips joined with GAP_S of silence (one rate: the synthetic corpus writes 16 kHz mono)
    and a WebVTT transcript (pysubs2) whose cues name the speaker; both written atomically."""
    import numpy as np
    import pysubs2
    import soundfile as sf

    from dmf.fileio import atomic_write

    parts, subs, rate, t = [], pysubs2.SSAFile(), None, 0.0
    for u in clips:
        audio, sr = sf.read(str(u.audio_path), dtype="float32", always_2d=True)
        if rate not in (None, sr):
            raise ValueError(f"{u.audio_path}: {sr} Hz, the dialog's other clips are {rate} Hz")
        rate, seconds = sr, len(audio) / sr
        # end rounded down: the last cue must not reach past the recording's end
        subs.append(pysubs2.SSAEvent(start=round(1000 * t), end=int(1000 * (t + seconds)),
                                     text=f"{u.speaker}: {u.text}"))
        parts += [audio.mean(axis=1), np.zeros(round(GAP_S * sr), dtype=np.float32)]
        t += seconds + GAP_S
    recording = np.concatenate(parts[:-1])
    atomic_write(wav, lambda tmp: sf.write(str(tmp), recording, rate, format="WAV", subtype="PCM_16"))
    atomic_write_text(vtt, subs.to_string("vtt"))


def _bench(artifacts: dict[str, dict[str, Path | str]], options: DemoOptions, say) -> dict:
    """Every written artifact (and torch on their checkpoints); an engine without an artifact is
    reported as skipped with why: its export's refusal, or that the demo does not make it."""
    from dmf.bench.bench import BenchOptions, artifact_cases, run_bench
    from dmf.bench.measure import TimingOptions

    cases = artifact_cases([p for by_name in artifacts.values() for p in by_name.values() if isinstance(p, Path)])
    explain_missing(cases, artifacts, options.bench_engines)
    bench_options = BenchOptions(engines=options.bench_engines, batch_sizes=options.batch_sizes,
                                 timing=TimingOptions(warmup=2, min_runs=10, min_seconds=1.0))
    return run_bench(cases, bench_options, progress=say)


def explain_missing(cases: list, artifacts: dict[str, dict[str, Path | str]], engines: tuple[str, ...]) -> None:
    """Record in each case why a bench engine has no artifact: its export's refusal, or that the
    demo does not make it (bench.Case.unavailable: the bench reports it as skipped, with this)."""
    from dmf.bench.bench import ARTIFACT_ENGINES

    for case in cases:
        for name in sorted(set(engines) & set(ARTIFACT_ENGINES) - set(case.artifacts)):
            refused = artifacts.get(case.fusion, {}).get(name)
            case.unavailable[name] = (f"export refused: {refused}" if isinstance(refused, str)
                                      else f"the demo does not export {name} for the {case.fusion} model")


# ------------------------------------------------------------------------------------- summary
def models_section(summary: dict):
    from dmf.bench.render import Section

    rows = [[fusion, *(f"{m['fold1'].get(k, 0):.3f}" for k in ("wa", "ua", "macro_f1"))]
            for fusion, m in summary["models"].items()]
    return Section("dmf demo: synthetic corpus, tiny preset, fold 1 held out", ["fusion", "WA", "UA", "macro F1"],
                   rows, "test metrics of the held-out session (torch, fp32); " + FIVE_FOLDS)


def _export_row(fusion: str, name: str, parity: dict) -> list[str]:
    """fp32: against torch on the verify inputs; reduced: the accuracy gate on the gate's clips
    (held-out session + validation split): agreement over decided clips, flips (near-tie flips),
    UA of fp32 -> the export on the held-out session. A refusal shows the figures its message gives."""
    if "refused" in parity:
        return [fusion, name, "refused", *refused_figures(parity["refused"]), "-"]
    if name not in REDUCED:
        return [fusion, name, "torch", f"{parity.get('argmax_agreement', float('nan')):.3f}", "-", "-",
                f"{parity.get('max_abs_diff', float('nan')):.1e}"]
    gate = parity.get("accuracy_gate") or {}
    if not gate.get("gated", True) or "argmax_agreement" not in gate:
        return [fusion, name, "not gated", "-", "-", "-", "-"]
    ua = f"{gate['ua_fp32']:.3f} -> {gate['ua']:.3f}" if gate.get("ua") is not None else "-"
    flips = f"{gate.get('flips', '-')} ({gate.get('near_tie_flips', '-')})"
    return [fusion, name, f"fp32, {gate.get('clips', gate.get('samples', '?'))} clips",
            f"{gate['argmax_agreement']:.3f}", flips, ua, "-"]


def refused_figures(message: str) -> list[str]:
    """[agree, flips, UA] from an accuracy-gate refusal's one-line message (export/verify.py's
    wording: 'agreement with fp32 0.945 < 0.99 (6 of 110 decided clips flipped)', 'UA 55.0 more
    than 1 point below fp32's 61.3'); '-' for a figure the message does not give."""
    agree = re.search(r"agreement with fp32 ([\d.]+)", message)
    flips = re.search(r"\((\d+) of \d+ decided clips flipped\)", message)
    ua = re.search(r"UA ([\d.]+) more than .* fp32's ([\d.]+)", message)
    return [agree.group(1) if agree else "-", flips.group(1) if flips else "-",
            f"{float(ua.group(2)) / 100:.3f} -> {float(ua.group(1)) / 100:.3f}" if ua else "-"]


def exports_section(summary: dict):
    from dmf.bench.render import Section

    rows = [_export_row(fusion, name, parity) for fusion, m in summary["models"].items()
            for name, parity in m["exports"].items()]
    return Section("exports and their checks", ["fusion", "artifact", "against", "agree", "flips", "UA",
                                                "max diff"], rows,
                   "agree: argmax agreement (reduced precisions: over clips whose fp32 top-2 margin is at least "
                   "0.02); flips: decided clips whose label changed (near-tie flips in brackets, not counted); UA: fp32 -> the export on the held-out "
                   "session; reduced precisions pass the accuracy gate (agreement >= 0.99, UA within 1 point "
                   "of fp32) or are refused (reasons below)", text_columns=3)


def refusals(summary: dict) -> list[str]:
    return [f"{fusion} {name} refused: {p['refused']}" for fusion, m in summary["models"].items()
            for name, p in m["exports"].items() if "refused" in p]


def predictions_section(summary: dict):
    from dmf.bench.render import Section

    rows = [[p["id"], p["text"][:32], p["true"], p["predicted"], f"{p['confidence']:.2f}"]
            for p in summary["predictions"]]
    codes = ", ".join(f"{k} {v}" for k, v in LABEL_NAMES.items() if k != v)
    return Section("held-out clips (torch-free runtime, memory fusion, ONNX fp32)",
                   ["id", "transcript", "true", "predicted", "p"], rows,
                   f"p: the predicted label's probability; labels: {codes}, sad", text_columns=4)


def conversation_lines(summary: dict) -> list[str]:
    conv = summary.get("conversation")
    if not conv:
        return []
    return [f"conversation: {conv['recording']} + {conv['transcript']}, {conv['turns']} turns "
            f"({conv['matching_corpus_label']} match their corpus label), timeline {conv['plot']}"]


def _write_summary(summary: dict, out: Path) -> None:
    from dmf.bench.bench import json_default
    from dmf.bench.render import markdown, markdown_sections

    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2, default=json_default))
    lines = ["# dmf demo", *markdown_sections([models_section(summary), exports_section(summary)])]
    lines += ["", *(f"- {line}" for line in refusals(summary))] if refusals(summary) else []
    lines += ["", *conversation_lines(summary)] if conversation_lines(summary) else []
    # the bench report follows, one heading level down
    bench = markdown(summary["bench"]).replace("\n#", "\n##").replace("# dmf bench", "## dmf bench", 1)
    atomic_write_text(out / "demo.md", "\n".join(lines) + "\n\n" + bench)


def print_summary(summary: dict) -> None:
    from dmf.bench.render import print_result, print_sections
    from dmf.cliutil import console

    out = console(stderr=False)
    print_sections(out, [models_section(summary), exports_section(summary), predictions_section(summary)])
    for line in refusals(summary):  # wrapped at the terminal's width (the messages run to 200+ characters)
        out.print(line, style="yellow", markup=False, soft_wrap=False)
    for line in conversation_lines(summary):
        out.print(line, markup=False, soft_wrap=False)
    print_result(out, summary["bench"])


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (corpus, runs, artifacts, summary)."),
    seed: int = typer.Option(0, help="Corpus and training seed."),
    utterances: int = typer.Option(400, help="Synthetic corpus size."),
    epochs: int = typer.Option(0, help="Training epochs (0: the tiny preset's default)."),
) -> None:
    """Synthetic corpus to benchmark in one command: train, export, predict, bench, one summary.

    Synthesises a corpus, trains memory and naive fusion (tiny preset, fold 1), exports ONNX
    fp32/int8 and OpenVINO bf16/int8, predicts held-out clips and a conversation, benchmarks
    against torch and torch bf16. Re-running resumes."""
    from rich.markup import escape

    from dmf.bench.bench import BenchError
    from dmf.checkpoint import CheckpointError
    from dmf.cliutil import console, fail
    from dmf.config import ConfigError
    from dmf.data import DataError
    from dmf.export import ExportError
    from dmf.runtime.artifact import ArtifactError
    from dmf.runtime.engine import EngineError

    err = console()
    options = DemoOptions(out=out, seed=seed, utterances=utterances, epochs=epochs or None)
    try:
        # training's and NNCF's progress bars write to stdout: send them to the log (stderr), so
        # stdout holds the summary alone
        with contextlib.redirect_stdout(sys.stderr):
            summary = run_demo(options, say=lambda msg: err.rule(f"[bold]{escape(msg)}"))
    except (DataError, ConfigError, ExportError, CheckpointError, ArtifactError, EngineError, BenchError) as exc:
        fail(exc)
    print_summary(summary)
    err.print(f"wrote {out / 'demo.json'}, {out / 'demo.md'}, {out / 'bench.png'}, {out / 'conversation.wav'}, "
              f"{out / 'conversation.vtt'} and {out / 'conversation_timeline.png'}", markup=False)
