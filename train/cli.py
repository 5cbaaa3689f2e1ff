"""`dmf train`: LOSO training from the command line (also `python -m dmf.train`).

Config precedence: preset < --config file < explicit flags. Library errors (ConfigError, DataError,
CheckpointError, AudioError, ...) become one red `error: ...` line on stderr and exit code 2.
torch is imported inside the command, so `dmf --help` stays light.

Several processes: `--nproc N` re-launches this same command through torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N -m dmf.train ...`); under torchrun
(`torchrun ... -m dmf.train ...`, one or several hosts) each worker joins the process group from
the environment. Rank 0 alone prints and writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dmf.cliutil import fail
from dmf.config import ConfigError, DMFConfig, preset
from dmf.train.options import DEFAULT_TIMEOUT_S, DEVICES, MEMORY_CHECKS, FitOptions

SECTIONS = ("model", "data", "train")


def parse_folds(fold: str) -> list[int] | None:
    """'all' -> None (every session); '3' -> [3]; '1,2' -> [1, 2]. Range is checked against the corpus."""
    if fold.strip().lower() == "all":
        return None
    try:
        return [int(part) for part in fold.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--fold {fold!r}: expected a session number (1..5), a comma list or 'all'") from None


def _merge(base: dict, layer: dict, source: str) -> dict:
    """Overlay a (partial) config dict on `base`, section by section."""
    if not isinstance(layer, dict):
        raise ConfigError(f"{source}: expected a JSON object with sections {SECTIONS}")
    unknown = set(layer) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown config section(s) {sorted(unknown)}; expected {SECTIONS}")
    merged = {name: dict(base.get(name, {})) for name in SECTIONS}
    for name, values in layer.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be an object")
        merged[name].update(values)
    return merged


def _read_config_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not readable JSON: {exc}") from None


def _flag_layer(flags: dict) -> dict:
    """Explicit flags as a partial config; an encoder flag also drops the preset's encoder config
    (so the id/path is loaded rather than a random-init architecture)."""
    sections = {
        "model": {"fusion": flags["fusion"], "audio_encoder": flags["audio_encoder"],
                  "text_encoder": flags["text_encoder"]},
        "data": {"path": flags["data"], "format": flags["format"], "seed": flags["seed"]},
        "train": {"epochs": flags["epochs"], "batch_size": flags["batch_size"], "optimizer": flags["optimizer"],
                  "lr": flags["lr"], "seed": flags["seed"], "grad_clip": flags.get("clip_grad"),
                  "precision": flags.get("precision")},
    }
    layer = {name: {k: v for k, v in values.items() if v is not None} for name, values in sections.items()}
    for kind in ("audio", "text"):
        if flags[f"{kind}_encoder"] is not None:
            layer["model"][f"{kind}_encoder_config"] = None
    return layer


def build_config(preset_name: str, config_file: Path | None, flags: dict, candidate: dict | None = None,
                 source: str = "candidate") -> DMFConfig:
    """preset < config file < explicit flags (None = not given) < a --select candidate's layer."""
    merged = preset(preset_name).to_dict()
    if config_file is not None:
        merged = _merge(merged, _read_config_file(config_file), str(config_file))
    merged = _merge(merged, _flag_layer(flags), "flags")
    if candidate is not None:
        merged = _merge(merged, candidate, source)
    return DMFConfig.from_dict(merged)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"results in {out}")
    for column in ("fold", "test", "n", "WA %", "UA %", "macro F1", "utt/s"):
        table.add_column(column, justify="right")
    rows = [(k, f["test_session"], f) for k, f in summary["folds"].items()]
    rows.append(("pooled", "", summary["pooled"]))
    for key, session, m in rows:
        speed = f"{m['utterances_per_s']:.1f}" if "utterances_per_s" in m else ""
        table.add_row(key, session, str(m["n_test"]), f"{100 * m['wa']:.1f}", f"{100 * m['ua']:.1f}",
                      f"{m['macro_f1']:.3f}", speed)
    Console().print(table)
    from dmf.train.report import average_line

    Console().print(average_line(summary), highlight=False)
    Console().print(f"report: {out / 'report.md'}")


def _run(flags: dict, preset_name: str, config_file: Path | None, fold: str, out: Path,
         options: FitOptions, select: Path | None = None) -> dict:
    from dmf.data.corpus import load_corpus
    from dmf.train.loso import run_training

    config = build_config(preset_name, config_file, flags)
    folds = parse_folds(fold)
    if options.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every {options.checkpoint_every}: expected an integer >= 0")
    if options.memory_check not in MEMORY_CHECKS:
        raise ConfigError(f"--memory-check {options.memory_check!r}: expected one of {MEMORY_CHECKS}")
    if options.device not in DEVICES:
        raise ConfigError(f"--device {options.device!r}: expected one of {DEVICES}")
    corpus = load_corpus(config.data.path, config.data.format, labels=config.model.labels)
    options.log = lambda line: Console().print(line, highlight=False)
    if select is not None:
        return _run_selection(flags, preset_name, config_file, select, corpus, out, folds, options)
    return run_training(config, corpus, out, folds, options=options)


def _run_selection(flags: dict, preset_name: str, config_file: Path | None, sweep: Path, corpus, out: Path,
                   folds: list[int] | None, options: FitOptions) -> dict:
    """--select: every candidate of the sweep file on every fold, chosen on validation UA (dmf.train.select)."""
    from dmf.train.select import load_sweep, run_selection

    configs = {name: build_config(preset_name, config_file, flags, layer, f"{sweep}: candidate {name!r}")
               for name, layer in load_sweep(sweep).items()}
    return run_selection(configs, corpus, out, folds, options)


def _forwarded_args(ctx, skip: tuple[str, ...] = ("nproc",)) -> list[str]:
    """This command's own options, rebuilt from the parsed values (not sys.argv, which differs
    between `dmf train` and `python -m dmf.train`), minus the launcher's."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in skip or value is None:
            continue
        if getattr(param, "is_flag", False) and param.secondary_opts:  # --x/--no-x
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif getattr(param, "is_flag", False):
            if value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


def _launch(nproc: int, args: list[str]) -> int:
    """Run `python -m dmf.train ARGS` as `nproc` workers under torchrun on this host; its exit status.
    torchrun stops every worker as soon as one fails, so one dead rank fails the whole job."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "dmf.train", *args]
    return subprocess.run(command).returncode


def _distributed_error() -> type[Exception]:
    from dmf.train.distributed import DistributedError

    return DistributedError


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user can cause (bad option, corpus, checkpoint, disk); anything else is a bug: traceback."""
    from dmf.data.corpus import DataError
    from dmf.encoders import EncoderError
    from dmf.checkpoint import CheckpointError
    from dmf.preprocess import AudioError, TextError

    return (ConfigError, DataError, AudioError, TextError, CheckpointError, EncoderError, OSError)


def train(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Corpus: IEMOCAP root (Session1..5/) or manifest (.csv/.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Output folder (fold checkpoints, metrics, report)."),
    format: Optional[str] = typer.Option(None, "--format", help="auto | iemocap | manifest."),
    fold: str = typer.Option("all", "--fold", help="Held-out session 1..5, a comma list, or 'all'."),
    fusion: Optional[str] = typer.Option(None, "--fusion", help="memory | naive | audio | text."),
    preset_name: str = typer.Option("paper", "--preset", help="paper | tiny (random-init toy encoders)."),
    audio_encoder: Optional[str] = typer.Option(None, "--audio-encoder", help="HF id or folder of a Wav2Vec2 model."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="HF id or folder of a BERT model."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs per fold."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Utterances per step."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd | adamw."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Network learning rate."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds training and the validation split."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="JSON config (partial sections allowed)."),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad",
                                              help="Max global gradient norm; 0: none (paper preset default)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 (autocast; fp32 weights)."),
    device: str = typer.Option(FitOptions.device, "--device", help="auto (CUDA when visible) | cpu | cuda."),
    checkpoint_every: int = typer.Option(FitOptions.checkpoint_every, "--checkpoint-every",
                                         help="Steps between resume states; 0: epoch ends."),
    progress: bool = typer.Option(FitOptions.progress, "--progress/--no-progress", help="Show progress bars."),
    nproc: int = typer.Option(1, "--nproc", help="Processes on this host (one per GPU), launched via torchrun; "
                                                 "--batch-size is per process."),
    memory_check: str = typer.Option(FitOptions.memory_check, "--memory-check",
                                     help="Several processes: compare the memory across ranks every 'epoch' or 'step'."),
    dist_timeout: float = typer.Option(DEFAULT_TIMEOUT_S, "--dist-timeout",
                                       help="Several processes: seconds a rank waits for the others before failing."),
    select: Optional[Path] = typer.Option(None, "--select", help="Sweep file: train each candidate per fold and keep "
                                                                 "the best on validation UA (docs/training.md)."),
) -> None:
    """Train and evaluate leave-one-session-out folds; re-running the same command resumes."""
    if nproc > 1:
        _launch_or_fail(nproc, ctx)
        return
    flags = dict(data=str(data), format=format, fusion=fusion, audio_encoder=audio_encoder,
                 text_encoder=text_encoder, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                 lr=lr, seed=seed, clip_grad=clip_grad, precision=precision)
    try:
        main = _join_group(nproc, dist_timeout)
        options = FitOptions(progress=progress and main, checkpoint_every=checkpoint_every,
                             memory_check=memory_check, device=device)
        summary = _run(flags, preset_name, config_file, fold, out, options, select)
    except _user_errors() + (_distributed_error(),) as exc:
        fail(exc)
    except RuntimeError as exc:
        _fail_if_peer_lost(exc)
        raise
    finally:
        _leave_group()
    if main and select is not None:
        from dmf.train.select import render_selection

        Console().print(render_selection(summary), highlight=False, markup=False)
        Console().print(f"selection: {out / 'selection.json'}")
    elif main:
        _print_summary(summary, out)


def _fail_if_peer_lost(exc: RuntimeError) -> None:
    """A collective broken by a dead or hung rank: one line instead of the traceback."""
    from dmf.train.distributed import peer_failure

    lost = peer_failure(exc)
    if lost is not None:
        fail(lost)


def _launch_or_fail(nproc: int, ctx: typer.Context) -> None:
    from dmf.train.distributed import launched_by_torchrun

    if launched_by_torchrun():
        fail(ConfigError(f"--nproc {nproc} launches torchrun itself: under torchrun, leave it out"))
    code = _launch(nproc, _forwarded_args(ctx))
    if code != 0:
        Console(stderr=True).print(
            f"[red]error:[/red] distributed training failed: a worker exited with an error or was killed "
            f"(torchrun exit status {code}, details above); re-run the same command to resume",
            markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(code if code > 0 else 1)  # killed by a signal: negative status


def _join_group(nproc: int, timeout_s: float) -> bool:
    """Join torchrun's process group when launched by it; True on rank 0 (the one that prints)."""
    from dmf.train.distributed import init_from_env

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: expected an integer >= 1")
    return init_from_env(timeout_s).is_main


def _leave_group() -> None:
    if "torch" in sys.modules:  # nothing to leave if torch was never imported (an early config error)
        from dmf.train.distributed import shutdown

        shutdown()


def register(app: typer.Typer) -> None:
    app.command("train")(train)
