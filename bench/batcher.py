"""`dmf bench ARTIFACT --batcher`: the runtime's micro-batcher under concurrent load against
sequential batch-1 calls, on the same synthetic WAV uploads (decode + resample + normalise +
tokenise + inference, i.e. what a request costs):

- `sequential`: one thread calling `Predictor.predict` one request at a time, with 1 engine thread
  and with the engine's default threads; the faster one is the baseline;
- `batcher`: `concurrency` client threads, each submitting one request and waiting for it (closed
  loop), through `MicroBatcher(max_batch, max_wait_ms, workers)`, for each configuration (default:
  what `dmf serve` runs on this machine by default (`runtime.server.machine_defaults`); 1 worker
  with default threads = batching alone; `workers` workers with 1 thread each at max_batch).

Every mode runs in each of `rounds` rounds, in alternating order (forward, then backward), so a
load that comes and goes on a shared machine falls on every mode alike; a ratio is given over all
rounds and per round. Reports throughput (requests/s), latency p50/p95/p99 (ms, submit to result,
bench/measure.py's `latency_stats`: one percentile definition for every figure of `dmf bench`) and
batch sizes. Torch-free: it runs on a runtime-only install.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmf.bench.bench import BenchError, machine_info
from dmf.bench.measure import latency_stats

TEXTS = ["i am so happy today", "this is terrible news", "leave me alone right now", "what a wonderful surprise",
         "okay fine whatever", "i cannot believe you did that", "thank you so much", "i miss her every day"]


@dataclass(frozen=True)
class BatcherOptions:
    requests: int = 256  # timed requests per mode, over all rounds (split evenly over rounds and clients)
    concurrency: int = 16  # client threads, each with one request in flight (closed loop)
    max_batch: int = 8  # MicroBatcher max_batch of the first two configurations
    max_wait_ms: float = 5.0  # MicroBatcher max_wait_ms: how long a worker waits to fill a batch
    workers: int = 2  # workers of the multi-worker configurations (one engine thread each)
    warmup: int = 8  # untimed requests per mode before timing
    engine: str = "auto"  # Predictor.load engine: auto (dmf.json's) | onnx | openvino | trt
    distinct_inputs: int = 8  # distinct synthetic clips the requests cycle through
    rounds: int = 4  # every mode runs once per round, in alternating order (shared-machine noise)

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "max_batch", "workers", "distinct_inputs", "rounds"):
            if getattr(self, name) < 1:
                raise BenchError(f"batcher {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.max_wait_ms < 0:
            raise BenchError(f"batcher warmup and max_wait_ms must be >= 0, got {self.warmup}, {self.max_wait_ms}")


def _inputs(n: int, seconds: float = 3.0, rate: int = 16000) -> list[tuple[bytes, str]]:
    """n WAV uploads (tones with a little noise) and transcripts."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(int(seconds * rate)) / rate
        x = 0.3 * np.sin(2 * np.pi * (150 + 35 * i) * t) + 0.02 * rng.standard_normal(t.size)
        buf = io.BytesIO()
        sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
        out.append((buf.getvalue(), TEXTS[i % len(TEXTS)]))
    return out


def _lat(seconds: list[float]) -> dict[str, float]:
    """Request latency percentiles (ms): measure.latency_stats at one request per call."""
    a = np.asarray(seconds, dtype=np.float64)
    stats = latency_stats(a, 1)
    return {"p50_ms": stats.p50_ms_per_batch, "p95_ms": stats.p95_ms_per_batch,
            "p99_ms": stats.p99_ms_per_batch, "mean_ms": float(a.mean() * 1000.0)}


def _sequential(predictor, inputs, requests: int, warmup: int) -> tuple[list[float], float, dict]:
    """(latencies in s, wall seconds, {}) of `requests` calls one at a time."""
    for i in range(warmup):
        predictor.predict(*inputs[i % len(inputs)])
    lat = []
    t0 = time.perf_counter()
    for i in range(requests):
        s = time.perf_counter()
        predictor.predict(*inputs[i % len(inputs)])
        lat.append(time.perf_counter() - s)
    return lat, time.perf_counter() - t0, {}


def _clients(mb, inputs, concurrency: int, per_client: int) -> tuple[list[float], float]:
    """Run `concurrency` closed-loop clients released together; (latencies in s, wall seconds)."""
    lat: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency + 1)

    def client(k: int) -> None:
        mine = []
        start.wait()
        try:
            for j in range(per_client):
                s = time.perf_counter()
                mb.predict(*inputs[(k + j) % len(inputs)], timeout=120)
                mine.append(time.perf_counter() - s)
        except BaseException as exc:  # reported, never hangs the run
            errors.append(exc)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    if errors:
        raise BenchError(f"{len(errors)} batcher client(s) failed: {errors[0]!r}")
    return lat, wall


def _batched(predictor, inputs, options: BatcherOptions, requests: int, cfg: dict) -> tuple[list[float], float, dict]:
    """(latencies in s, wall seconds, batch-size histogram) of about `requests` closed-loop
    requests through a MicroBatcher configured by `cfg`."""
    from dmf.runtime import MicroBatcher

    per_client = max(1, requests // options.concurrency)
    with MicroBatcher(predictor, max_batch=cfg["max_batch"], max_wait_ms=options.max_wait_ms,
                      workers=cfg["workers"]) as mb:
        for i in range(options.warmup):
            mb.predict(*inputs[i % len(inputs)], timeout=120)
        lat, wall = _clients(mb, inputs, options.concurrency, per_client)
        histogram = mb.stats.snapshot()["batch_size_histogram"]  # warm-up included: only the sizes matter
    return lat, wall, histogram


def default_configs(options: BatcherOptions, running: dict[str, Any]) -> list[dict]:
    """Batching alone (one worker, the engine's threads); `workers` batches at once with one
    thread each, at max_batch; what `dmf serve` runs by default for a predictor running as
    `running` on this machine (several workers get one engine thread each, as `dmf serve` loads them)."""
    from dmf.runtime.server import machine_defaults

    workers, max_batch = machine_defaults(running)
    return [{"name": "batching alone", "workers": 1, "threads": None, "max_batch": options.max_batch},
            {"name": f"{options.workers} workers", "workers": options.workers, "threads": 1,
             "max_batch": options.max_batch},
            {"name": "dmf serve defaults", "workers": workers, "threads": 1 if workers != 1 else None,
             "max_batch": max_batch}]


def _summary(runs: list[tuple[list[float], float, dict]]) -> dict[str, Any]:
    """One mode's rounds -> requests, seconds, throughput over all rounds, latency, per-round req/s."""
    lat = [x for r in runs for x in r[0]]
    seconds = sum(r[1] for r in runs)
    return {"requests": len(lat), "seconds": seconds, "throughput_rps": len(lat) / seconds, **_lat(lat),
            "round_rps": [len(r[0]) / r[1] for r in runs]}


def _measure(predictors: dict, inputs, options: BatcherOptions, modes: list[tuple[str, dict]]) -> list[dict]:
    """Every mode once per round, forward then backward order; each mode's `_summary`."""
    rounds = max(1, min(options.rounds, options.requests // options.concurrency))  # a round has >= 1 request per client
    per_round = max(1, options.requests // rounds)
    runs: list[list] = [[] for _ in modes]
    for r in range(rounds):
        order = range(len(modes)) if r % 2 == 0 else reversed(range(len(modes)))
        for i in order:
            kind, cfg = modes[i]
            p = predictors[cfg["threads"]]
            runs[i].append(_sequential(p, inputs, per_round, options.warmup) if kind == "sequential"
                           else _batched(p, inputs, options, per_round, cfg))
    out = []
    for (kind, cfg), mode_runs in zip(modes, runs):
        row = _summary(mode_runs)
        if kind == "batcher":
            hist: dict = {}
            for _, _, h in mode_runs:
                for size, n in h.items():
                    hist[size] = hist.get(size, 0) + n
            row.update(concurrency=options.concurrency, max_wait_ms=options.max_wait_ms, batch_size_histogram=hist,
                       mean_batch_size=sum(int(k) * v for k, v in hist.items()) / max(1, sum(hist.values())),
                       **{k: cfg[k] for k in ("name", "workers", "max_batch")}, threads=cfg["threads"] or "default")
        out.append(row)
    return out


def run_batcher(artifact_dir: str | Path, options: BatcherOptions = BatcherOptions(),
                configs: list[dict] | None = None) -> dict[str, Any]:
    """Benchmark one artifact; returns {"artifact", "machine", "engine", "sequential", "batcher",
    "baseline", "speedup", "serve_defaults", "options"}. `configs` overrides the batcher
    configurations: a list of {"name"?: str, "workers": int, "threads": 1 | None, "max_batch": int}.
    A batcher row's `speedup_vs_baseline` is its throughput over all rounds against the baseline's;
    `speedup_rounds` the same ratio round by round."""
    from dmf.runtime import Predictor

    inputs = _inputs(options.distinct_inputs)
    predictors = {}
    try:
        for threads in (1, None):  # one predictor per engine-thread setting, shared by the modes
            predictors[threads] = Predictor.load(artifact_dir, engine=options.engine, threads=threads)
        engine = predictors[None].engine
        configs = [{"name": f"config {i + 1}", **c} for i, c in enumerate(configs)] if configs else \
            default_configs(options, predictors[None].running())
        modes = [("sequential", {"threads": 1}), ("sequential", {"threads": None})] + [("batcher", c) for c in configs]
        rows = _measure(predictors, inputs, options, modes)
    finally:
        for p in predictors.values():
            p.close()
    sequential = {"threads=1": rows[0], "threads=default": rows[1]}
    base_name, base = max(sequential.items(), key=lambda kv: kv[1]["throughput_rps"])
    for row in rows[2:]:
        row["speedup_vs_baseline"] = row["throughput_rps"] / base["throughput_rps"]
        row["speedup_rounds"] = [a / b for a, b in zip(row["round_rps"], base["round_rps"])]
    best = max(rows[2:], key=lambda r: r["throughput_rps"])
    return {"artifact": str(artifact_dir), "machine": machine_info(threads=None), "options": asdict(options),
            "engine": {"name": engine.name, "providers": engine.providers}, "sequential": sequential,
            "batcher": rows[2:], "baseline": f"sequential {base_name}", "speedup": best["speedup_vs_baseline"],
            "serve_defaults": next((r for r in rows[2:] if r["name"] == "dmf serve defaults"), None)}
