"""Multi-process training (torchrun): process group, DDP wrapper, batch sharding, memory checks.

One process per device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address);
`init_from_env` joins the group: NCCL with one GPU per process when CUDA is available, gloo on CPU.
The memory is global state that every rank computes for itself from the GLOBAL batch
(`dmf.distributed.gather_batch`), so it must stay bit-identical on every rank: `check_memory_in_sync`
all-gathers it and fails the job naming the step where it drifted. Rank 0 alone evaluates and
writes files; the other ranks wait for it at a barrier. Everything here is the identity (or a no-op)
in a single process, so the single-process trainer runs unchanged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from dmf.train.options import DEFAULT_TIMEOUT_S

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """A distributed run cannot start or continue (bad launch, ranks out of sync)."""


class MemoryDriftError(DistributedError):
    """The memory buffers differ across ranks: every rank would read a different memory."""


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def context() -> Context:
    """The current process's place in the job (one process, CPU, when no group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), local, device)


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Join the process group torchrun describes in the environment; one process: nothing to join.

    The timeout bounds every collective, so a rank whose peer died fails instead of waiting forever
    (torchrun also stops the other workers when one exits non-zero)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return context()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed: cannot train on several processes")
    if timeout_s <= 0:
        raise DistributedError(f"distributed timeout {timeout_s!r}: expected seconds > 0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return context()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_PEER_MARKERS = ("connection reset by peer", "connection closed by peer", "timed out", "timeout",
                 "broken pipe", "nccl", "gloo")


def peer_failure(exc: BaseException) -> DistributedError | None:
    """A clear error for a collective that failed because another rank died or hung (the usual
    cause when a multi-process run breaks), None for anything else (a bug: keep its traceback)."""
    if not context().distributed or not isinstance(exc, RuntimeError):
        return None
    dist_error = getattr(dist, "DistError", ())
    text = str(exc)
    if not (isinstance(exc, dist_error) or any(marker in text.lower() for marker in _PEER_MARKERS)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo prefixes its source location: noise here
    return DistributedError(f"rank {context().rank} lost the other ranks ({first[:200]}): a worker died, was "
                            f"killed or hung; torchrun stops the job, and re-running the same command resumes")


def barrier() -> None:
    """Wait for every rank (e.g. while rank 0 evaluates or writes); no-op in one process."""
    ctx = context()
    if not ctx.distributed:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])  # NCCL: this rank's GPU, not a guessed one
    else:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (rank 0's decisions: early stopping, metrics)."""
    if not context().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------- sampler


def shard_batches(global_batches: list[torch.Tensor], rank: int, world_size: int) -> list[torch.Tensor]:
    """Rank r's rows of every global batch: rows [r*m, (r+1)*m) with m = len(batch) // world_size.

    So the global batch is the concatenation of the rank batches in rank order, which is the order
    `gather_batch` rebuilds for the memory writer. A ragged global batch loses its last
    len % world_size rows (gather_batch needs equal m on every rank), and one with m = 0 or a
    global size below 2 (BatchNorm) is dropped. With world_size 1 this is the identity."""
    shards = []
    for batch in global_batches:
        m = len(batch) // world_size
        if m == 0 or m * world_size < 2:
            continue
        shards.append(batch[rank * m:(rank + 1) * m])
    return shards


# -------------------------------------------------------------------------------------------- DDP


def _may_skip_layers(model: nn.Module) -> bool:
    """Wav2Vec2's layerdrop skips whole layers in training, whose parameters then get no gradient;
    only then does DDP need its (slower) search for unused parameters. Every other trainable
    parameter, the memory writer's included (through the similarity loss), gets one each step."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "layerdrop", 0.0) > 0.0:
            return True
    return False


def wrap_model(model: nn.Module, ctx: Context | None = None) -> nn.Module:
    """DistributedDataParallel around `model` (the trainer passes the model's `DMFObjective`, so the
    loss is among DDP's outputs) in a multi-process job, `model` itself otherwise.

    broadcast_buffers=False: the buffers are kept equal by construction (memory written from the
    global batch, BatchNorm statistics all-reduced); re-broadcasting rank 0's copy every step would
    cost bandwidth and hide a drift that `check_memory_in_sync` is there to catch. DDP reduces
    gradients on its own process group, so its asynchronous bucket all-reduces can never interleave
    with the BatchNorm's backward all-reduce on the default group."""
    ctx = ctx or context()
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None  # CPU: no device_ids
    return DistributedDataParallel(model, device_ids=device_ids, **_no_forward_buffer_sync(),
                                   find_unused_parameters=_may_skip_layers(model),
                                   process_group=dist.new_group(backend=dist.get_backend()))


def _no_forward_buffer_sync() -> dict:
    """Newer torch renames broadcast_buffers (and warns); both still sync once at construction,
    which is wanted: every rank starts from rank 0's buffers."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


# -------------------------------------------------------------------------------- memory in sync


def _memory_tensors(model: nn.Module) -> list[torch.Tensor] | None:
    fusion = getattr(model, "fusion", None)
    if fusion is None or not hasattr(fusion, "memory_audio"):
        return None
    tensors = [fusion.memory_audio, fusion.memory_text]
    pending = fusion.pending_memory
    # a missing pending memory is sent as zeros plus a flag, so every rank sends the same shapes
    tensors += list(pending) if pending is not None else [torch.zeros_like(t) for t in tensors]
    flag = torch.ones(1) if pending is not None else torch.zeros(1)
    return [t.detach().reshape(-1).float() for t in tensors] + [flag.to(tensors[0].device)]


def memory_drift(model: nn.Module) -> float:
    """Max |difference| between this rank's memory (buffers and pending) and rank 0's, the same
    value on every rank (all-gathered); 0.0 in one process or for a model without memory."""
    tensors = _memory_tensors(model)
    if tensors is None or not context().distributed:
        return 0.0
    mine = torch.cat(tensors)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    drift = 0.0
    for other in parts[1:]:
        if not torch.equal(other.view(torch.int32), parts[0].view(torch.int32)):  # bits, not closeness
            diff = (other - parts[0]).abs().nan_to_num(float("inf"))  # NaN on one rank only: inf
            drift = max(drift, float(diff.max()), torch.finfo(torch.float32).tiny)
    return drift


def check_memory_in_sync(model: nn.Module, epoch: int, step: int) -> None:
    """Raise MemoryDriftError on every rank (so no rank waits for another) if the memory differs."""
    drift = memory_drift(model)
    if drift != 0.0:
        raise MemoryDriftError(f"memory drifted across ranks at epoch {epoch} step {step}: "
                               f"max |diff| = {drift:.3g}; every rank must write the memory from the "
                               f"same global batch")
