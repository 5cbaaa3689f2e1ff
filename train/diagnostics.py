"""What tells a failing memory-fusion run from a good one, logged per fold and epoch (issue 28).

Two kinds of figures go into each epoch's entry of `foldK/metrics.json` ("history"):

- per step, averaged over the epoch, from tensors the step already has: the similarity term and
  the gradient norms of the reader, composer and writer (and of the rest of the network, for
  scale), taken after backward and before clipping;
- once per epoch, on a fixed set of training rows in eval mode (no Gumbel noise drawn from the
  global generator, no BatchNorm update, no memory write, so the training run is unchanged):
  each reader's temperatures (mean, share at either clamp), its read entropy (noiseless and with
  Gumbel noise from a private generator), the memory's diversity (mean pairwise cosine, effective
  rank) and the composer's BatchNorm running statistics against the statistics of batches of the
  training batch size.

`python -m dmf.train.diagnostics FOLD_DIR... --out diag.png` plots them side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dmf.config import ConfigError
from dmf.loss import memory_similarity

GRAD_GROUPS = ("reader", "composer", "writer", "network")  # parameter groups whose gradient norm is logged
DIAGNOSTIC_ROWS = 64  # training rows of the once-per-epoch figures (4 batches of the tiny preset's 16)
GUMBEL_SEED = 1234  # private generator of the noisy-read entropy: the training RNG streams are untouched


# ------------------------------------------------------------------------------------ per step


def grad_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters by GRAD_GROUPS; without memory only "network"."""
    fusion = model.fusion
    groups: dict[str, list[nn.Parameter]] = {}
    if hasattr(fusion, "composer"):
        groups = {"reader": [*fusion.read_text.parameters(), *fusion.read_audio.parameters()],
                  "composer": list(fusion.composer.parameters()),
                  "writer": [*fusion.write_audio.parameters(), *fusion.write_text.parameters()]}
    in_fusion = {id(p) for p in fusion.parameters()}
    groups["network"] = [p for p in model.parameters() if id(p) not in in_fusion]
    return {name: [p for p in params if p.requires_grad] for name, params in groups.items()}


@torch.no_grad()
def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each group's gradient ("grad_reader", ...); call after backward, before clipping."""
    norms = {}
    for name, params in grad_groups(model).items():
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        norms[f"grad_{name}"] = float(torch.stack(grads).norm()) if grads else 0.0
    return norms


STEP_KEYS = ("similarity", *(f"grad_{g}" for g in GRAD_GROUPS))  # per-step figures averaged per epoch


def accumulate(running: dict, out: dict) -> None:
    """Add one step's STEP_KEYS to the epoch's running sums (absent keys: nothing to add)."""
    for key in STEP_KEYS:
        if key in out:
            running[key] = running.get(key, 0.0) + out[key]
            running[f"{key}_steps"] = running.get(f"{key}_steps", 0) + 1


def epoch_means(running: dict) -> dict:
    """The epoch means of the STEP_KEYS that were logged ("train_similarity", "grad_reader", ...)."""
    means = {}
    for key in STEP_KEYS:
        steps = running.get(f"{key}_steps", 0)
        if steps:
            means["train_similarity" if key == "similarity" else key] = running[key] / steps
    return means


# ------------------------------------------------------------------------------------ per epoch


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of an (n, d) matrix (Roy & Vetterli 2007):
    1 for identical rows, min(n, d) for orthogonal rows of equal norm."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def memory_diversity(memory: torch.Tensor) -> dict:
    """(n, d) memory -> mean pairwise cosine (the similarity term's value), effective rank, mean row norm."""
    return {"mean_cosine": float(memory_similarity(memory)), "effective_rank": effective_rank(memory),
            "row_norm": float(memory.norm(dim=-1).mean())}


def _entropy(weights: torch.Tensor) -> float:
    """Mean entropy of (B, n) rows, in units of log n (1: uniform read, 0: one slot)."""
    h = -(weights * weights.clamp_min(1e-30).log()).sum(-1)
    return float(h.mean() / math.log(weights.shape[-1]))


@torch.no_grad()
def read_stats(reader: nn.Module, x: torch.Tensor, memory: torch.Tensor, generator: torch.Generator) -> dict:
    """One reader on (B, d) queries over an (n, d) memory: temperatures and read entropies.
    The noisy entropy draws its Gumbel noise from `generator`, as the training read does from the global one."""
    scores = x @ memory.T  # (B, n)
    tau = reader.temperature_of(x, memory)  # (B, 1)
    u = torch.rand(scores.shape, generator=generator, dtype=scores.dtype).clamp(1e-10, 1.0 - 1e-7)
    noisy = torch.softmax((scores - torch.log(-torch.log(u))) / tau, dim=-1)
    clean = torch.softmax(scores / tau, dim=-1)
    return {"tau_mean": float(tau.mean()), "tau_at_min": float((tau <= reader.tau_min * (1 + 1e-6)).float().mean()),
            "tau_at_max": float((tau >= reader.tau_max * (1 - 1e-6)).float().mean()),
            "score_std": float(scores.std(dim=-1).mean()),  # spread over slots, against Gumbel's std 1.28
            "entropy": _entropy(clean), "entropy_gumbel": _entropy(noisy),
            "slots_used": int(clean.argmax(-1).unique().numel())}  # distinct top slots over the rows


def batchnorm_stats(norm: nn.BatchNorm1d, inputs: torch.Tensor, batch_size: int) -> dict:
    """How far the statistics of batches of `batch_size` rows of (N, C) `inputs` sit from the
    running ones eval uses: mean |mu_B - mu_run| / sigma_run and mean log(var_B / var_run), over
    features and batches (0 and 0 when training and eval normalise alike)."""
    sigma = (norm.running_var + norm.eps).sqrt()
    shifts, log_ratios = [], []
    for chunk in inputs.split(batch_size):
        if len(chunk) < 2:
            continue
        shifts.append(((chunk.mean(0) - norm.running_mean).abs() / sigma).mean())
        log_ratios.append((chunk.var(0, unbiased=False).clamp_min(1e-12) / sigma.square()).log().mean())
    if not shifts:
        return {}
    return {"mean_shift": float(torch.stack(shifts).mean()), "log_var_ratio": float(torch.stack(log_ratios).mean())}


def _capture_inputs(modules: Sequence[nn.Module]):
    """Forward hooks that keep each module's input; returns (handles, list of captured lists)."""
    captured: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda _m, args, _out, store=store: store.append(args[0].detach()))
               for m, store in zip(modules, captured)]
    return handles, captured


@torch.no_grad()
def epoch_diagnostics(model: nn.Module, rows: tuple[torch.Tensor, ...], batch_size: int) -> dict:
    """The once-per-epoch figures on fixed (audio, ids, mask, labels) rows, computed in eval mode
    (the model's mode is restored). Empty for the baselines (no memory)."""
    fusion = model.fusion
    if not hasattr(fusion, "composer"):
        return {}
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        audio, ids, mask = (t.to(device) for t in rows[:3])
        x_a, x_t = (x.float() for x in model.encode(audio, ids, mask))
        composer = fusion.composer
        handles, captured = _capture_inputs([composer.norm1, composer.norm2])
        try:
            fusion(x_a, x_t)
        finally:
            for h in handles:
                h.remove()
        gen = torch.Generator().manual_seed(GUMBEL_SEED)
        out = {"read_text": read_stats(fusion.read_text, x_a, fusion.memory_text, gen),  # audio queries text memory
               "read_audio": read_stats(fusion.read_audio, x_t, fusion.memory_audio, gen),
               "memory_audio": memory_diversity(fusion.memory_audio),
               "memory_text": memory_diversity(fusion.memory_text)}
        for name, norm, inputs in (("norm1", composer.norm1, captured[0]), ("norm2", composer.norm2, captured[1])):
            out[f"batchnorm_{name}"] = batchnorm_stats(norm, torch.cat(inputs), batch_size)
        return out
    finally:
        model.train(was_training)


def diagnostic_rows(n: int) -> torch.Tensor:
    """The fixed training rows of the per-epoch figures: the first DIAGNOSTIC_ROWS (split order)."""
    return torch.arange(min(n, DIAGNOSTIC_ROWS))


# ----------------------------------------------------------------------------------------- plot

PANELS = (  # (title, [(label, path into an epoch entry)], log scale)
    ("validation UA", [("val UA", ("val_ua",)), ("train acc", ("train_acc",))], False),
    ("memory effective rank", [("audio", ("diagnostics", "memory_audio", "effective_rank")),
                               ("text", ("diagnostics", "memory_text", "effective_rank"))], False),
    ("memory mean cosine", [("audio", ("diagnostics", "memory_audio", "mean_cosine")),
                            ("text", ("diagnostics", "memory_text", "mean_cosine"))], False),
    ("read entropy / log n", [("text read", ("diagnostics", "read_text", "entropy")),
                              ("text read, Gumbel", ("diagnostics", "read_text", "entropy_gumbel")),
                              ("audio read", ("diagnostics", "read_audio", "entropy")),
                              ("audio read, Gumbel", ("diagnostics", "read_audio", "entropy_gumbel"))], False),
    ("read temperature (mean)", [("text read", ("diagnostics", "read_text", "tau_mean")),
                                 ("audio read", ("diagnostics", "read_audio", "tau_mean"))], True),
    ("share of temperatures at tau_min", [("text read", ("diagnostics", "read_text", "tau_at_min")),
                                          ("audio read", ("diagnostics", "read_audio", "tau_at_min"))], False),
    ("gradient norm (epoch mean)", [(g, (f"grad_{g}",)) for g in GRAD_GROUPS], True),
    ("BatchNorm |mu_B - mu_run| / sigma_run", [("norm1", ("diagnostics", "batchnorm_norm1", "mean_shift")),
                                               ("norm2", ("diagnostics", "batchnorm_norm2", "mean_shift"))], False),
)


def _series(history: list[dict], path: tuple[str, ...]) -> list[float]:
    values = []
    for entry in history:
        for key in path:
            entry = entry.get(key, {}) if isinstance(entry, dict) else {}
        values.append(float(entry) if isinstance(entry, (int, float)) else float("nan"))
    return values


def plot_diagnostics(runs: dict[str, dict], path: str | Path) -> Path:
    """PNG of the logged figures per epoch, one column per run ({label: fold metrics.json}), one
    row per quantity; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmf.train.metrics import save_png

    fig, axes = plt.subplots(len(PANELS), len(runs), figsize=(4.2 * len(runs), 2.1 * len(PANELS)), dpi=100,
                             squeeze=False, sharex="col")
    for col, (label, metrics) in enumerate(runs.items()):
        history = metrics.get("history", [])
        epochs = [e["epoch"] for e in history]
        for row, (title, lines, log) in enumerate(PANELS):
            ax = axes[row][col]
            for name, key in lines:
                ax.plot(epochs, _series(history, key), label=name, linewidth=1.2)
            ax.set_title(f"{label}: {title}" if row == 0 else title, fontsize=8)
            ax.tick_params(labelsize=7)
            if log:
                ax.set_yscale("log")
            if col == 0:
                ax.legend(fontsize=6, loc="best")
        axes[-1][col].set_xlabel("epoch", fontsize=8)
    return save_png(fig, path)


def load_fold_metrics(path: str | Path) -> dict:
    """A fold's metrics.json (or the fold folder holding it); ConfigError when it is missing or unreadable."""
    path = Path(path)
    path = path / "metrics.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"fold metrics {path}: {exc}") from None


def main(folds: list[str], out: Path) -> None:
    """`python -m dmf.train.diagnostics LABEL=FOLD_DIR ... --out diag.png`."""
    from dmf.cliutil import fail

    try:
        runs = {}
        for item in folds:
            label, _, where = item.rpartition("=")
            runs[label or where] = load_fold_metrics(where)
        print(plot_diagnostics(runs, out))
    except ConfigError as exc:
        fail(exc)


if __name__ == "__main__":
    import typer

    def _cli(folds: list[str] = typer.Argument(..., help="LABEL=FOLD_DIR (or a fold's metrics.json), one column each"),
             out: Path = typer.Option(..., "--out", help="PNG to write")) -> None:
        main(folds, out)

    typer.run(_cli)
