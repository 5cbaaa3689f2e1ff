"""torch eager behind the engine interface (`infer(batch) -> log_probs`), for the training side:
export verification uses it as the reference and `dmf bench` as the baselines users would
otherwise run (fp32 eager, and bf16 through `torch.autocast`, one line of user code).

The same numpy batch goes to every engine, so a comparison is the engine alone.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from dmf.contract import INPUT_NAMES

PRECISIONS = ("fp32", "bf16")


class TorchEngine:
    """A DMFModel in eval mode under `torch.inference_mode`; precision bf16 wraps the call in
    `torch.autocast(device, dtype=torch.bfloat16)` (fp32 weights, as a user would write it)."""

    name = "torch"
    max_batch = None

    def __init__(self, model, *, precision: str = "fp32", threads: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"torch engine precision {precision!r} is invalid: expected one of {PRECISIONS}")
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.precision = precision
        self.device = next(model.parameters()).device
        self.name = "torch" if precision == "fp32" else f"torch-{precision}"
        self.providers = [f"torch-{self.device.type}"]

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, **kwargs) -> "TorchEngine":
        from dmf.model import DMFModel

        return cls(DMFModel.from_pretrained(checkpoint), **kwargs)

    def tensors(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(batch[k])).to(self.device) for k in INPUT_NAMES)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, C) float32 log-probs."""
        with torch.inference_mode(), self._autocast():
            return self.model(*self.tensors(batch)).float().cpu().numpy()

    def close(self) -> None:
        self.model = None
