"""Model-core pieces of distributed training, on 2 gloo processes (CPU): the global batch for the
memory writer, and BatchNorm statistics synchronised across ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmf.distributed import GlobalBatchNorm1d, gather_batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = torch.randn(8, 6)
        local = full[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        gathered = gather_batch(local.detach())
        bn = GlobalBatchNorm1d(6)
        out = bn(local)
        (out * torch.arange(6.0)).sum().backward()
        torch.save({"gathered": gathered, "out": out.detach(), "grad": local.grad,
                    "running_mean": bn.running_mean, "running_var": bn.running_var},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_batch_and_batchnorm_match_one_process(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    full = torch.randn(8, 6).requires_grad_(True)
    bn = torch.nn.BatchNorm1d(6)
    out = bn(full)
    (out * torch.arange(6.0)).sum().backward()

    for rank, res in enumerate(results):
        assert torch.equal(res["gathered"], full.detach())  # ranks in order = concatenated batch
        rows = slice(rank * 4, (rank + 1) * 4)
        assert torch.allclose(res["out"], out.detach()[rows], atol=1e-5)
        assert torch.allclose(res["grad"], full.grad[rows], atol=1e-5)
        assert torch.allclose(res["running_mean"], bn.running_mean, atol=1e-6)
        assert torch.allclose(res["running_var"], bn.running_var, atol=1e-5)


def test_single_process_is_plain_batchnorm():
    torch.manual_seed(1)
    x = torch.randn(5, 3)
    ours, ref = GlobalBatchNorm1d(3), torch.nn.BatchNorm1d(3)
    assert torch.equal(ours(x), ref(x))
    assert gather_batch(x) is x
    assert set(ours.state_dict()) == set(ref.state_dict())


if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)
