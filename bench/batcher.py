"""`dmf bench ARTIFACT --batcher`: the runtime's micro-batcher under concurrent load against
sequential batch-1 calls, on the same synthetic WAV uploads (decode + resample + normalise +
tokenise + inference, i.e. what a request costs):

- `sequential`: one thread calling `Predictor.predict` one request at a time, with 1 engine thread
  and with the engine's default threads; the faster one is the baseline;
- `batcher`: `concurrency` client threads, each submitting one request and waiting for it (closed
  loop), through `MicroBatcher(max_batch, max_wait_ms, workers)`, for each configuration (default:
  1 worker with default threads = batching alone; `workers` workers with 1 thread each, at
  max_batch and at max_batch 2).

Reports throughput (requests/s), latency p50/p95/p99 (ms, submit to result, bench/measure.py's
`latency_stats`: one percentile definition for every figure of `dmf bench`) and batch sizes.
Torch-free: it runs on a runtime-only install.
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
    requests: int = 256  # timed requests per mode (split evenly over the clients)
    concurrency: int = 16  # client threads, each with one request in flight (closed loop)
    max_batch: int = 8  # MicroBatcher max_batch of the first two configurations
    max_wait_ms: float = 5.0  # MicroBatcher max_wait_ms: how long a worker waits to fill a batch
    workers: int = 2  # workers of the multi-worker configurations (one engine thread each)
    warmup: int = 8  # untimed requests per mode before timing
    engine: str = "auto"  # Predictor.load engine: auto (dmf.json's) | onnx | openvino | trt
    distinct_inputs: int = 8  # distinct synthetic clips the requests cycle through

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "max_batch", "workers", "distinct_inputs"):
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


def _sequential(predictor, inputs, requests: int, warmup: int) -> dict[str, Any]:
    for i in range(warmup):
        predictor.predict(*inputs[i % len(inputs)])
    lat = []
    t0 = time.perf_counter()
    for i in range(requests):
        s = time.perf_counter()
        predictor.predict(*inputs[i % len(inputs)])
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    return {"requests": requests, "seconds": wall, "throughput_rps": requests / wall, **_lat(lat)}


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


def _batched(predictor, inputs, options: BatcherOptions, max_batch: int, workers: int) -> dict[str, Any]:
    from dmf.runtime import MicroBatcher

    per_client = max(1, options.requests // options.concurrency)
    total = per_client * options.concurrency
    with MicroBatcher(predictor, max_batch=max_batch, max_wait_ms=options.max_wait_ms, workers=workers) as mb:
        for i in range(options.warmup):
            mb.predict(*inputs[i % len(inputs)], timeout=120)
        lat, wall = _clients(mb, inputs, options.concurrency, per_client)
        stats = mb.stats.snapshot()
    # stats include the warm-up requests; batch sizes are what matters here.
    return {"requests": total, "seconds": wall, "throughput_rps": total / wall, **_lat(lat),
            "concurrency": options.concurrency, "max_batch": max_batch, "max_wait_ms": options.max_wait_ms,
            "workers": workers, "mean_batch_size": stats["mean_batch_size"],
            "batch_size_histogram": stats["batch_size_histogram"]}


def default_configs(options: BatcherOptions) -> list[dict]:
    """Batching alone (one worker, the engine's threads), then `workers` batches at once with one
    thread each, at max_batch and at a small batch (per-item CPU cost grows with the batch here:
    the conv feature encoder's activations stop fitting in cache)."""
    return [{"workers": 1, "threads": None, "max_batch": options.max_batch},
            {"workers": options.workers, "threads": 1, "max_batch": options.max_batch},
            {"workers": options.workers, "threads": 1, "max_batch": min(options.max_batch, 2)}]


def run_batcher(artifact_dir: str | Path, options: BatcherOptions = BatcherOptions(),
                configs: list[dict] | None = None) -> dict[str, Any]:
    """Benchmark one artifact; returns {"artifact", "machine", "engine", "sequential", "batcher",
    "baseline", "speedup", "options"}. `configs` overrides the batcher configurations: a list of
    {"workers": int, "threads": int | None, "max_batch": int}."""
    from dmf.runtime import Predictor

    inputs = _inputs(options.distinct_inputs)
    result: dict[str, Any] = {"artifact": str(artifact_dir), "machine": machine_info(threads=None),
                              "sequential": {}, "batcher": [], "options": asdict(options)}
    for threads in (1, None):
        with Predictor.load(artifact_dir, engine=options.engine, threads=threads) as p:
            result["sequential"][f"threads={threads or 'default'}"] = _sequential(p, inputs, options.requests,
                                                                                   options.warmup)
            result.setdefault("engine", {"name": p.engine.name, "providers": p.engine.providers})
    for cfg in configs or default_configs(options):
        with Predictor.load(artifact_dir, engine=options.engine, threads=cfg.get("threads")) as p:
            row = _batched(p, inputs, options, cfg.get("max_batch", options.max_batch), cfg.get("workers", 1))
        row["threads"] = cfg.get("threads") or "default"
        result["batcher"].append(row)
    base_name, base = max(result["sequential"].items(), key=lambda kv: kv[1]["throughput_rps"])
    best = max(result["batcher"], key=lambda r: r["throughput_rps"])
    result["baseline"] = f"sequential {base_name}"
    result["speedup"] = best["throughput_rps"] / base["throughput_rps"]
    for row in result["batcher"]:
        row["speedup_vs_baseline"] = row["throughput_rps"] / base["throughput_rps"]
    return result
