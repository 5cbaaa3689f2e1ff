"""Runtime throughput benchmark: micro-batcher under concurrent load vs sequential batch-1 calls.

    python -m dmf.bench.runtime_bench ARTIFACT [--requests 256] [--concurrency 16] [--json]
    python -m dmf.bench.runtime_bench --make-tiny artifacts/bench-tiny   # export a tiny artifact first

One run measures, on the same synthetic WAV uploads (decode + resample + normalise + tokenise +
inference, i.e. what a request costs):
- `sequential`: one thread calling `Predictor.predict` one request at a time, with 1 onnxruntime
  thread and with onnxruntime's default threads; the faster one is the baseline;
- `batcher`: `concurrency` client threads, each submitting one request and waiting for it
  (closed loop), through `MicroBatcher(max_batch, max_wait_ms, workers)`, for each configuration
  in `configs` (default: 1 worker with default threads = batching alone; `workers` workers with
  1 thread each, at max_batch and at max_batch 2).
Reports throughput (requests/s), latency p50/p99 (ms, submit to result) and batch sizes.
Torch-free, except `--make-tiny`, which needs the training extras to export.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dmf.runtime import MicroBatcher, Predictor

TEXTS = ["i am so happy today", "this is terrible news", "leave me alone right now", "what a wonderful surprise",
         "okay fine whatever", "i cannot believe you did that", "thank you so much", "i miss her every day"]


def _inputs(n: int, seconds: float = 3.0, rate: int = 16000) -> list[tuple[bytes, str]]:
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


def _lat(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def _sequential(predictor: Predictor, inputs, requests: int, warmup: int) -> dict[str, Any]:
    for i in range(warmup):
        predictor.predict(*inputs[i % len(inputs)])
    lat = []
    t0 = time.perf_counter()
    for i in range(requests):
        s = time.perf_counter()
        predictor.predict(*inputs[i % len(inputs)])
        lat.append((time.perf_counter() - s) * 1000)
    wall = time.perf_counter() - t0
    return {"requests": requests, "seconds": wall, "throughput_rps": requests / wall, **_lat(lat)}


def _batched(predictor: Predictor, inputs, requests: int, concurrency: int, max_batch: int,
             max_wait_ms: float, workers: int, warmup: int) -> dict[str, Any]:
    per_client = max(1, requests // concurrency)
    total = per_client * concurrency
    with MicroBatcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, workers=workers) as mb:
        for i in range(warmup):
            mb.predict(*inputs[i % len(inputs)], timeout=120)
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
                    mine.append((time.perf_counter() - s) * 1000)
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
        stats = mb.stats.snapshot()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    # stats include the warm-up requests; batch sizes are what matters here.
    return {"requests": total, "seconds": wall, "throughput_rps": total / wall, **_lat(lat),
            "concurrency": concurrency, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "workers": workers,
            "mean_batch_size": stats["mean_batch_size"], "batch_size_histogram": stats["batch_size_histogram"]}


def run(artifact_dir: str | Path, *, requests: int = 256, concurrency: int = 16, max_batch: int = 8,
        max_wait_ms: float = 5.0, workers: int = 2, configs: list[dict] | None = None, warmup: int = 8,
        engine: str = "auto", providers: str | None = None, distinct_inputs: int = 8) -> dict[str, Any]:
    """Benchmark one artifact; returns a dict (see the module docstring). `configs` overrides the
    batcher configurations: a list of {"workers": int, "threads": int | None, "max_batch": int}."""
    inputs = _inputs(distinct_inputs)
    if configs is None:
        # Batching alone (one worker, onnxruntime's threads), then `workers` batches at once with one
        # thread each, at max_batch and at a small batch (per-item CPU cost grows with the batch here:
        # the conv feature encoder's activations stop fitting in cache).
        configs = [{"workers": 1, "threads": None, "max_batch": max_batch},
                   {"workers": workers, "threads": 1, "max_batch": max_batch},
                   {"workers": workers, "threads": 1, "max_batch": min(max_batch, 2)}]
    result: dict[str, Any] = {
        "artifact": str(artifact_dir), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "python": platform.python_version()},
        "sequential": {}, "batcher": [],
    }
    for threads in (1, None):
        p = Predictor.load(artifact_dir, engine=engine, providers=providers, threads=threads)
        result["sequential"][f"threads={threads or 'default'}"] = _sequential(p, inputs, requests, warmup)
        result.setdefault("engine", {"name": p.engine.name, "providers": p.engine.providers})
        p.close()
    for cfg in configs:
        p = Predictor.load(artifact_dir, engine=engine, providers=providers, threads=cfg.get("threads"))
        row = _batched(p, inputs, requests, concurrency, cfg.get("max_batch", max_batch), max_wait_ms,
                       cfg.get("workers", 1), warmup)
        row["threads"] = cfg.get("threads") or "default"
        result["batcher"].append(row)
        p.close()
    base_name, base = max(result["sequential"].items(), key=lambda kv: kv[1]["throughput_rps"])
    best = max(result["batcher"], key=lambda r: r["throughput_rps"])
    result["baseline"] = f"sequential {base_name}"
    result["speedup"] = best["throughput_rps"] / base["throughput_rps"]
    for row in result["batcher"]:
        row["speedup_vs_baseline"] = row["throughput_rps"] / base["throughput_rps"]
    return result


def make_tiny(out_dir: str | Path) -> Path:
    """Export a random-init tiny-preset artifact (needs torch; for benchmarking only)."""
    from dmf.config import preset
    from dmf.export import export_checkpoint
    from dmf.model import DMFModel

    out_dir = Path(out_dir)
    ckpt = DMFModel(preset("tiny"), texts=TEXTS, pretrained=False).save_pretrained(out_dir.with_name(out_dir.name + "-ckpt"))
    return export_checkpoint(ckpt, out_dir, engine="onnx", precision="fp32", max_batch=32, force=True)


def _print(result: dict[str, Any]) -> None:
    print(f"artifact {result['artifact']}  engine {result['engine']['name']} {result['engine']['providers']}  "
          f"cpus {result['machine']['cpus']}")
    print(f"{'mode':<44} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} {'speedup':>8}")
    for name, row in result["sequential"].items():
        print(f"{'sequential batch-1 ' + name:<44} {row['throughput_rps']:8.1f} {row['p50_ms']:8.2f} "
              f"{row['p99_ms']:8.2f} {1:6.1f} {'':>8}")
    for row in result["batcher"]:
        name = (f"batcher x{row['concurrency']} clients, workers={row['workers']}, threads={row['threads']}, "
                f"max_batch={row['max_batch']}")
        print(f"{name:<44} {row['throughput_rps']:8.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
              f"{row['mean_batch_size']:6.1f} {row['speedup_vs_baseline']:7.2f}x")
    print(f"best speedup vs {result['baseline']}: {result['speedup']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmf.bench.runtime_bench", description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", help="artifact folder")
    ap.add_argument("--make-tiny", metavar="DIR", help="export a tiny random-init artifact to DIR, then benchmark it")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--providers", default=None)
    ap.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = ap.parse_args(argv)
    artifact = args.artifact
    if args.make_tiny:
        artifact = str(make_tiny(args.make_tiny))
    if not artifact:
        ap.error("give an artifact folder or --make-tiny DIR")
    result = run(artifact, requests=args.requests, concurrency=args.concurrency, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms, workers=args.workers, engine=args.engine, providers=args.providers)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
