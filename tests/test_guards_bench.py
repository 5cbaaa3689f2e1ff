"""Bench ratios on series whose per-round ratio drifts (issue 24, row 11).

With a constant per-round ratio, "median of the per-round ratios" and "ratio of the medians" are
the same number, so a series like that cannot tell them apart. Here the machine slows down round by
round while the engine's advantage shrinks: the two definitions then differ (3.0 against 8/3), and
the bench must report the paired one, computed by hand below.
"""

from __future__ import annotations

import numpy as np
import pytest

from dmf.bench.measure import paired_ratio

# Round r: the engine takes DEN[r] s, the baseline NUM[r] s; per-round ratios 5, 4, 3, 2, 1.
DEN = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
NUM = np.array([5.0, 8.0, 9.0, 8.0, 5.0])
PAIRED = 3.0  # sorted per-round ratios 1, 2, 3, 4, 5: the middle one
UNPAIRED = 8.0 / 3.0  # median(NUM) / median(DEN): what an unpaired ratio would say


def test_drifting_series_tell_the_two_ratios_apart():
    assert sorted(NUM / DEN)[2] == PAIRED
    assert np.median(NUM) / np.median(DEN) == pytest.approx(UNPAIRED)
    assert abs(PAIRED - UNPAIRED) > 0.3


@pytest.mark.parametrize("rounds", [1, 4])
def test_paired_ratio_is_the_median_of_per_round_ratios(rounds):
    """The five drifting rounds, repeated: the median is the paired 3.0, and its interval holds it."""
    num, den = np.tile(NUM, rounds), np.tile(DEN, rounds)
    r = paired_ratio(num, den)
    assert r["median"] == pytest.approx(PAIRED, abs=1e-12)
    assert r["rounds"] == 5 * rounds
    low, high = r["ci95"]
    assert 1.0 <= low <= PAIRED <= high <= 5.0  # resampled per-round ratios never leave [1, 5]


def test_paired_ratio_even_rounds_average_the_middle_pair():
    """Six rounds, per-round ratios 6, 5, 4, 3, 2, 1: the median is (4 + 3) / 2 = 3.5, while the ratio
    of the medians is 10 / 3.5 = 2.86."""
    den = np.arange(1.0, 7.0)
    num = den * np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    assert np.median(num) / np.median(den) == pytest.approx(10.0 / 3.5)
    assert paired_ratio(num, den)["median"] == pytest.approx(3.5, abs=1e-12)


def test_compute_ratios_reports_paired_speedups_and_memory_cost():
    """The bench's own pairing of engines: torch is the baseline (NUM), onnx the engine (DEN); naive
    fusion runs in half the memory fusion's time except in the drifting middle rounds."""
    from dmf.bench.bench import compute_ratios

    naive = DEN * np.array([1.0, 0.5, 0.25, 0.5, 1.0])  # memory / naive per round: 1, 2, 4, 2, 1 -> 2
    times = {("torch", "memory"): NUM, ("onnx", "memory"): DEN, ("onnx", "naive"): naive}
    ratios = compute_ratios(times, batch=1)
    (speedup,) = [r for r in ratios if r["kind"] == "speedup"]
    assert (speedup["engine"], speedup["baseline"], speedup["fusion"]) == ("onnx", "torch", "memory")
    assert speedup["median"] == pytest.approx(PAIRED, abs=1e-12)
    (cost,) = [r for r in ratios if r["kind"] == "memory_vs_naive"]
    assert np.median(DEN) / np.median(naive) == pytest.approx(3.0)  # unpaired: not the paired 2
    assert cost["engine"] == "onnx" and cost["median"] == pytest.approx(2.0, abs=1e-12)
