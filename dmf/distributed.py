"""What the model core needs from torch.distributed: the global batch for the memory writer and
batch statistics synchronised across ranks. Both are the identity in a single process.

The memory is global state: every rank must compute the same new memory from the same global
batch, or the ranks' memories drift apart. torch's SyncBatchNorm runs only on GPUs, so the
composer's BatchNorm synchronises its statistics itself (all-reduce of sums, with gradients).
"""

from __future__ import annotations

import torch
from torch import nn


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """(m, d) on each rank -> (world * m, d), ranks in order, with gradients to this rank's rows.
    Equal m on every rank (the distributed sampler drops the ragged tail)."""
    if world_size() == 1:
        return x
    return _GatherBatch.apply(x)


class _GatherBatch(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own rows, times the world size.

    Every rank computes the same loss from the gathered batch (the memory writer's similarity), so
    the gradient of rank r's rows is complete on rank r; DistributedDataParallel then AVERAGES the
    encoder gradients over the ranks, which would divide this term by the world size: multiplying
    by it here gives the gradient one process sees on the whole batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = world_size(), torch.distributed.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rows, ctx.world = slice(rank * x.shape[0], (rank + 1) * x.shape[0]), world
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rows] * ctx.world


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's input receives the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, C) whose training statistics are those of the global batch.

    Same parameters and buffers as nn.BatchNorm1d (checkpoints and export are unchanged); in eval,
    or in one process, it is exactly F.batch_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        sums = _AllReduceSum.apply(torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])]))
        C = x.shape[1]
        n = sums[-1]
        mean = sums[:C] / n
        var = (sums[C:2 * C] / n - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises
        self._update_running_stats(mean.detach(), var.detach() * n.detach() / (n.detach() - 1).clamp_min(1))
        out = (x - mean) / torch.sqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        if self.running_mean is None:
            return
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)
