"""The paper's training objective in one place (paper Eq. 4, DESIGN §2):

    L = NLL(log_probs, y) + w * sum over l in {a, t} of the mean over i < j of cos(M_l'(i), M_l'(j))

The mean is over the upper triangle, as the text says (Eq. 4's denominator n(n-1) is half of it).

The writer's top-k gate (a design decision, issue 11). The writer keeps the top n of its n + m
rows by the gPool score y = E p / ||p|| and scales each kept row by its gate sigmoid(y), so that
whatever consumes the rows back-propagates into p (Graph U-Nets). Here the only consumer within a
step is the similarity term, and cosine similarity ignores row scale: the gate got no gradient
(measured ~1e-8 of the writer transformer's) and which slots survive was fixed by p's random
init, although the paper trains the writer end to end. With `similarity_gated` (the default) each
slot counts in the mean by its gate, a weighted mean with pair weights g_i g_j:

    sum_{i<j} g_i g_j cos_ij / sum_{i<j} g_i g_j

Equal gates give exactly the paper's value; the gradient lowers the gate, hence the score, hence
the chance of surviving the top-k, of slots that are redundant with the others, which is what the
loss asks of the memory (orthogonal, informative slots). Because the weights are normalised, no
gate can lower the loss by shrinking all rows together. `similarity_gated=False` is the plain mean.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmf.fusion import WrittenMemory


class LossOutput(NamedTuple):
    """One training step's objective: what backward() runs on and what the trainer logs."""

    total: torch.Tensor  # scalar: NLL + w * similarity, with gradients
    nll: torch.Tensor  # scalar, detached
    similarity: torch.Tensor  # scalar, detached: the similarity term summed over both memories (0 without)
    log_probs: torch.Tensor  # (B, C), detached: for the running accuracy


def memory_similarity(memory: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine similarity over the upper triangle (i < j) of an (n, d) memory: a scalar.
    With `gate` (n,), each pair is weighted by g_i g_j (weighted mean; see the module doc)."""
    unit = F.normalize(memory.float(), dim=-1)
    sim = unit @ unit.T  # (n, n)
    n = memory.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=memory.device)
    if gate is None:
        return sim[i, j].mean()
    weight = gate[i] * gate[j]  # (n(n-1)/2,)
    return (weight * sim[i, j]).sum() / weight.sum()


def dmf_loss(log_probs: torch.Tensor, labels: torch.Tensor, written: Sequence[WrittenMemory] | None,
             similarity_weight: float = 1.0, gated: bool = True) -> LossOutput:
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
