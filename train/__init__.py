"""dmf.train: LOSO training, metrics and reports (needs the `train` extra: torch, transformers, sklearn).

Exports are resolved lazily so `import dmf.train.cli` (done by `dmf --help`) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_training": "dmf.train.loso",
    "run_fold": "dmf.train.loso",
    "pooled_metrics": "dmf.train.loso",
    "loso_average": "dmf.train.loso",
    "fit": "dmf.train.trainer",
    "FitOptions": "dmf.train.options",
    "TrainState": "dmf.train.trainer",
    "build_optimizer": "dmf.train.trainer",
    "evaluate": "dmf.train.trainer",
    "predict": "dmf.train.trainer",
    "load_resume": "dmf.train.trainer",
    "rank_batches": "dmf.train.trainer",
    "shard_batches": "dmf.train.distributed",
    "wrap_model": "dmf.train.distributed",
    "init_from_env": "dmf.train.distributed",
    "check_memory_in_sync": "dmf.train.distributed",
    "MemoryDriftError": "dmf.train.distributed",
    "DistributedError": "dmf.train.distributed",
    "FoldSplit": "dmf.data.splits",
    "loso_split": "dmf.data.splits",
    "stratified_split": "dmf.data.splits",
    "AudioCache": "dmf.train.dataset",
    "Batchable": "dmf.train.dataset",
    "encode_utterances": "dmf.train.dataset",
    "text_encoder_for": "dmf.train.dataset",
    "compute_metrics": "dmf.train.metrics",
    "plot_confusion": "dmf.train.metrics",
    "render_report": "dmf.train.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dmf.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
