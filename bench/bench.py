"""`dmf bench`: latency and throughput per engine, fusion and batch size, measured in one run,
against torch eager (same run) and against the paper's 91 ms (memory) / 63 ms (naive) per sample.

The library returns a dict; `bench/render.py` and the CLI turn it into a table, bench.json,
bench.md and a plot.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dmf.bench.measure import TimingOptions, flops_per_sample, latency_stats, matmul_peak_gflops, time_calls

ENGINES = ("torch", "onnx", "onnx-int8", "trt")
PAPER_MS_PER_SAMPLE = {"memory": 91.0, "naive": 63.0}  # paper §3.2, NVIDIA M40/T4 GPUs


class BenchError(RuntimeError):
    """A benchmark could not be set up; the message says which engine, file or option."""


@dataclass(frozen=True)
class BenchOptions:
    engines: tuple[str, ...] = ("torch", "onnx", "onnx-int8", "trt")  # engines to time; unavailable ones are skipped
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # batch sizes to time
    fusions: tuple[str, ...] = ("memory", "naive")  # fusions to build with --preset
    threads: int = 2  # intra-op threads for torch and onnxruntime (this machine has 2 cores)
    timing: TimingOptions = field(default_factory=TimingOptions)  # warm-up and run counts
    measure_peak: bool = True  # time a GEMM to report each engine's fraction of the machine's peak
    seed: int = 0  # seed of the synthetic inputs

    def __post_init__(self) -> None:
        unknown = set(self.engines) - set(ENGINES)
        if unknown:
            raise BenchError(f"unknown engine(s) {sorted(unknown)}: expected some of {ENGINES}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BenchError(f"batch sizes must be integers >= 1, got {self.batch_sizes}")


@dataclass
class Case:
    """One model to benchmark: a checkpoint (for torch) and its exported artifacts per engine."""

    fusion: str
    checkpoint: Path | None
    artifacts: dict[str, Path] = field(default_factory=dict)  # engine -> artifact dir
    unavailable: dict[str, str] = field(default_factory=dict)  # engine -> why it could not be built


def synthetic_inputs(model_config: dict, batch: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs shaped by the artifact contract: normalised audio, token ids, attention mask."""
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((batch, model_config["max_audio_samples"])).astype(np.float32)
    tokens = model_config["max_tokens"]
    ids = rng.integers(5, max(vocab_size, 6), (batch, tokens)).astype(np.int64)
    mask = np.ones((batch, tokens), dtype=np.int64)
    mask[:, tokens * 2 // 3:] = 0  # a realistic transcript leaves padding
    ids[mask == 0] = 0
    return {"audio": audio, "input_ids": ids, "attention_mask": mask}


def run_bench(cases: list[Case], options: BenchOptions = BenchOptions(),
              progress: Callable[[str], None] | None = None) -> dict:
    """Time every (case, engine, batch size); returns {"machine", "rows", "skipped", "flops", ...}."""
    from dmf.bench.backends import TorchBackend, open_backend

    say = progress or (lambda _msg: None)
    rows, skipped, flops = [], [], {}
    for case in cases:
        # one checkpoint load per case serves both the FLOP count and the torch engine
        torch_backend = TorchBackend(case.checkpoint, options.threads) if case.checkpoint else None
        flops[case.fusion] = _flops(torch_backend) if torch_backend else None
        for engine in options.engines:
            try:
                backend = torch_backend if engine == "torch" and torch_backend else \
                    open_backend(engine, case, options.threads)
            except BenchError as exc:
                skipped.append({"engine": engine, "fusion": case.fusion, "reason": str(exc)})
                say(f"skip {engine}/{case.fusion}: {exc}")
                continue
            for batch in options.batch_sizes:
                say(f"timing {engine} {case.fusion} batch {batch}")
                inputs = synthetic_inputs(backend.model_config, batch, backend.vocab_size, options.seed)
                seconds = time_calls(lambda: backend.infer(inputs), options.timing)
                rows.append({"engine": engine, "fusion": case.fusion, "batch_size": batch,
                             **latency_stats(seconds, batch)})
    peak = matmul_peak_gflops(threads=options.threads) if options.measure_peak else None
    _add_relative_columns(rows, flops, peak)
    return {"machine": machine_info(options.threads), "matmul_peak_gflops": peak, "flops_per_sample": flops,
            "paper_ms_per_sample": PAPER_MS_PER_SAMPLE, "rows": rows, "skipped": skipped,
            "options": {**asdict(options), "timing": asdict(options.timing)}}


def _flops(backend) -> float:
    inputs = synthetic_inputs(backend.model_config, 1, backend.vocab_size, 0)
    return flops_per_sample(backend.model, backend.tensors(inputs))


def _add_relative_columns(rows: list[dict], flops: dict, peak: float | None) -> None:
    """speedup against torch eager (same fusion and batch size, same run), against the paper's
    per-sample latency, and the fraction of the measured GEMM peak each engine reaches."""
    torch_p50 = {(r["fusion"], r["batch_size"]): r["p50_ms_per_sample"] for r in rows if r["engine"] == "torch"}
    for row in rows:
        ref = torch_p50.get((row["fusion"], row["batch_size"]))
        row["speedup_vs_torch"] = ref / row["p50_ms_per_sample"] if ref else None
        paper = PAPER_MS_PER_SAMPLE.get(row["fusion"])
        row["paper_ms_per_sample"] = paper
        row["speedup_vs_paper"] = paper / row["p50_ms_per_sample"] if paper else None
        f = flops.get(row["fusion"])
        row["gflops_per_s"] = f * row["throughput_per_s"] / 1e9 if f else None
        # the peak is an fp32 GEMM's: int8 MatMuls are not fp32 FLOPs, so no fraction for them
        fp32 = not row["engine"].endswith("int8")
        row["peak_fraction"] = row["gflops_per_s"] / peak if (peak and row["gflops_per_s"] and fp32) else None


def machine_info(threads: int) -> dict:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform()}


# ------------------------------------------------------------------------ cases from a preset
def preset_cases(preset_name: str, fusions: tuple[str, ...], engines: tuple[str, ...], work_dir: Path,
                 progress: Callable[[str], None] | None = None) -> list[Case]:
    """Random-weight checkpoints at the preset's shapes (no download) and their exports."""
    from dmf.config import preset
    from dmf.model import DMFModel

    say = progress or (lambda _msg: None)
    cases = []
    for fusion in fusions:
        cfg = preset(preset_name, fusion=fusion)
        if preset_name == "paper":  # base shapes, random weights: latency is measured at the paper's size
            cfg = cfg.replace("model", audio_encoder=None, text_encoder=None,
                              audio_encoder_config={}, text_encoder_config={})
        say(f"building {preset_name} {fusion} model (random weights)")
        checkpoint = DMFModel(cfg, pretrained=False).eval().save_pretrained(work_dir / f"{fusion}-checkpoint")
        case = Case(fusion=fusion, checkpoint=checkpoint)
        export_for_engines(case, engines, work_dir / fusion, say)
        cases.append(case)
    return cases


def export_for_engines(case: Case, engines: tuple[str, ...], out_root: Path, say: Callable[[str], None]) -> None:
    """Export the case's checkpoint once per exported engine; an engine that cannot be built here
    (TensorRT without a GPU) is recorded with the reason, and reported as skipped."""
    from dmf.export import ExportError, export_checkpoint

    plans = {"onnx": ("onnx", "fp32"), "onnx-int8": ("onnx", "int8"), "trt": ("trt", "fp16")}
    for engine in engines:
        if engine not in plans:
            continue
        kind, precision = plans[engine]
        say(f"exporting {case.fusion} -> {engine}")
        try:
            case.artifacts[engine] = export_checkpoint(case.checkpoint, out_root / engine, engine=kind,
                                                       precision=precision, force=True)
        except ExportError as exc:
            case.unavailable[engine] = str(exc)


def artifact_cases(paths: list[Path]) -> list[Case]:
    """Cases from existing artifact dirs; the torch engine uses the source checkpoint when present."""
    from dmf.runtime.artifact import load_artifact

    cases: dict[tuple[str, str], Case] = {}
    for path in paths:
        art = load_artifact(path)
        meta = art.meta
        src = Path(meta.get("source_checkpoint", {}).get("path", ""))
        key = (meta["fusion"], str(src))
        case = cases.setdefault(key, Case(fusion=meta["fusion"], checkpoint=src if src.is_dir() else None))
        engine = "trt" if meta["engine"] == "trt" else ("onnx-int8" if meta["precision"] == "int8" else "onnx")
        case.artifacts[engine] = Path(path)
    return list(cases.values())


def temporary_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dmf-bench-"))


def remove_work_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
