"""dmf bench: the ratio maths, interleaved rounds, run_bench on tiny models (torch, onnx, openvino,
a skipped engine), the outputs (bench.json, bench.md, the plot), the CLI's one-line errors and the
micro-batcher option. No timed assertions: speed targets are reported by the benchmark, never
asserted; every figure checked here is recomputed from the timings the run returned.

Everything runs at threads=1: on this shared 2-core machine two threads per engine spin against
the other jobs' threads and a tiny model's call goes from ~10 ms to over a second.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dmf.bench.bench import (QUICK_ENGINES, QUICK_TIMING, BenchError, BenchOptions, BenchRow, Case, compute_ratios,
                             export_for_engines, is_paper_shaped, preset_cases, run_bench)
from dmf.bench.measure import TimingOptions, interval_reading, latency_stats, paired_ratio, time_calls, time_rounds
from dmf.bench.render import (bar_label, columns, format_excess, format_ratio, markdown, noise_lines, plot,
                              write_outputs)
from dmf.cli import app
from dmf.config import ModelConfig, preset
from dmf.cpuinfo import cpu_info
from dmf.model import DMFModel

FAST = TimingOptions(warmup=1, min_runs=3, min_seconds=0.0)
TEXTS = ["i am so happy today", "this is terrible news", "leave me alone", "what a surprise", "okay fine"]
AUDIO_SAMPLES = 4000  # 0.25 s: the tiny encoders at a quarter of a second keep every call a few ms
PNG = b"\x89PNG\r\n\x1a\n"


def _noisy(center: float, n: int, seed: int, spread: float = 0.05) -> np.ndarray:
    return center * np.exp(np.random.default_rng(seed).normal(0.0, spread, n))


# ----------------------------------------------------------------------------- ratio maths
@pytest.mark.parametrize("slowed", ["both", "numerator", "denominator"])
def test_one_slowed_round_does_not_flip_a_ratio(slowed):
    """Nine rounds say the baseline takes 2x the engine's time; one round 50x slower (for both
    sides of the pair, or for one side only: a burst that hit one call) leaves the ratio at ~2."""
    base, engine = _noisy(2.0, 9, seed=1), _noisy(1.0, 9, seed=2)
    if slowed in ("both", "numerator"):
        base[4] *= 50
    if slowed in ("both", "denominator"):
        engine[4] *= 50
    r = paired_ratio(base, engine)
    assert r["median"] == pytest.approx(2.0, rel=0.1) and r["rounds"] == 9
    low, high = r["ci95"]
    assert 1.5 < low <= r["median"] <= high < 2.7  # neither flipped below 1 nor blown up by the 100x round


def test_interval_contains_the_median_and_narrows_with_rounds():
    widths = []
    for rounds in (8, 64, 512):
        r = paired_ratio(_noisy(3.0, rounds, seed=rounds, spread=0.2), _noisy(1.0, rounds, seed=rounds + 1, spread=0.2))
        low, high = r["ci95"]
        assert low <= r["median"] <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    again = paired_ratio(_noisy(3.0, 8, seed=8, spread=0.2), _noisy(1.0, 8, seed=9, spread=0.2))
    assert again["ci95"] == paired_ratio(_noisy(3.0, 8, seed=8, spread=0.2),
                                         _noisy(1.0, 8, seed=9, spread=0.2))["ci95"]  # seeded bootstrap


def test_unequal_or_empty_series_are_refused():
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_ratio(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_ratio(np.ones(0), np.ones(0))


def test_time_rounds_interleaves_and_rotates_the_order():
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = time_rounds(fns, TimingOptions(warmup=1, min_runs=3, min_seconds=0.0, max_runs=3))
    assert calls[:3] == list("abc")  # one warm-up call each
    assert calls[3:] == list("abc" "bca" "cab")  # round r starts at key r mod n
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all((v >= 0).all() for v in times.values())


def test_time_calls_meets_minimum_runs_and_stops_at_max():
    calls = []
    assert len(time_calls(lambda: calls.append(1), TimingOptions(warmup=2, min_runs=5, min_seconds=0.0))) == 5
    assert len(calls) == 7
    capped = time_calls(lambda: None, TimingOptions(warmup=0, min_runs=1, min_seconds=60.0, max_runs=4))
    assert len(capped) == 4  # max_runs wins over min_seconds


def test_latency_stats_per_batch_and_per_sample():
    seconds = np.arange(1, 101) / 1000.0  # 1..100 ms
    s = latency_stats(seconds, batch_size=4)
    p5, p50, p95, p99 = np.percentile(seconds * 1000, [5, 50, 95, 99])
    assert s.runs == 100 and s.p50_ms_per_batch == pytest.approx(p50)
    assert s.p5_ms_per_sample == pytest.approx(p5 / 4) and s.p99_ms_per_sample == pytest.approx(p99 / 4)
    assert s.p95_ms_per_sample == pytest.approx(p95 / 4)
    assert s.throughput_per_s == pytest.approx(4 / (p50 / 1000))


def test_compute_ratios_picks_the_best_engine_and_memory_vs_naive():
    n = 12
    times = {}
    for i, (name, ms) in enumerate({"torch": 10.0, "torch-bf16": 5.0, "onnx": 4.0, "openvino": 2.0}.items()):
        times[(name, "memory")] = _noisy(ms, n, seed=i)
        times[(name, "naive")] = _noisy(ms / 1.25, n, seed=10 + i)  # memory costs +25 % everywhere
    ratios = compute_ratios(times, batch=2)
    speedups = [r for r in ratios if r["kind"] == "speedup"]
    assert {(r["engine"], r["baseline"], r["fusion"]) for r in speedups} == {
        (e, b, f) for e in ("onnx", "openvino") for b in ("torch", "torch-bf16") for f in ("memory", "naive")}
    best = {(r["fusion"], r["baseline"]): r for r in speedups if r["best"]}
    assert len(best) == 4 and all(r["engine"] == "openvino" for r in best.values())
    assert best[("memory", "torch")]["median"] == pytest.approx(5.0, rel=0.1)
    assert best[("memory", "torch-bf16")]["median"] == pytest.approx(2.5, rel=0.1)
    memory = {r["engine"]: r for r in ratios if r["kind"] == "memory_vs_naive"}
    assert set(memory) == {"torch", "torch-bf16", "onnx", "openvino"}
    assert all(r["median"] == pytest.approx(1.25, rel=0.1) and r["batch_size"] == 2 for r in memory.values())
    assert format_excess(memory["onnx"]).startswith("+2")  # "+25.x % [...]"


@pytest.mark.parametrize("ci, words", [
    ((2.20, 2.45), ""),  # narrow, clear of 1: read as it stands
    ((1.12, 3.41), "too wide"),  # the demo's: ends 3.0x apart
    ((0.963, 2.407), "too wide"),  # an overhead of [-3.7, +140.7] %
    ((0.90, 1.20), "no clear difference"),  # narrow enough, but either side of 1
    ((1.01, 1.50), ""),  # ends 1.49x apart, just under WIDE_INTERVAL: readable
])
def test_intervals_too_wide_to_read_are_said_in_words(ci, words):
    ratio = {"median": 1.3, "ci95": list(ci), "rounds": 10}
    assert interval_reading(ratio) == words
    assert format_ratio(ratio).endswith(f"] {words}" if words else "]")
    assert format_excess(ratio).endswith(f"] {words}" if words else "]")
    result = {"ratios": [ratio, {"median": 2.3, "ci95": [2.2, 2.45], "rounds": 10}]}
    assert noise_lines(result) == ([] if words != "too wide" else [
        "1 of 2 ratio intervals are too wide to read (ends more than 1.5x apart): the machine was too noisy "
        "for those figures; rerun on a quiet machine or with more rounds (--min-runs)."])


def test_compute_ratios_without_a_baseline_or_a_pair():
    ratios = compute_ratios({("onnx", "memory"): _noisy(1.0, 5, 0)}, batch=1)
    assert ratios == []  # no baseline timed, no naive twin: nothing to pair


# ------------------------------------------------------------------------------- tiny cases
@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[Case]:
    """Random-weight tiny models at 0.25 s of audio: memory exported to onnx and openvino (and trt,
    which cannot be built here); naive runs on torch only (memory vs naive pairs on the torch
    engines). Exports are most of this module's time: two of them."""
    work = tmp_path_factory.mktemp("bench")
    out = []
    for fusion, engines in (("memory", ("onnx", "openvino", "trt")), ("naive", ())):
        torch.manual_seed(0)
        cfg = preset("tiny", fusion=fusion, max_audio_samples=AUDIO_SAMPLES)
        ckpt = DMFModel(cfg, texts=TEXTS, pretrained=False).eval().save_pretrained(work / f"{fusion}-ckpt")
        case = Case(fusion=fusion, checkpoint=ckpt)
        export_for_engines(case, engines, work / fusion, lambda _msg: None)
        out.append(case)
    return out


@pytest.fixture(scope="module")
def timed(cases) -> tuple[dict, list[dict]]:
    """The bench result and the partial results it handed out after each batch size."""
    options = BenchOptions(engines=("torch", "torch-bf16", "onnx", "openvino", "trt"), batch_sizes=(1, 2),
                           threads=1, timing=FAST, measure_peak=False)
    partials: list[dict] = []
    return run_bench(cases, options, on_partial=partials.append), partials


@pytest.fixture(scope="module")
def result(timed) -> dict:
    return timed[0]


def test_partial_results_after_each_batch_size(timed, tmp_path):
    """A long run leaves what it measured: after batch 1 the rows of batch 1 (complete: False),
    rewritten after batch 2; bench.md says the run was partial."""
    final, partials = timed
    assert [sorted({r.batch_size for r in p["rows"]}) for p in partials] == [[1], [1, 2]]
    assert [p["complete"] for p in partials] == [False, False] and final["complete"] is True
    assert [r.latency for r in partials[1]["rows"]] == [r.latency for r in final["rows"]]
    assert partials[0]["head"] is None and final["head"]  # the head is timed after the rows
    paths = write_outputs(partials[0], tmp_path, plot_too=False)
    assert "Partial: the run is still going (or was stopped); batch sizes done: 1 of 1, 2." in paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["complete"] is False and "png" not in paths
    assert "Partial" not in markdown(final)


def test_run_bench_rows(result):
    bf16 = cpu_info().bf16
    expected = {(e, "memory", b) for e in ("torch", "onnx", "openvino") for b in (1, 2)}
    expected |= {("torch", "naive", b) for b in (1, 2)}
    if bf16:
        expected |= {("torch-bf16", f, b) for f in ("memory", "naive") for b in (1, 2)}
    rows = {(r.engine, r.fusion, r.batch_size): r for r in result["rows"]}
    assert set(rows) == expected
    for (engine, fusion, batch), row in rows.items():
        t = row.latency
        assert t.runs >= FAST.min_runs
        assert t.p50_ms_per_sample == pytest.approx(t.p50_ms_per_batch / batch)
        assert t.p5_ms_per_sample <= t.p50_ms_per_sample <= t.p95_ms_per_sample <= t.p99_ms_per_sample
        assert t.throughput_per_s == pytest.approx(1000.0 / t.p50_ms_per_sample)
        torch_ms = rows[("torch", fusion, batch)].latency.p50_ms_per_sample
        assert row.speedup["torch"] == pytest.approx(torch_ms / t.p50_ms_per_sample)
        assert (row.speedup["torch-bf16"] is not None) == bf16
        assert row.speedup_vs_paper is None and row.peak_fraction is None  # tiny model, no peak measured
    assert result["paper_ms_per_sample"] is None


class _RecordingEngine:
    """Stands in for an engine: records the shape of every batch it is given."""

    def __init__(self):
        self.shapes = []

    def infer(self, batch):
        from dmf.contract import AUDIO_INPUT, IDS_INPUT

        self.shapes.append((batch[AUDIO_INPUT].shape, batch[IDS_INPUT].shape, int(batch[IDS_INPUT].max())))
        return np.zeros((batch[AUDIO_INPUT].shape[0], 4), np.float32)

    def close(self):
        pass


def test_run_bench_times_exactly_the_batch_sizes_asked(cases, monkeypatch):
    # The bench once passed the vocabulary size where the batch size goes: "batch 1" timed 99 clips.
    import dmf.bench.bench as bench

    recorders = {}
    monkeypatch.setattr(bench, "open_engines", lambda case, engines, threads, skipped: {
        "onnx": recorders.setdefault(case.fusion, _RecordingEngine())})
    run_bench(cases, BenchOptions(engines=("onnx",), batch_sizes=(1, 3), timing=FAST, measure_peak=False,
                                  head=False))
    cfg = json.loads((cases[0].checkpoint / "config.json").read_text())["model"]
    vocab = cfg["text_encoder_config"]["vocab_size"]
    for recorder in recorders.values():
        assert {s[:2] for s in recorder.shapes} == {((b, AUDIO_SAMPLES), (b, cfg["max_tokens"])) for b in (1, 3)}
        assert max(s[2] for s in recorder.shapes) < vocab


def test_run_bench_skips_with_reasons(result):
    skipped = {(s["engine"], s["fusion"]): s["reason"] for s in result["skipped"]}
    assert "TensorRT" in skipped[("trt", "memory")]  # no GPU / tensorrt here: listed, with why
    assert "no openvino artifact given" in skipped[("openvino", "naive")] and ("onnx", "naive") in skipped
    if cpu_info().bf16:
        assert ("torch-bf16", "memory") not in skipped
    else:
        assert "no native bf16" in skipped[("torch-bf16", "memory")]


def test_run_bench_ratios_and_head(result):
    speedups = [r for r in result["ratios"] if r["kind"] == "speedup"]
    for fusion, batch in (("memory", 1), ("memory", 2), ("naive", 1), ("naive", 2)):
        mine = [r for r in speedups if (r["fusion"], r["batch_size"]) == (fusion, batch) and r["baseline"] == "torch"]
        assert {r["engine"] for r in mine} == ({"onnx", "openvino"} if fusion == "memory" else set())
        assert sum(r["best"] for r in mine) == (fusion == "memory")
        for r in mine:
            assert r["ci95"][0] <= r["median"] <= r["ci95"][1] and r["rounds"] >= FAST.min_runs
    memory = {(r["engine"], r["batch_size"]) for r in result["ratios"] if r["kind"] == "memory_vs_naive"}
    assert {("torch", 1), ("torch", 2)} <= memory
    assert ("onnx", 1) not in memory  # only the memory model has artifacts
    for batch in ("1", "2"):
        head = result["head"][batch]
        assert head["memory"] > 0 and head["naive"] > 0 and np.isfinite(head["memory_minus_naive_ms"])
    machine = result["machine"]
    assert machine["cpu_line"] == cpu_info().line() and {"torch", "onnxruntime", "openvino"} <= set(machine["versions"])


def test_outputs_json_markdown_and_plots(result, tmp_path):
    paths = write_outputs(result, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["ratios"] and len(saved["rows"]) == len(result["rows"])
    for row, written in zip(result["rows"], saved["rows"]):  # flat, under the keys bench.json always had
        assert written == {"engine": row.engine, "fusion": row.fusion, "batch_size": row.batch_size,
                           **asdict(row.latency), "speedup_vs_torch": row.speedup["torch"],
                           "speedup_vs_torch_bf16": row.speedup["torch-bf16"], "paper_ms_per_sample": None,
                           "speedup_vs_paper": None, "gflops_per_s": None, "peak_fraction": None}
    md = paths["md"].read_text()
    assert result["machine"]["cpu_line"] in md and "onnxruntime" in md  # CPU line and versions
    assert "xpaper" not in md and "91 / 63 ms" in md  # tiny: no "Nx the paper" column
    assert "xbf16" in md and "## Best engine vs the baselines" in md and "## Fusion head alone (after the encoders, onnx engine, 1 thread)" in md
    assert "## Memory fusion vs naive fusion" in md and "trt (memory): TensorRT" in md
    best = next(r for r in result["ratios"] if r["kind"] == "speedup" and r["best"])
    assert format_ratio(best) in md
    assert paths["png"].read_bytes()[:8] == PNG  # two batch sizes: latency vs batch
    one = {**result, "rows": [r for r in result["rows"] if r.batch_size == 1]}
    plot(one, tmp_path / "one.png")  # one batch size: bars
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG and (tmp_path / "one.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", "bench.png", "one.png"]


def test_paper_shaped_results_get_the_paper_column_and_lines(result, tmp_path):
    paper = {**result, "paper_ms_per_sample": {"memory": 91.0, "naive": 63.0},
             "rows": [replace(r, speedup_vs_paper=91.0 / r.latency.p50_ms_per_sample) for r in result["rows"]
                      if r.batch_size == 1]}
    assert "xpaper" in [c.header for c in columns(paper)]
    assert "xpaper" not in [c.header for c in columns(result)]
    assert "| xpaper |" in markdown(paper) and "91 ms (memory) / 63 ms (naive)" in markdown(paper)
    plot(paper, tmp_path / "paper.png")
    assert (tmp_path / "paper.png").read_bytes()[:8] == PNG


def test_bar_labels_use_bf16_when_it_ran_else_torch():
    row = BenchRow("onnx", "memory", 1, latency_stats(np.array([0.01]), 1), speedup={"torch": 2.04, "torch-bf16": 1.1})
    ratio = {"kind": "speedup", "engine": "onnx", "baseline": "torch-bf16", "fusion": "memory", "batch_size": 1,
             "median": 1.26}
    assert bar_label({"ratios": [ratio]}, row, "torch-bf16") == "1.3x bf16"  # the paired ratio wins
    assert bar_label({"ratios": []}, row, "torch-bf16") == "1.1x bf16"  # else the p50 ratio
    assert bar_label({"ratios": []}, row, "torch") == "2.0x torch"
    assert bar_label({"ratios": []}, replace(row, engine="torch"), "torch") == "baseline"
    assert bar_label({"ratios": []}, row, None) == ""


def test_peak_fraction_uses_flops_and_peak():
    from dmf.bench.bench import _add_relative_columns

    rows = [BenchRow(e, "memory", 1, latency_stats(np.array([0.01, 0.01]), 1))
            for e in ("onnx", "onnx-int8", "openvino-bf16", "trt", "torch-bf16")]
    _add_relative_columns(rows, {"memory": 2e9}, peak=400.0, paper=True)  # 2 GFLOP x 100/s = 200 GFLOP/s
    assert rows[0].gflops_per_s == pytest.approx(200.0) and rows[0].peak_fraction == pytest.approx(0.5)
    assert rows[1].peak_fraction is None  # int8 work is not fp32 FLOPs
    assert all(r.peak_fraction is None for r in rows[2:])  # nor bf16, nor TensorRT's fp16
    assert rows[0].speedup["torch"] is None  # no torch row in this run
    assert rows[0].speedup_vs_paper == pytest.approx(91.0 / 10.0)


def test_is_paper_shaped():
    paper = asdict(ModelConfig())
    assert is_paper_shaped(paper)
    assert not is_paper_shaped(asdict(preset("tiny").model))
    assert not is_paper_shaped(dict(paper, text_encoder_config={"hidden_size": 384}))
    assert not is_paper_shaped(dict(paper, max_audio_samples=48000))


# ------------------------------------------------------------------------------------- CLI
def _one_line_error(args: list[str], *needles: str) -> None:
    result = CliRunner().invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], result.output


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(BenchError, match="unknown engine"):
        BenchOptions(engines=("torch", "tpu"))
    with pytest.raises(BenchError, match="batch sizes"):
        BenchOptions(batch_sizes=(0,))
    _one_line_error(["bench", "--preset", "tiny", "--engines", "torch,tpu"], "unknown engine", "tpu")
    _one_line_error(["bench", "--preset", "tiny", "--batch-sizes", "0"], "batch sizes")
    _one_line_error(["bench", "--preset", "tiny", "--batch-sizes", "1,x"], "'1,x'")
    _one_line_error(["bench"], "--preset")
    _one_line_error(["bench", str(tmp_path / "missing")], "missing")  # ArtifactError, caught by type
    _one_line_error(["bench", "--batcher", "--preset", "tiny"], "exactly one ARTIFACT")


def test_quick_mode_and_cache_options(monkeypatch, tmp_path):
    """--quick picks the quick engines and rounds unless told otherwise; the cache is on by default."""
    import dmf.bench.cli as bench_cli

    seen = []
    monkeypatch.setattr(bench_cli, "_bench", lambda *args, **kwargs: seen.append((args, kwargs)))
    for extra in ([], ["--engines", "torch", "--min-runs", "7"], ["--no-cache", "--cache", str(tmp_path)]):
        assert CliRunner().invoke(app, ["bench", "--preset", "tiny", "--quick", *extra]).exit_code == 0
    (a, ka), (b, _), (c, kc) = seen
    assert a[2].engines == QUICK_ENGINES and a[2].timing == QUICK_TIMING and ka["use_cache"]
    assert b[2].engines == ("torch",) and b[2].timing == replace(QUICK_TIMING, min_runs=7)
    assert c[4] == tmp_path and kc["use_cache"] is False
    assert CliRunner().invoke(app, ["bench", "--preset", "tiny"]).exit_code == 0
    assert seen[-1][0][2].timing == TimingOptions() and "torch-bf16" in seen[-1][0][2].engines


def test_preset_exports_are_cached_by_config_and_version(cases, monkeypatch, tmp_path):
    """A second run with the same cache reuses the checkpoint and the export; a new dmf version
    (or config) builds afresh in its own folder."""
    import shutil

    import dmf
    import dmf.bench.bench as bench
    import dmf.export

    exports = []

    def fake_export(checkpoint, out, **kwargs):  # a real artifact, copied: exports are not what is tested
        exports.append(out)
        shutil.copytree(cases[0].artifacts["onnx"], out)
        return out

    monkeypatch.setattr(dmf.export, "export_checkpoint", fake_export)
    said = []
    first = preset_cases("tiny", ("memory",), ("torch", "onnx"), tmp_path / "work", said.append, cache=tmp_path)
    assert len(exports) == 1 and first[0].artifacts["onnx"].parent.parent == tmp_path
    monkeypatch.setattr(bench, "_random_model", lambda cfg: pytest.fail("rebuilt a cached checkpoint"))
    again = preset_cases("tiny", ("memory",), ("torch", "onnx"), tmp_path / "work", said.append, cache=tmp_path)
    assert len(exports) == 1 and again[0].artifacts == first[0].artifacts
    assert again[0].checkpoint == first[0].checkpoint and any(m.startswith("reusing memory -> onnx") for m in said)
    monkeypatch.setattr(dmf, "__version__", "9.9.9")
    with pytest.raises(pytest.fail.Exception, match="rebuilt"):  # another version: another key, built afresh
        preset_cases("tiny", ("memory",), ("torch", "onnx"), tmp_path / "work", said.append, cache=tmp_path)


def test_batcher_option_times_one_artifact(cases, tmp_path):
    artifact = cases[0].artifacts["onnx"]
    _one_line_error(["bench", str(artifact), "--batcher", "--requests", "0"], "requests")
    args = ["bench", str(artifact), "--batcher", "--requests", "4", "--concurrency", "2", "--max-batch", "2",
            "--workers", "2", "--out", str(tmp_path)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "Micro-batcher" in run.output and "CPU:" in run.output
    saved = json.loads((tmp_path / "batcher.json").read_text())
    assert set(saved["sequential"]) == {"threads=1", "threads=default"} and len(saved["batcher"]) == 3
    for row in [*saved["sequential"].values(), *saved["batcher"]]:
        assert row["requests"] == 4 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["throughput_rps"] == pytest.approx(row["requests"] / row["seconds"])
    base = max(r["throughput_rps"] for r in saved["sequential"].values())
    assert saved["speedup"] == pytest.approx(max(r["throughput_rps"] for r in saved["batcher"]) / base)
    assert [r["max_batch"] for r in saved["batcher"]] == [2, 2, 2] and saved["batcher"][0]["workers"] == 1
    assert all(1 <= r["mean_batch_size"] <= 2 for r in saved["batcher"])
    assert saved["engine"]["name"] == "onnx" and saved["machine"]["cpu_line"] in (tmp_path / "batcher.md").read_text()


def test_batcher_path_imports_no_torch():
    """`dmf bench ARTIFACT --batcher` runs on a runtime-only install: its modules import no torch."""
    import subprocess
    import sys

    code = ("import sys, dmf.bench.batcher, dmf.bench.render, dmf.bench.cli; "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)
