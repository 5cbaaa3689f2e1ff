"""Training of one LOSO fold: optimiser, loop, validation, best checkpoint, early stopping, resume.

The fold folder is a complete checkpoint (`DMFModel.save_pretrained`) of the best validation UA.
A resume state lives in `fold_dir/_resume/`: each save is a fresh sub-folder (model checkpoint +
`state.pt` with optimizer, counters, RNG states, pending memory), published by atomically
rewriting `latest.json`, so a kill at any instant leaves the previous state usable.

Under torchrun (`dmf.train.distributed`) every rank runs this same loop on its shard of each global
batch, through DistributedDataParallel; rank 0 alone evaluates, writes files and shows progress,
and shares its decisions (early stopping, metrics) with the others by broadcast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch
from torch import nn

from dmf.checkpoint import CheckpointError
from dmf.config import ConfigError, DMFConfig, TrainConfig
from dmf.fileio import atomic_write_text
from dmf.loss import DMFObjective
from dmf.model import DMFModel, parameter_groups
from dmf.train import diagnostics, distributed
from dmf.train.dataset import AudioCache, Batchable, FoldSplit, encode_utterances
from dmf.train.metrics import compute_metrics
from dmf.train.options import DEVICES, MEMORY_CHECKS, FitOptions

RESUME_DIR = "_resume"
RESUME_FORMAT = "dmf-resume-1"


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches done in the current (incomplete) epoch
    global_step: int = 0  # optimizer steps over all epochs
    saves: int = 0  # resume states written (names the sub-folders)
    best_ua: float = -1.0  # best validation UA so far
    best_epoch: int = 0  # 1-based epoch of the best checkpoint
    stale_epochs: int = 0  # epochs since the last improvement (early stopping)
    stopped: bool = False  # early-stopped or all epochs done
    train_seconds: float = 0.0  # wall time in training steps (excludes evaluation, preprocessing)
    trained_utterances: int = 0  # utterances through training steps (all ranks together)
    world_size: int = 1  # processes of the run that wrote the state (the batch order depends on it)
    running: dict = field(default_factory=lambda: dict(loss=0.0, nll=0.0, correct=0, seen=0, batches=0))
    history: list = field(default_factory=list)  # one dict per finished epoch


# ------------------------------------------------------------------------------------- building


def seed_everything(seed: int, num_threads: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def build_optimizer(model: DMFModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Two groups (docs/design.md, 'Optimiser'): network at `lr`, memory module at `memory_lr`.

    The memory module is the reader, the composer and the writer.
    """
    network, memory = parameter_groups(model)
    groups = [{"params": network, "lr": cfg.lr}]
    if memory:
        groups.append({"params": memory, "lr": cfg.memory_lr})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled row indices of each batch of an epoch; a function of (seed, epoch) only, so a
    resumed run replays the same order. A last batch of one row is dropped (BatchNorm needs 2)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    batches = list(order.split(batch_size))
    if batches and len(batches[-1]) == 1:
        batches.pop()
    return batches


def rank_batches(n: int, cfg: TrainConfig, epoch: int, ctx: distributed.Context) -> list[torch.Tensor]:
    """This rank's row indices of each step: the epoch's global batches of world * batch_size rows,
    sharded in rank order (`distributed.shard_batches`); exactly `epoch_batches` in one process."""
    global_batches = epoch_batches(n, cfg.batch_size * ctx.world_size, cfg.seed, epoch)
    return distributed.shard_batches(global_batches, ctx.rank, ctx.world_size)


# --------------------------------------------------------------------------------- steps, evaluation


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, precision: str):
    """The step's autocast region: bf16 for `precision="bf16"` (weights, gradients and optimizer
    state stay fp32; the fusion and the loss switch it off for themselves), a no-op for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model: DMFModel, optimizer: torch.optim.Optimizer, batch: tuple, config: DMFConfig,
               forward: nn.Module | None = None) -> dict:
    """One optimizer step on (audio, ids, mask, labels); returns loss, nll and correct count.
    `forward`: what runs the batch, the model's DMFObjective (wrapped by DistributedDataParallel
    under torchrun); built here when not given."""
    forward = forward if forward is not None else DMFObjective(model)
    device = _device_of(model)
    audio, ids, mask, labels = (t.to(device) for t in batch)
    forward.train()
    with autocast(device, config.train.precision):
        out = forward(audio, ids, mask, labels)  # LossOutput: total, nll, similarity, log_probs (B, C)
    optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    grads = diagnostics.grad_norms(model)  # before clipping: what the loss asked for
    if config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.train.grad_clip)
    optimizer.step()
    correct = int((out.log_probs.argmax(-1) == labels).sum())
    return dict(loss=float(out.total.detach()), nll=float(out.nll), correct=correct, seen=len(labels),
                similarity=float(out.similarity), **grads)


@torch.no_grad()
def predict(model: DMFModel, data: Batchable, batch_size: int = 16) -> np.ndarray:
    """Eval-mode class indices (N,) in data order (eval never writes memory)."""
    model.eval()
    device = _device_of(model)
    preds = []
    for index in torch.arange(len(data)).split(batch_size):
        audio, ids, mask, _ = (t.to(device) for t in data.rows(index))
        preds.append(model(audio, ids, mask).argmax(-1).cpu())
    return torch.cat(preds).numpy()


def evaluate(model: DMFModel, data: Batchable, batch_size: int = 16) -> dict:
    """compute_metrics over `data`, plus the predictions (ids, true, pred) for pooling."""
    pred = predict(model, data, batch_size)
    true = data.labels.numpy()
    metrics = compute_metrics(true, pred, model.model_config.labels)
    metrics["predictions"] = {"ids": list(data.ids), "true": true.tolist(), "pred": pred.tolist()}
    return metrics


@torch.no_grad()
def recalibrate_batchnorm(model: DMFModel, data: Batchable, batch_size: int, ctx: distributed.Context) -> None:
    """Re-estimate every BatchNorm's running statistics from `data` as evaluation sees it: the
    noiseless read of the current memory, dropout off, nothing written; each batch weighs the same
    (momentum None). Training's running averages are gathered from Gumbel reads of a memory that is
    rewritten at every step and trail it (docs/results.md, 'What the logged quantities show').
    Every rank calls this with its shard of the same batches: the composer's BatchNorm all-reduces."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    device = _device_of(model)
    in_order = list(torch.arange(len(data)).split(batch_size * ctx.world_size))
    for index in distributed.shard_batches(in_order, ctx.rank, ctx.world_size):
        audio, ids, mask, _ = (t.to(device) for t in data.rows(index))
        model(audio, ids, mask)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
        norm.eval()


# --------------------------------------------------------------------------------------- resume


def _parked(fold_dir: Path) -> Path:
    """Where `_resume` waits while save_pretrained swaps the whole fold folder."""
    return fold_dir.parent / f".{fold_dir.name}{RESUME_DIR}"


def save_best(model: DMFModel, fold_dir: Path) -> None:
    """save_pretrained replaces the whole folder; park the resume state outside meanwhile
    (os.replace is atomic, so at any instant it is in exactly one of the two places)."""
    resume, parked = fold_dir / RESUME_DIR, _parked(fold_dir)
    if resume.exists():
        os.replace(resume, parked)
    model.save_pretrained(fold_dir)
    if parked.exists():
        os.replace(parked, resume)


def _resume_root(fold_dir: Path) -> Path | None:
    for root in (fold_dir / RESUME_DIR, _parked(fold_dir)):
        if (root / "latest.json").is_file():
            return root
    return None


def clear_resume(fold_dir: Path) -> None:
    for root in (fold_dir / RESUME_DIR, _parked(fold_dir)):
        shutil.rmtree(root, ignore_errors=True)


def _rng_state() -> dict:
    """RNG states as tensors and ints, so torch.load(weights_only=True) can read them back."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [int(pos), int(has_gauss), float(gauss)],
             "python": [version, torch.tensor(mt, dtype=torch.int64), py_gauss]}
    if torch.cuda.is_available():  # the Gumbel noise of a GPU run comes from the current device's generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, py_gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in mt.tolist()), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # every rank: the ranks' streams are identical anyway


def save_resume(fold_dir: Path, model: DMFModel, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    """Write a new resume state aside, publish it via latest.json, then prune the older ones."""
    root = fold_dir / RESUME_DIR
    root.mkdir(parents=True, exist_ok=True)
    state.saves += 1
    name = f"state-{state.saves:06d}"
    stage = Path(tempfile.mkdtemp(dir=root, prefix=".stage-"))
    pending = getattr(model.fusion, "pending_memory", None)
    pending_write = getattr(model.fusion, "pending_write", None)  # write_through_read: the inputs to rebuild
    payload = {"format": RESUME_FORMAT, "state": dataclasses.asdict(state), "optimizer": optimizer.state_dict(),
               "pending_memory": list(pending) if pending is not None else None,
               "pending_write": list(pending_write) if pending_write is not None else None, "rng": _rng_state()}
    model.save_pretrained(stage / "model")
    tmp = stage / "state.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, stage / "state.pt")
    os.replace(stage, root / name)
    atomic_write_text(root / "latest.json", json.dumps({"name": name}))
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_resume(fold_dir: Path, config: DMFConfig, ctx: distributed.Context | None = None):
    """(model, optimizer, state) from the latest resume state, or None when there is none.
    Every rank of a multi-process run loads the same state (rank 0 wrote it)."""
    ctx = ctx or distributed.context()
    root = _resume_root(fold_dir)
    if root is None:
        return None
    try:
        path = root / json.loads((root / "latest.json").read_text())["name"]
        payload = torch.load(path / "state.pt", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"corrupt resume state in {root} ({exc}); delete it to start the fold over") from None
    if payload.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path / 'state.pt'} is not a {RESUME_FORMAT} resume state")
    _check_world_size(payload["state"], ctx, path)
    model = DMFModel.from_pretrained(path / "model").train().to(ctx.device)
    optimizer = build_optimizer(model, config.train)
    optimizer.load_state_dict(payload["optimizer"])
    if payload["pending_memory"] is not None:
        model.fusion.pending_memory = tuple(t.to(ctx.device) for t in payload["pending_memory"])
    if payload.get("pending_write") is not None:  # absent in states written before write_through_read
        model.fusion.pending_write = tuple(t.to(ctx.device) for t in payload["pending_write"])
    _set_rng_state(payload["rng"])
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)
    return model, optimizer, TrainState(**payload["state"])


def _check_world_size(state: dict, ctx: distributed.Context, path: Path) -> None:
    """Mid-epoch, the remaining batches depend on the process count (global batch = world x batch
    size): continuing with another count would replay a different order. At an epoch end any count
    may continue."""
    written = state.get("world_size", 1)
    if state.get("step", 0) > 0 and written != ctx.world_size:
        raise CheckpointError(f"{path} was written mid-epoch by a {written}-process run; resume it with "
                              f"{written} processes (--nproc {written}), or delete it to start the fold over")


# ------------------------------------------------------------------------------------------ loop


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.2f}"),
                    TimeElapsedColumn(), disable=not enabled, transient=False)


@dataclass
class _Run:
    """The live objects of one fold's training."""

    config: DMFConfig
    fold_dir: Path
    model: DMFModel
    optimizer: torch.optim.Optimizer
    state: TrainState
    train: Batchable
    val: Batchable
    options: FitOptions
    ctx: distributed.Context = field(default_factory=distributed.Context)
    forward: nn.Module | None = None  # the model's DMFObjective (DDP-wrapped in a multi-process run)


def _global_step_stats(out: dict, ctx: distributed.Context) -> dict:
    """Loss and accuracy of the global batch (mean of the ranks' equal-size means, summed counts),
    so the running figures, history and resume state are the same on every rank."""
    if not ctx.distributed:
        return out
    values = torch.tensor([out["loss"], out["nll"], out["correct"], out["seen"]], dtype=torch.float64)
    values = values.to(ctx.device)
    torch.distributed.all_reduce(values)
    loss, nll, correct, seen = values.tolist()
    same = {k: out[k] for k in diagnostics.STEP_KEYS if k in out}  # equal on every rank (all-reduced grads, global write)
    return dict(loss=loss / ctx.world_size, nll=nll / ctx.world_size, correct=int(correct), seen=int(seen), **same)


def _accumulate(state: TrainState, out: dict, seconds: float) -> None:
    run = state.running
    for key in ("loss", "nll"):
        run[key] += out[key]
    run["correct"] += out["correct"]
    run["seen"] += out["seen"]
    run["batches"] += 1
    diagnostics.accumulate(run, out)
    state.step += 1
    state.global_step += 1
    state.train_seconds += seconds
    state.trained_utterances += out["seen"]


def run_epoch(run: _Run, progress, task) -> None:
    """Train the rest of the current epoch (from state.step), with mid-epoch resume states."""
    state, cfg = run.state, run.config.train
    batches = rank_batches(len(run.train), cfg, state.epoch, run.ctx)
    progress.reset(task, total=len(batches), completed=state.step,
                   description=f"epoch {state.epoch + 1}/{cfg.epochs}")
    for index in batches[state.step:]:
        start = time.perf_counter()
        out = train_step(run.model, run.optimizer, run.train.rows(index), run.config, run.forward)
        _accumulate(state, _global_step_stats(out, run.ctx), time.perf_counter() - start)
        if run.options.memory_check == "step":
            distributed.check_memory_in_sync(run.model, state.epoch + 1, state.step)
        r = state.running
        progress.update(task, advance=1, loss=r["loss"] / r["batches"], acc=r["correct"] / max(r["seen"], 1))
        every = run.options.checkpoint_every
        if every > 0 and state.global_step % every == 0 and state.step < len(batches) and run.ctx.is_main:
            save_resume(run.fold_dir, run.model, run.optimizer, state)
    distributed.check_memory_in_sync(run.model, state.epoch + 1, state.step)


def end_epoch(run: _Run) -> dict:
    """Validate, keep the best checkpoint, update early stopping, record history. In a multi-process
    run rank 0 does this alone (eval never writes memory) and the others take its state: they wait
    for it in the broadcast."""
    if run.config.train.recalibrate_batchnorm:
        recalibrate_batchnorm(run.model, run.train, run.config.train.batch_size, run.ctx)
    if run.ctx.is_main:
        entry = _end_epoch_main(run)
    else:
        entry = None
    run.state, entry = distributed.broadcast_object((run.state, entry))
    return entry


def _end_epoch_main(run: _Run) -> dict:
    state, cfg = run.state, run.config.train
    val = evaluate(run.model, run.val, cfg.batch_size)
    r = state.running
    batches = max(r["batches"], 1)
    entry = dict(epoch=state.epoch + 1, train_loss=r["loss"] / batches, train_nll=r["nll"] / batches,
                 train_acc=r["correct"] / max(r["seen"], 1), val_wa=val["wa"], val_ua=val["ua"],
                 **diagnostics.epoch_means(r))
    figures = diagnostics.epoch_diagnostics(run.model, run.train.rows(diagnostics.diagnostic_rows(len(run.train))),
                                            cfg.batch_size)
    if figures:
        entry["diagnostics"] = figures
    if val["ua"] > state.best_ua:
        state.best_ua, state.best_epoch, state.stale_epochs = val["ua"], state.epoch + 1, 0
        save_best(run.model, run.fold_dir)
    else:
        state.stale_epochs += 1
    state.history.append(entry)
    state.epoch += 1
    state.step = 0
    state.running = TrainState().running
    state.stopped = state.epoch >= cfg.epochs or state.stale_epochs >= cfg.patience
    return entry


def _note(options: FitOptions, message: str) -> None:
    if options.log is not None:
        options.log(message)


def _start(config: DMFConfig, split: FoldSplit, fold_dir: Path, options: FitOptions, ctx: distributed.Context):
    resumed = load_resume(fold_dir, config, ctx)
    if resumed is not None:
        state = resumed[2]
        _note(options, f"fold {split.fold}: resuming at epoch {state.epoch + 1}, step {state.step} "
                       f"(global step {state.global_step})")
        state.world_size = ctx.world_size
        return resumed
    # the same seed on every rank: identical initial weights, and identical RNG streams, so rank
    # 0's saved RNG state resumes every rank exactly
    seed_everything(config.train.seed, config.train.num_threads)
    texts = [u.text for u in split.train]
    model = DMFModel(config, texts=texts, pretrained=True).to(ctx.device)
    return model, build_optimizer(model, config.train), TrainState(world_size=ctx.world_size)


def resolve_device(name: str) -> torch.device:
    """--device: auto (the current CUDA device when one is visible, else the CPU) | cpu | cuda."""
    if name not in DEVICES:
        raise ConfigError(f"--device {name!r}: expected one of {DEVICES}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to torch")
    return torch.device("cuda", torch.cuda.current_device())


def _run_context(options: FitOptions) -> distributed.Context:
    """This process's context, on the device --device names (a multi-process run's backend has
    already decided: NCCL gives each rank its GPU, gloo the CPU; a contradicting --device is refused)."""
    ctx = distributed.context()
    if not ctx.distributed:
        return dataclasses.replace(ctx, device=resolve_device(options.device))
    if options.device not in ("auto", ctx.device.type):
        raise ConfigError(f"--device {options.device}: this torchrun job's backend runs on {ctx.device.type}")
    return ctx


def _options_for(options: FitOptions, ctx: distributed.Context) -> FitOptions:
    """Rank 0 shows progress and notes; the other ranks stay silent."""
    if ctx.is_main:
        return options
    return dataclasses.replace(options, progress=False, log=None)


def fit(config: DMFConfig, split: FoldSplit, fold_dir: str | Path, audio: AudioCache | None = None,
        options: FitOptions | None = None) -> dict:
    """Train one fold (resuming if a state exists), reload the best checkpoint, evaluate it on the
    test session. Returns the fold's metrics dict (also the content of foldK/metrics.json); in a
    multi-process run every rank trains its shard and returns rank 0's metrics."""
    options = options or FitOptions()
    ctx = _run_context(options)
    options = _options_for(options, ctx)
    if options.memory_check not in MEMORY_CHECKS:
        raise ConfigError(f"memory check {options.memory_check!r}: expected one of {MEMORY_CHECKS}")
    fold_dir = Path(fold_dir)
    audio = audio or AudioCache()
    model, optimizer, state = _start(config, split, fold_dir, options, ctx)
    train = encode_utterances(split.train, model, audio, options.progress)
    val = encode_utterances(split.val, model, audio, options.progress)
    run = _Run(config, fold_dir, model, optimizer, state, train, val, options, ctx,
               distributed.wrap_model(DMFObjective(model), ctx))
    with _progress(options.progress) as progress:
        task = progress.add_task("", total=1, loss=0.0, acc=0.0)
        while not run.state.stopped:
            run_epoch(run, progress, task)
            entry = end_epoch(run)
            _note(options, f"fold {split.fold} epoch {entry['epoch']}: train loss {entry['train_loss']:.3f}, "
                           f"val UA {100 * entry['val_ua']:.1f}%")
            if ctx.is_main:
                save_resume(fold_dir, model, optimizer, run.state)
    metrics = _test(config, split, fold_dir, audio, run.state, options, ctx) if ctx.is_main else None
    return distributed.broadcast_object(metrics)  # the others wait here while rank 0 tests


def _test(config: DMFConfig, split: FoldSplit, fold_dir: Path, audio: AudioCache, state: TrainState,
          options: FitOptions, ctx: distributed.Context | None = None) -> dict:
    best = DMFModel.from_pretrained(fold_dir).to((ctx or distributed.Context()).device)
    test = encode_utterances(split.test, best, audio, options.progress)
    metrics = evaluate(best, test, config.train.batch_size)
    speed = state.trained_utterances / state.train_seconds if state.train_seconds > 0 else 0.0
    return {"fold": split.fold, "test_session": split.test_session, "n_train": len(split.train),
            "n_val": len(split.val), **metrics, "best_epoch": state.best_epoch, "best_val_ua": state.best_ua,
            "epochs_run": state.epoch, "train_seconds": state.train_seconds,
            "trained_utterances": state.trained_utterances, "utterances_per_s": speed,
            "history": state.history}
