"""The paper's training objective in one place (paper Eq. 4, docs/design.md 'Memory similarity loss'):

    L = NLL(log_probs, y) + w * sum over l in {a, t} of the mean over i < j of cos(M_l'(i), M_l'(j))

The mean is over the upper triangle, as the text says (Eq. 4's denominator n(n-1) is half of it).

The writer's top-k gate (issue 11). The writer keeps the top n of its n + m rows by the gPool
score y = E p / ||p||; gPool scales each kept row by its gate sigmoid(y) so that whatever consumes
the rows back-propagates into p (Graph U-Nets). Here the only consumer within a step is the
similarity term, and cosine similarity ignores row scale: p gets no gradient (measured ~1e-8 of
the writer transformer's), so which slots survive is decided by p's random init.

`similarity_gated=True` trains the selection: the term keeps the paper's value, and its gradient
for the rows, and adds a zero-valued selection signal whose gradient reaches the gates only, that
of the gate-weighted mean  sum_{i<j} g_i g_j cos_ij / sum_{i<j} g_i g_j  with the cosines held
fixed. It lowers the gates, hence the scores, hence the survival in the top-k, of kept slots more
similar to the others than the average pair. The gates are scored on detached rows (the
transformer's gradient stays the paper's) and the kept rows are stored unscaled: the gate selects.
p then gets 0.07-0.8 of the transformer's gradient and the kept set moves (tests).

It is off by default because every trained selection tried collapsed the memory on the demo
corpus; the figures, and `write_through_read` (the other reading, gPool's own, in `dmf.fusion`),
are in docs/results.md, 'The writer-gate study'.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmf.config import ModelConfig
from dmf.fusion import WrittenMemory


class LossOutput(NamedTuple):
    """One training step's objective: what backward() runs on and what the trainer logs."""

    total: torch.Tensor  # scalar: NLL + w * similarity, with gradients
    nll: torch.Tensor  # scalar, detached
    similarity: torch.Tensor  # scalar, detached: the similarity term summed over both memories (0 without)
    log_probs: torch.Tensor  # (B, C), detached: for the running accuracy


def memory_similarity(memory: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity over the upper triangle (i < j) of an (n, d) memory: a scalar (the
    paper's term). With `gate` (n,): the same value, plus the gates' selection signal (module doc)."""
    unit = F.normalize(memory.float(), dim=-1)
    n = memory.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=memory.device)
    cosines = (unit @ unit.T)[i, j]  # (n(n-1)/2,) pairs i < j
    if gate is None:
        return cosines.mean()
    return cosines.mean() + selection_signal(cosines.detach(), gate[i] * gate[j])


def selection_signal(cosines: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Zero, with the gradient of the weighted mean sum(w c) / sum(w) with respect to the pair
    weights w = g_i g_j (cosines fixed): what trains the gPool projection (module doc)."""
    weighted = (weight * cosines).sum() / weight.sum()
    return weighted - weighted.detach()


def dmf_loss(log_probs: torch.Tensor, labels: torch.Tensor, written: Sequence[WrittenMemory] | None,
             similarity_weight: float = ModelConfig.similarity_weight,
             gated: bool = ModelConfig.similarity_gated) -> LossOutput:
    """NLL(log_probs, labels) + w * sum over the written memories of their similarity term.
    `written`: the writers' outputs of this step (None for the baselines, which have no memory)."""
    log_probs = log_probs.float()  # bf16 autocast: the reductions in float32
    nll = F.nll_loss(log_probs, labels)
    if not written:
        return LossOutput(nll, nll.detach(), torch.zeros((), device=nll.device), log_probs.detach())
    similarity = sum(memory_similarity(w.memory, w.gate if gated else None) for w in written)
    total = nll + similarity_weight * similarity
    return LossOutput(total, nll.detach(), similarity.detach(), log_probs.detach())


class DMFObjective(nn.Module):
    """model -> its training objective: forward(audio, input_ids, attention_mask, labels) -> LossOutput.

    The training step runs through this module (and DistributedDataParallel wraps it), so the
    loss, whose similarity term reaches the writers, is among the outputs DDP sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> LossOutput:
        cfg = self.model.model_config
        out = self.model.training_forward(audio, input_ids, attention_mask)
        return dmf_loss(out.log_probs, labels, out.written, cfg.similarity_weight, cfg.similarity_gated)
