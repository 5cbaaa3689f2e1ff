"""The one timing harness of `dmf bench`: warm-up, interleaved rounds, percentiles, paired ratios
with bootstrap intervals, a measured matrix-multiply peak, and the model's FLOPs per sample.

Why rounds: on a shared machine the speed drifts over seconds (other jobs, frequency, caches).
Timing engine A for a minute and then engine B lets that drift decide their ratio. Each round
here times every engine once, in an order rotated round by round, so drift hits all of them
alike; a ratio is then the median over rounds of the per-round ratio (paired), and its 95 %
interval comes from resampling rounds. A round slowed by a burst of other work slows both sides
of its pair and barely moves the median.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TimingOptions:
    warmup: int = 2  # untimed calls per engine before the first round (allocator, kernel choice, caches)
    min_runs: int = 10  # at least this many rounds (each round times every engine once)
    min_seconds: float = 2.0  # ...and keep adding rounds until this much wall time has passed
    max_runs: int = 200  # but never more than this many rounds


def time_rounds(fns: dict[str, Callable[[], object]], options: TimingOptions = TimingOptions()
                ) -> dict[str, np.ndarray]:
    """Seconds per call of every fn, one call each per round; round r starts at key r mod n."""
    keys = list(fns)
    for key in keys:
        for _ in range(options.warmup):
            fns[key]()
    times: dict[str, list[float]] = {key: [] for key in keys}
    start = time.perf_counter()
    rounds = 0
    while rounds < options.max_runs and (rounds < options.min_runs or time.perf_counter() - start < options.min_seconds):
        shift = rounds % len(keys)
        for key in keys[shift:] + keys[:shift]:
            t0 = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t0)
        rounds += 1
    return {key: np.asarray(v) for key, v in times.items()}


def time_calls(fn: Callable[[], object], options: TimingOptions = TimingOptions()) -> np.ndarray:
    """Seconds per call of one fn (rounds of one)."""
    return time_rounds({"fn": fn}, options)["fn"]


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles of one series of timed calls (ms), per call (batch) and per sample."""

    runs: int
    p50_ms_per_batch: float
    p95_ms_per_batch: float
    p99_ms_per_batch: float
    p5_ms_per_sample: float
    p50_ms_per_sample: float
    p95_ms_per_sample: float
    p99_ms_per_sample: float
    throughput_per_s: float  # samples per second at the median


def latency_stats(seconds: np.ndarray, batch_size: int) -> LatencyStats:
    """p5/p50/p95/p99 per batch and per sample (ms), and throughput (samples/s at the median)."""
    p5, p50, p95, p99 = (float(v) for v in np.percentile(seconds, [5, 50, 95, 99]) * 1000.0)
    return LatencyStats(runs=int(len(seconds)), p50_ms_per_batch=p50, p95_ms_per_batch=p95, p99_ms_per_batch=p99,
                        p5_ms_per_sample=p5 / batch_size, p50_ms_per_sample=p50 / batch_size,
                        p95_ms_per_sample=p95 / batch_size, p99_ms_per_sample=p99 / batch_size,
                        throughput_per_s=batch_size / (p50 / 1000.0))


def paired_ratio(numerator: np.ndarray, denominator: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Median over rounds of numerator[i] / denominator[i], with a 95 % percentile-bootstrap
    interval of that median (rounds resampled with replacement, seeded: reproducible)."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.size == 0:
        raise ValueError(f"paired ratio needs two equal, non-empty series (got {num.shape} and {den.shape})")
    per_round = num / den
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, per_round.size, size=(resamples, per_round.size))
    medians = np.median(per_round[picks], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return {"median": float(np.median(per_round)), "ci95": [float(low), float(high)], "rounds": int(per_round.size)}


# A 95 % interval whose ends are further apart than this factor is too wide to read: the rounds
# disagreed so much that the median could be off by half (the demo once printed [1.12, 3.41]).
WIDE_INTERVAL = 1.5


def interval_reading(ratio: dict) -> str:
    """Words for a paired ratio whose interval does not support its median: "too wide" when
    upper / lower > WIDE_INTERVAL, "no clear difference" when the interval holds 1 (the median's
    side of 1 is not established); "" when the figure can be read as it stands."""
    low, high = ratio["ci95"]
    if low <= 0 or high / low > WIDE_INTERVAL:
        return "too wide"
    if low <= 1.0 <= high:
        return "no clear difference"
    return ""


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
