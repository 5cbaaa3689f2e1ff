"""Multi-process training (issue "Scale out"), on 2 gloo processes (CPU): the sharding sampler, memory
identical on every rank and equal to one process fed the global batch, synchronised BatchNorm,
drift detection, and a job that loses a rank failing as a whole and then resuming."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmf.config import preset
from dmf.data.corpus import load_corpus
from dmf.data.synth import synthesize
from dmf.loss import DMFObjective
from dmf.model import DMFModel
from dmf.train import distributed
from dmf.train.dataset import encode_utterances, loso_split
from dmf.train.trainer import build_optimizer, epoch_batches, rank_batches, seed_everything, train_step

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

WORLD = 2
STEPS = 3
NORMS = ("norm1", "norm2")


def small_config():
    """Tiny preset, 0.5 s clips, 2 rows per rank per step (global batch 4); no classifier dropout, so
    one process on the global batch draws no other random numbers than the ranks (gradients compare);
    the writer attached, so the similarity term's gradient crosses the all-gather into the encoders."""
    return preset("tiny", max_audio_samples=8000, dropout=0.0, writer_detach=False).replace(
        "train", batch_size=2, epochs=2, patience=2, seed=0)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dcorpus") / "synth"
    synthesize(path, seed=0, utterances=40)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_model(config, split):
    seed_everything(config.train.seed)
    return DMFModel(config, texts=[u.text for u in split.train], pretrained=True)


# ------------------------------------------------------------------------------------------ sampler


def test_shards_concatenate_to_the_global_batch():
    global_batches = epoch_batches(23, 4 * 3, seed=0, epoch=1)  # 12 + 11 rows: the tail is ragged
    shards = [distributed.shard_batches(global_batches, r, 3) for r in range(3)]
    assert [len(b) for b in shards[0]] == [4, 3]  # 11 rows: 3 per rank, the 11th dropped
    for step, batch in enumerate(global_batches):
        joined = torch.cat([shards[r][step] for r in range(3)])
        assert torch.equal(joined, batch[:len(joined)])  # rank order = global batch order
    assert distributed.shard_batches([torch.arange(2)], 0, 3) == []  # m = 0: dropped
    cfg = small_config().train
    one = rank_batches(23, cfg, 0, distributed.Context())
    assert all(torch.equal(a, b) for a, b in zip(one, epoch_batches(23, cfg.batch_size, cfg.seed, 0)))


# ----------------------------------------------------------------------------------- 2 processes


def _noise_free_read(self, x, memory):
    """The reader without its Gumbel noise: the noise a rank draws for its rows is not what one
    process draws for the same rows of the global batch, and the composer's BatchNorm sees it."""
    scores = x @ memory.T
    tau = self.temperature(scores).abs().clamp(self.tau_min, self.tau_max)
    return torch.softmax(scores / tau, dim=-1)


def _batchnorm_stats(model) -> dict:
    composer = model.fusion.composer
    return {n: (getattr(composer, n).running_mean.clone(), getattr(composer, n).running_var.clone())
            for n in NORMS}


def _encoder_grads(model) -> torch.Tensor:
    """The encoders' gradients as one vector: NLL plus, through the memory writer's all-gather, the
    similarity term (the writer sees attached embeddings by default)."""
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                      if n.startswith(("audio_encoder.", "text_encoder.")) and p.grad is not None])


def _first_step(config, split, train, rows, ctx) -> dict:
    """Running BatchNorm statistics and encoder gradients after one noise-free training step on
    this rank's shard (ctx: the rank's context; a one-process Context for the reference)."""
    from dmf.fusion import MemoryReader

    noisy, MemoryReader.read_weights = MemoryReader.read_weights, _noise_free_read
    try:
        model = _fresh_model(config, split)
        train_step(model, build_optimizer(model, config.train), train.rows(rows), config,
                   distributed.wrap_model(DMFObjective(model), ctx))
        return {"bn": _batchnorm_stats(model), "grads": _encoder_grads(model)}
    finally:
        MemoryReader.read_weights = noisy


def _steps_worker(rank: int, port: int, corpus_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init_from_env(timeout_s=120)
    try:
        config = small_config()
        split = loso_split(load_corpus(corpus_dir), 1, config.data.val_fraction, config.data.seed)
        model = _fresh_model(config, split)
        train = encode_utterances(split.train, model)
        batches = rank_batches(len(train), config.train, 0, ctx)
        record = {"memory": [], "rows": [], **_first_step(config, split, train, batches[0], ctx)}
        optimizer = build_optimizer(model, config.train)
        forward = distributed.wrap_model(DMFObjective(model), ctx)
        for step in range(STEPS):
            train_step(model, optimizer, train.rows(batches[step]), config, forward)
            distributed.check_memory_in_sync(model, 1, step + 1)  # raises if the ranks differ
            fusion = model.fusion
            record["memory"].append(torch.cat([fusion.memory_audio, fusion.memory_text,
                                               *fusion.pending_memory]).clone())
            record["rows"].append(batches[step])
        if rank == 1:  # a rank whose memory differs must fail every rank, naming where
            model.fusion.memory_audio[0, 0] += 0.5
        try:
            distributed.check_memory_in_sync(model, 1, STEPS)
            record["drift_error"] = ""
        except distributed.MemoryDriftError as exc:
            record["drift_error"] = str(exc)
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def test_two_ranks_keep_one_memory_equal_to_the_global_batch(corpus_dir, tmp_path):
    mp.start_processes(_steps_worker, args=(_free_port(), str(corpus_dir), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    for step in range(STEPS):  # bit-identical on both ranks after every step
        assert torch.equal(ranks[0]["memory"][step], ranks[1]["memory"][step]), step
    for rank in ranks:
        assert "memory drifted across ranks at epoch 1 step 3: max |diff| = 0.5" in rank["drift_error"]

    # one process, the same initial weights, fed the global batch (rank 0's rows then rank 1's)
    config = small_config()
    split = loso_split(load_corpus(corpus_dir), 1, config.data.val_fraction, config.data.seed)
    model = _fresh_model(config, split)
    train = encode_utterances(split.train, model)
    rows = torch.cat([ranks[0]["rows"][0], ranks[1]["rows"][0]])
    assert torch.equal(rows, epoch_batches(len(train), WORLD * config.train.batch_size, config.train.seed, 0)[0])
    model.train()
    model.training_forward(*train.rows(rows)[:3])  # the new memory: the Gumbel noise does not reach the writer's input
    single = torch.cat([model.fusion.memory_audio, model.fusion.memory_text, *model.fusion.pending_memory])
    assert torch.allclose(ranks[0]["memory"][0], single, atol=1e-5), (ranks[0]["memory"][0] - single).abs().max()

    reference = _first_step(config, split, train, rows, distributed.Context())  # one process, global batch
    for name, (mean, var) in reference["bn"].items():  # statistics of the global batch, both ranks
        for rank in ranks:
            assert torch.equal(rank["bn"][name][0], ranks[0]["bn"][name][0]), name
            assert torch.allclose(rank["bn"][name][0], mean, atol=1e-6), name
            assert torch.allclose(rank["bn"][name][1], var, atol=1e-5), name
        assert not torch.allclose(mean, torch.zeros_like(mean), atol=1e-6)  # a real update, not the init
    # DDP-averaged encoder gradients equal one process's: the similarity term's share through the
    # all-gather is scaled back by the world size (dmf.distributed._GatherBatch)
    for rank in ranks:
        diff = (rank["grads"] - reference["grads"]).abs().max()
        assert diff <= 1e-5 * reference["grads"].abs().max(), diff


# ------------------------------------------------------------------------------ kill one rank, resume


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _worker_pid(root: int, rank: int) -> int | None:
    """The torchrun worker of `rank` among root's descendants (its environment names its rank)."""
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"LOCAL_RANK={rank}".encode() in env:
            return pid
    return None


def test_killed_rank_fails_the_job_and_rerun_resumes(corpus_dir, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps({"model": {"max_audio_samples": 8000}, "train": {"patience": 2}}))
    cmd = [sys.executable, "-m", "dmf.train", "--data", str(corpus_dir), "--out", str(out), "--preset", "tiny",
           "--fold", "1", "--epochs", "2", "--batch-size", "2", "--config", str(cfg), "--checkpoint-every", "2",
           "--no-progress", "--nproc", "2", "--memory-check", "step", "--dist-timeout", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(tmp_path / "first.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    latest = out / "fold1" / "_resume" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _worker_pid(proc.pid, 1)
    assert latest.exists() and victim is not None, (tmp_path / "first.log").read_text()
    os.kill(victim, signal.SIGKILL)
    code = proc.wait(timeout=120)  # the other rank must not hang
    log.seek(0)
    first = log.read()
    assert code != 0, first
    assert "distributed training failed" in first and "re-run the same command to resume" in first, first
    assert not (out / "fold1" / "metrics.json").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming at epoch" in done.stdout
    assert done.stdout.count("resuming at epoch") == 1  # rank 0 alone prints
    metrics = json.loads((out / "fold1" / "metrics.json").read_text())
    assert metrics["epochs_run"] == len(metrics["history"]) >= 1
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    assert not (out / "fold1" / "_resume").exists()


# ---------------------------------------------------------------------------------- launcher, resume


def test_nproc_relaunches_the_same_command_under_torchrun(monkeypatch, tmp_path):
    import typer
    from typer.testing import CliRunner

    from dmf.train import cli

    launched = []
    monkeypatch.setattr(cli, "_launch", lambda nproc, args: launched.append((nproc, args)) or 0)
    app = typer.Typer()
    cli.register(app)
    result = CliRunner().invoke(app, ["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--nproc", "2",
                                      "--epochs", "3", "--no-progress", "--memory-check", "step"])
    assert result.exit_code == 0, result.output
    nproc, args = launched[0]
    assert nproc == 2 and "--nproc" not in args
    assert args[args.index("--epochs") + 1] == "3" and "--no-progress" in args
    assert args[args.index("--memory-check") + 1] == "step" and args[args.index("--data") + 1] == str(tmp_path)

    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "0")
    refused = CliRunner().invoke(app, ["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--nproc", "2"])
    assert refused.exit_code == 2 and "under torchrun, leave it out" in refused.stderr


def test_mid_epoch_resume_needs_the_same_process_count(tmp_path):
    from dmf.checkpoint import CheckpointError
    from dmf.train.trainer import _check_world_size

    two = distributed.Context(rank=0, world_size=2)
    _check_world_size({"step": 0, "world_size": 1}, two, tmp_path)  # epoch end: any count continues
    _check_world_size({"step": 3, "world_size": 2}, two, tmp_path)
    with pytest.raises(CheckpointError, match="2-process run; resume it with 2 processes"):
        _check_world_size({"step": 3, "world_size": 2}, distributed.Context(), tmp_path)
