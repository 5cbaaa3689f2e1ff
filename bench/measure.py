"""Timing primitives shared by the benchmarks: warm-up, enough runs for a stable median,
percentiles, a measured matrix-multiply peak, and the model's FLOPs per sample."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TimingOptions:
    warmup: int = 3  # untimed calls first (allocator, kernel selection, caches)
    min_runs: int = 10  # at least this many timed calls
    min_seconds: float = 2.0  # ...and keep timing until this much wall time has passed
    max_runs: int = 200  # but never more than this many


def time_calls(fn: Callable[[], object], options: TimingOptions = TimingOptions()) -> np.ndarray:
    """Seconds per call, for `fn` run after warm-up until both run and time minimums are met."""
    for _ in range(options.warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < options.max_runs and (
            len(times) < options.min_runs or time.perf_counter() - start < options.min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def latency_stats(seconds: np.ndarray, batch_size: int) -> dict:
    """p50/p95/p99 per batch and per sample (ms), and throughput (samples/s at the median)."""
    p50, p95, p99 = np.percentile(seconds, [50, 95, 99]) * 1000.0
    return {
        "runs": int(len(seconds)),
        "p50_ms_per_batch": float(p50), "p95_ms_per_batch": float(p95), "p99_ms_per_batch": float(p99),
        "p50_ms_per_sample": float(p50 / batch_size), "p95_ms_per_sample": float(p95 / batch_size),
        "p99_ms_per_sample": float(p99 / batch_size),
        "throughput_per_s": float(batch_size / (p50 / 1000.0)),
    }


def matmul_peak_gflops(size: int = 2048, threads: int | None = None, options: TimingOptions | None = None) -> float:
    """Measured fp32 GEMM rate of this machine (GFLOP/s, median of repeated size^3 products),
    the ceiling against which an engine's achieved FLOP rate is judged."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = time_calls(lambda: a @ b, options or TimingOptions(warmup=3, min_runs=10, min_seconds=1.0))
    return 2.0 * size ** 3 / float(np.median(seconds)) / 1e9


def flops_per_sample(model, inputs: tuple) -> float:
    """FLOPs of one eval forward divided by the batch size (torch's FLOP counter: matmuls,
    convolutions, attention), the numerator of the peak fraction."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]
