"""How a fold is run (not what is learnt: that is the DMFConfig). Torch-free, so `dmf train`'s
option defaults come from here without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

DEVICES = ("auto", "cpu", "cuda")
MEMORY_CHECKS = ("epoch", "step")
DEFAULT_TIMEOUT_S = 900.0  # a collective waiting longer than this fails (dead peer, rank-0 eval too slow)


@dataclass
class FitOptions:
    """How a fold is run (not what is learnt: that is the DMFConfig)."""

    progress: bool = True  # rich progress bars (epoch, step, loss, running accuracy)
    checkpoint_every: int = 50  # optimizer steps between mid-epoch resume states; 0: epoch ends only
    log: Callable[[str], None] | None = None  # receives one-line notes (resuming, epoch results); None: silent
    memory_check: str = "epoch"  # multi-process runs: compare the memory across ranks every "epoch" or "step"
    device: str = "auto"  # auto (CUDA when visible) | cpu | cuda; under torchrun the backend decides
