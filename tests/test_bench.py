"""dmf bench: rows, relative columns, skipped engines, outputs (issue 6). No timed assertions:
speed targets are reported by the benchmark, never asserted."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dmf.bench.bench import BenchError, BenchOptions, Case, preset_cases, run_bench
from dmf.bench.measure import TimingOptions, latency_stats, time_calls
from dmf.bench.render import markdown, memory_overhead, write_outputs

FAST = TimingOptions(warmup=1, min_runs=2, min_seconds=0.0)


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    return preset_cases("tiny", ("memory",), ("torch", "onnx", "trt"), work)


def test_run_bench_rows_and_relative_columns(tiny_cases, tmp_path):
    options = BenchOptions(engines=("torch", "onnx", "trt"), batch_sizes=(1, 2), timing=FAST, measure_peak=False)
    result = run_bench(tiny_cases, options)
    rows = {(r["engine"], r["batch_size"]): r for r in result["rows"]}
    assert set(rows) == {("torch", 1), ("torch", 2), ("onnx", 1), ("onnx", 2)}
    for (engine, batch), row in rows.items():
        assert row["fusion"] == "memory" and row["runs"] >= 2
        assert row["p50_ms_per_sample"] == pytest.approx(row["p50_ms_per_batch"] / batch)
        assert row["p50_ms_per_sample"] <= row["p95_ms_per_sample"] <= row["p99_ms_per_sample"]
        assert row["throughput_per_s"] == pytest.approx(1000.0 / row["p50_ms_per_sample"])
        torch_ms = rows[("torch", batch)]["p50_ms_per_sample"]
        assert row["speedup_vs_torch"] == pytest.approx(torch_ms / row["p50_ms_per_sample"])
        assert row["speedup_vs_paper"] == pytest.approx(91.0 / row["p50_ms_per_sample"])
    assert result["flops_per_sample"]["memory"] > 0
    skipped = {s["engine"]: s["reason"] for s in result["skipped"]}
    assert "trt" in skipped and "TensorRT" in skipped["trt"]  # no GPU here: listed, with why

    paths = write_outputs(result, tmp_path)
    saved = json.loads(paths["json"].read_text())
    for key in ("engine", "fusion", "batch_size", "p50_ms_per_sample", "p95_ms_per_sample",
                "p99_ms_per_sample", "throughput_per_s", "speedup_vs_torch"):
        assert all(key in row for row in saved["rows"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "91 ms (memory)" in paths["md"].read_text() and "trt (memory)" in paths["md"].read_text()


def test_peak_fraction_uses_flops_and_peak():
    rows = [{"engine": "onnx", "fusion": "memory", "batch_size": 1, **latency_stats([0.01, 0.01], 1)}]
    from dmf.bench.bench import _add_relative_columns

    _add_relative_columns(rows, {"memory": 2e9}, peak=400.0)  # 2 GFLOP x 100/s = 200 GFLOP/s
    assert rows[0]["gflops_per_s"] == pytest.approx(200.0)
    assert rows[0]["peak_fraction"] == pytest.approx(0.5)
    assert rows[0]["speedup_vs_torch"] is None  # no torch row in this run


def test_memory_overhead_against_naive():
    result = {"rows": [
        {"engine": "onnx", "fusion": "memory", "batch_size": 1, "p50_ms_per_sample": 103.0},
        {"engine": "onnx", "fusion": "naive", "batch_size": 1, "p50_ms_per_sample": 100.0},
    ]}
    assert memory_overhead(result) == {"onnx b1": pytest.approx(3.0)}


def test_timing_meets_minimum_runs():
    calls = []
    seconds = time_calls(lambda: calls.append(1), TimingOptions(warmup=2, min_runs=5, min_seconds=0.0))
    assert len(seconds) == 5 and len(calls) == 7


def test_bad_options_are_one_line_errors():
    with pytest.raises(BenchError, match="unknown engine"):
        BenchOptions(engines=("torch", "tpu"))
    with pytest.raises(BenchError, match="batch sizes"):
        BenchOptions(batch_sizes=(0,))
    from dmf.cli import app

    result = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--engines", "torch,tpu"])
    assert result.exit_code == 2 and "unknown engine" in result.output


def test_missing_artifact_engine_is_skipped_with_reason(tiny_cases):
    case = Case(fusion="memory", checkpoint=None)
    result = run_bench([case], BenchOptions(engines=("torch", "onnx-int8"), batch_sizes=(1,), timing=FAST,
                                            measure_peak=False))
    reasons = {s["engine"]: s["reason"] for s in result["skipped"]}
    assert result["rows"] == [] and "checkpoint" in reasons["torch"] and "onnx-int8" in reasons["onnx-int8"]
    assert "Skipped" in markdown({**result, "machine": result["machine"]})
