"""`dmf bench`: latency and throughput per engine, fusion and batch size, all engines timed in
interleaved rounds in one run (bench/measure.py), against the baselines users would otherwise run
(torch eager fp32, and torch with bf16 autocast) and against the paper's 91 / 63 ms per sample.

The library returns a dict whose "rows" are `BenchRow`s; `bench/render.py` and the CLI turn it
into a table, bench.json (`json_default` flattens each row to the keys bench.json has always had),
bench.md and a plot. Every engine goes through the one engine interface (`infer(batch)`):
torch through `dmf.torch_engine.TorchEngine`, the artifacts through `dmf.runtime.engines`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dmf.bench.measure import (LatencyStats, TimingOptions, flops_per_sample, latency_stats, matmul_peak_gflops,
                               paired_ratio, time_rounds)

# bench engine -> (artifact engine, precision) it runs; torch engines run the checkpoint.
ARTIFACT_ENGINES = {"onnx": ("onnx", "fp32"), "onnx-int8": ("onnx", "int8"), "openvino": ("openvino", "fp32"),
                    "openvino-bf16": ("openvino", "bf16"), "openvino-int8": ("openvino", "int8"),
                    "trt": ("trt", "fp16")}
TORCH_ENGINES = {"torch": "fp32", "torch-bf16": "bf16"}
ENGINES = (*TORCH_ENGINES, *ARTIFACT_ENGINES)
BASELINES = ("torch", "torch-bf16")  # what users would otherwise run: every speedup is against these
PAPER_MS_PER_SAMPLE = {"memory": 91.0, "naive": 63.0}  # paper §3.2, NVIDIA M40/T4 GPUs
DEFAULT_ENGINES = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino-bf16", "openvino-int8", "trt")
# --quick: the fp32 baseline and the two cheapest exports (no OpenVINO conversion or NNCF calibration,
# which took most of the paper bench's export time), few rounds: a first look, not a figure to quote
QUICK_ENGINES = ("torch", "onnx", "onnx-int8")
QUICK_TIMING = TimingOptions(warmup=1, min_runs=5, min_seconds=0.0)


class BenchError(RuntimeError):
    """A benchmark could not be set up; the message says which engine, file or option."""


@dataclass(frozen=True)
class BenchOptions:
    engines: tuple[str, ...] = DEFAULT_ENGINES  # engines to time; unavailable ones are skipped with the reason
    batch_sizes: tuple[int, ...] = (1, 8)  # batch sizes to time
    fusions: tuple[str, ...] = ("memory", "naive")  # fusions to build with --preset
    threads: int = 2  # intra-op threads for every engine (this machine has 2 cores)
    timing: TimingOptions = field(default_factory=TimingOptions)  # warm-up and round counts
    measure_peak: bool = True  # time a GEMM to report each fp32 engine's fraction of the machine's peak
    head: bool = True  # also time the fusion head alone (everything after the encoders), memory vs naive
    head_threads: int = 1  # threads of the head timing: its batch-1 GEMVs lose more to a 2-thread hand-off than they gain
    seed: int = 0  # seed of the synthetic inputs and of the bootstrap

    def __post_init__(self) -> None:
        unknown = sorted(set(self.engines) - set(ENGINES))
        if unknown:
            raise BenchError(f"unknown engine(s) {unknown}: expected some of {', '.join(ENGINES)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise BenchError(f"batch sizes must be integers >= 1, got {self.batch_sizes}")
        if self.threads < 1 or self.head_threads < 1:
            raise BenchError(f"threads must be >= 1, got {self.threads} (head: {self.head_threads})")


@dataclass
class Case:
    """One model to benchmark: a checkpoint (for torch) and its exported artifacts per bench engine."""

    fusion: str
    checkpoint: Path | None
    artifacts: dict[str, Path] = field(default_factory=dict)  # bench engine -> artifact dir
    unavailable: dict[str, str] = field(default_factory=dict)  # bench engine -> why it could not be built
    paper_shaped: bool = False  # the paper's dimensions: the xpaper comparison means something
    model: object = field(default=None, repr=False)  # the checkpoint's DMFModel, loaded once for every use


@dataclass
class BenchRow:
    """One timed (engine, fusion, batch size): its latency and what it is relative to."""

    engine: str
    fusion: str
    batch_size: int
    latency: LatencyStats
    speedup: dict[str, float | None] = field(default_factory=dict)  # baseline -> its p50 / this p50
    paper_ms_per_sample: float | None = None  # the paper's figure for this fusion (paper-shaped models)
    speedup_vs_paper: float | None = None
    gflops_per_s: float | None = None  # achieved model FLOP rate at p50
    peak_fraction: float | None = None  # of the measured fp32 GEMM peak (fp32 engines only)

    def to_dict(self) -> dict:
        """bench.json's row: flat, with the keys bench.json files have always had
        (speedup_vs_torch, speedup_vs_torch_bf16, ...), so older readers keep working."""
        return {"engine": self.engine, "fusion": self.fusion, "batch_size": self.batch_size, **asdict(self.latency),
                **{f"speedup_vs_{b.replace('-', '_')}": self.speedup.get(b) for b in BASELINES},
                "paper_ms_per_sample": self.paper_ms_per_sample, "speedup_vs_paper": self.speedup_vs_paper,
                "gflops_per_s": self.gflops_per_s, "peak_fraction": self.peak_fraction}


def json_default(value):
    """`json.dumps(result, default=json_default)`: rows as bench.json rows, anything else (paths) as text."""
    return value.to_dict() if isinstance(value, BenchRow) else str(value)


def synthetic_inputs(*, input_samples: int, max_tokens: int, batch: int, vocab_size: int, seed: int
                     ) -> dict[str, np.ndarray]:
    """Inputs shaped by the artifact contract: normalised audio, token ids, attention mask."""
    from dmf.contract import AUDIO_INPUT, IDS_INPUT, MASK_INPUT

    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((batch, input_samples)).astype(np.float32)
    ids = rng.integers(5, max(vocab_size, 6), (batch, max_tokens)).astype(np.int64)
    mask = np.ones((batch, max_tokens), dtype=np.int64)
    mask[:, max_tokens * 2 // 3:] = 0  # a realistic transcript leaves padding
    ids[mask == 0] = 0
    return {AUDIO_INPUT: audio, IDS_INPUT: ids, MASK_INPUT: mask}


# ------------------------------------------------------------------------------------- engines
def open_engines(case: Case, engines: tuple[str, ...], threads: int, skipped: list[dict]) -> dict:
    """bench engine -> an open engine (infer(batch)); what cannot open goes to `skipped` with why."""
    from dmf.cpuinfo import cpu_info

    opened = {}
    for name in engines:
        try:
            if name in TORCH_ENGINES:
                if TORCH_ENGINES[name] == "bf16" and not cpu_info().bf16:
                    raise BenchError("this CPU has no native bf16 (avx512_bf16 / amx_bf16): torch emulates "
                                     "it, slower than fp32, so it is not a baseline a user would pick")
                opened[name] = _torch_engine(_torch_model(case), TORCH_ENGINES[name], threads)
            else:
                opened[name] = _artifact_engine(case, name, threads)
        except BenchError as exc:
            skipped.append({"engine": name, "fusion": case.fusion, "reason": str(exc)})
    return opened


def _torch_model(case: Case):
    """The case's checkpoint as an eval model, loaded once: the torch engines, the FLOP count, the
    head export and the int8 calibration all use the same one."""
    if case.checkpoint is None:
        raise BenchError("no source checkpoint next to the artifact (torch needs the checkpoint)")
    if case.model is None:
        from dmf.model import DMFModel

        case.model = DMFModel.from_pretrained(case.checkpoint).eval()
    return case.model


def _torch_engine(model, precision: str, threads: int):
    from dmf.torch_engine import TorchEngine

    return TorchEngine(model, precision=precision, threads=threads)


def _artifact_engine(case: Case, name: str, threads: int):
    from dmf.runtime.artifact import ArtifactError, load_artifact
    from dmf.runtime.engine import EngineError
    from dmf.runtime.engines import create_engine

    if name in case.unavailable:
        raise BenchError(case.unavailable[name])
    if name not in case.artifacts:
        raise BenchError(f"no {name} artifact given")
    try:
        artifact = load_artifact(case.artifacts[name])
        return create_engine(artifact, ARTIFACT_ENGINES[name][0], threads=threads)
    except (ArtifactError, EngineError) as exc:
        raise BenchError(str(exc)) from None


# --------------------------------------------------------------------------------------- timing
def run_bench(cases: list[Case], options: BenchOptions = BenchOptions(),
              progress: Callable[[str], None] | None = None,
              on_partial: Callable[[dict], None] | None = None) -> dict:
    """Time every (engine, fusion) per batch size in interleaved rounds. Returns {"machine", "rows",
    "ratios", "skipped", "head", "flops_per_sample", "complete", ...}: see docs/performance.md, "How
    to read dmf bench". After each batch size, `on_partial` gets the result so far ("complete": False)
    and each finished row is logged through `progress`: a long run leaves what it measured."""
    say = progress or (lambda _msg: None)
    skipped: list[dict] = []
    engines = {(name, case.fusion): engine for case in cases
               for name, engine in open_engines(case, options.engines, options.threads, skipped).items()}
    shapes = {case.fusion: _input_shapes(case) for case in cases}
    # FLOPs and the GEMM peak first: every partial result then has all its columns
    flops = {case.fusion: _flops(case) for case in cases} if options.measure_peak else {}
    peak = matmul_peak_gflops(threads=options.threads) if options.measure_peak else None
    paper = any(case.paper_shaped for case in cases)
    partial = dict(machine=machine_info(options.threads), peak=peak, flops=flops, paper=paper, options=options,
                   skipped=skipped)
    rows, ratios = [], []
    for batch in options.batch_sizes:
        say(f"timing {len(engines)} engine(s) at batch {batch} in interleaved rounds")
        inputs = {f: synthetic_inputs(**shape, batch=batch, seed=options.seed) for f, shape in shapes.items()}
        calls = {key: (lambda e=engine, x=inputs[key[1]]: e.infer(x)) for key, engine in engines.items()}
        times = time_rounds(calls, options.timing) if calls else {}
        done = [BenchRow(n, f, batch, latency_stats(t, batch)) for (n, f), t in times.items()]
        rows += done
        ratios += compute_ratios(times, batch, options.seed)
        _add_relative_columns(rows, flops, peak, paper)
        for row in done:
            say(f"batch {batch}: {row.engine} {row.fusion} p50 {row.latency.p50_ms_per_sample:.1f} ms per sample")
        if on_partial is not None:
            on_partial(_result(rows, ratios, None, complete=False, **partial))
    for engine in engines.values():
        engine.close()
    head = head_latency(cases, options, say) if options.head else None
    return _result(rows, ratios, head, complete=True, **partial)


def _result(rows: list[BenchRow], ratios: list[dict], head: dict | None, *, machine: dict, peak: float | None,
            flops: dict, paper: bool, options: BenchOptions, skipped: list[dict], complete: bool) -> dict:
    """The bench result dict (bench.json); complete=False while batch sizes are still to come."""
    return {"machine": machine, "complete": complete, "matmul_peak_gflops": peak, "flops_per_sample": flops,
            "paper_ms_per_sample": PAPER_MS_PER_SAMPLE if paper else None, "rows": list(rows),
            "ratios": list(ratios), "head": head, "skipped": list(skipped),
            "options": {**asdict(options), "timing": asdict(options.timing)}}


def _input_shapes(case: Case) -> dict[str, int]:
    """{input_samples, max_tokens, vocab_size} of the case, from its checkpoint's config or an
    artifact's. Passed by keyword: positionally, a vocabulary of 99 once went in as the batch
    size, so "batch 1" timed 99 clips and the paper-size bench ran out of memory."""
    import json

    if case.checkpoint is not None:
        cfg = json.loads((case.checkpoint / "config.json").read_text())["model"]
        samples, tokens = cfg["max_audio_samples"], cfg["max_tokens"]
    else:  # the artifact's own contract gives the shapes
        from dmf.runtime.artifact import load_artifact

        art = load_artifact(next(iter(case.artifacts.values())), verify=False)
        cfg, samples, tokens = art.meta.get("model_config", {}), art.input_samples, art.max_tokens
    vocab = (cfg.get("text_encoder_config") or {}).get("vocab_size", 100)
    return {"input_samples": samples, "max_tokens": tokens, "vocab_size": int(vocab)}


def compute_ratios(times: dict[tuple[str, str], np.ndarray], batch: int, seed: int = 0) -> list[dict]:
    """Paired per-round ratios (bench/measure.py) of what matters: each engine's speedup over each
    baseline, the best non-baseline engine's speedup over each baseline, and memory fusion's
    cost over naive fusion per engine (memory / naive time; 1.03 = +3 %)."""
    out = []
    for fusion in sorted({f for _, f in times}):
        mine = {n: t for (n, f), t in times.items() if f == fusion}
        candidates = {n: t for n, t in mine.items() if n not in BASELINES}
        best = min(candidates, key=lambda n: np.median(candidates[n])) if candidates else None
        for base in BASELINES:
            if base not in mine:
                continue
            for name, t in candidates.items():
                out.append({"kind": "speedup", "engine": name, "baseline": base, "fusion": fusion,
                            "batch_size": batch, "best": name == best, **paired_ratio(mine[base], t, seed=seed)})
    for name in sorted({n for n, _ in times}):
        if (name, "memory") in times and (name, "naive") in times:
            out.append({"kind": "memory_vs_naive", "engine": name, "batch_size": batch,
                        **paired_ratio(times[(name, "memory")], times[(name, "naive")], seed=seed)})
    return out


def _flops(case: Case) -> float | None:
    if case.checkpoint is None:
        return None
    model = _torch_model(case)
    shapes = _input_shapes(case)
    engine = _torch_engine(model, "fp32", None)
    return flops_per_sample(model, engine.tensors(synthetic_inputs(**shapes, batch=1, seed=0)))


def _add_relative_columns(rows: list[BenchRow], flops: dict, peak: float | None, paper: bool) -> None:
    """Speedup over each baseline from the medians (the paired ratios are in "ratios"), over the
    paper's per-sample latency (paper-shaped models only), and the share of the GEMM peak."""
    p50 = {(r.engine, r.fusion, r.batch_size): r.latency.p50_ms_per_sample for r in rows}
    for row in rows:
        mine = row.latency.p50_ms_per_sample
        for base in BASELINES:
            ref = p50.get((base, row.fusion, row.batch_size))
            row.speedup[base] = ref / mine if ref else None
        ms = PAPER_MS_PER_SAMPLE.get(row.fusion) if paper else None
        row.paper_ms_per_sample = ms
        row.speedup_vs_paper = ms / mine if ms else None
        f = flops.get(row.fusion)
        row.gflops_per_s = f * row.latency.throughput_per_s / 1e9 if f else None
        # the peak is a CPU fp32 GEMM's: bf16 / int8 / fp16 work is not fp32 FLOPs, so no fraction for them
        fp32 = engine_precision(row.engine) == "fp32"
        row.peak_fraction = row.gflops_per_s / peak if (peak and row.gflops_per_s and fp32) else None


def machine_info(threads: int) -> dict:
    from dmf.cpuinfo import cpu_info

    cpu = cpu_info()
    return {**cpu.summary(), "cpu_line": cpu.line(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "versions": _versions()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "onnxruntime", "openvino", "tensorrt"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------- fusion head
def head_latency(cases: list[Case], options: BenchOptions, say: Callable[[str], None]) -> dict | None:
    """The exported fusion head alone (everything after the two encoders: readers over the frozen
    memory, DFT-matrix CBP, attention, BatchNorm, classifier) through the onnx engine at
    `options.head_threads`, memory and naive in interleaved rounds: ms per sample at each batch
    size, and memory's paired excess. At batch 1 the head is a few weight-bound GEMVs (~17 MB of
    weights for memory fusion): measured on the paper head, 0.62 ms at 1 thread, 1.43 ms at 2."""
    with_ck = {c.fusion: c for c in cases if c.checkpoint is not None and c.fusion in ("memory", "naive")}
    if not with_ck:
        return None
    work = Path(tempfile.mkdtemp(prefix="dmf-head-"))
    try:
        engines = {f: _head_engine(c, work, options.head_threads) for f, c in with_ck.items()}
        out = {}
        for batch in options.batch_sizes:
            say(f"timing the fusion head alone at batch {batch}")
            inputs = {f: _head_inputs(_torch_model(c).model_config.embed_dim, batch) for f, c in with_ck.items()}
            calls = {f: (lambda e=e, x=inputs[f]: e.infer(x)) for f, e in engines.items()}
            times = time_rounds(calls, TimingOptions(warmup=10, min_runs=200, min_seconds=1.0, max_runs=2000))
            out[str(batch)] = {f: latency_stats(t, batch).p50_ms_per_sample for f, t in times.items()}
            if len(times) == 2:
                out[str(batch)]["memory_minus_naive_ms"] = float(np.median(times["memory"] - times["naive"]) * 1000
                                                                 / batch)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _head_engine(case: Case, work: Path, threads: int):
    from dmf.contract import OUTPUT_DTYPE, OUTPUT_NAME
    from dmf.export.onnx_export import export_head
    from dmf.runtime.artifact import ModelFile, TensorSpec
    from dmf.runtime.engines import open_engine

    model = _torch_model(case)
    cfg = model.model_config
    path = export_head(model, work / f"head-{case.fusion}.onnx")
    dim = ("batch", cfg.embed_dim)
    inputs = tuple(TensorSpec(n, "float32", dim) for n in ("x_a", "x_t"))
    outputs = (TensorSpec(OUTPUT_NAME, OUTPUT_DTYPE, ("batch", cfg.num_labels)),)
    return open_engine("onnx", ModelFile(path, inputs, outputs), threads=threads)


def _head_inputs(embed_dim: int, batch: int) -> dict[str, np.ndarray]:
    """The two encoder embeddings (batch, d) the head takes."""
    rng = np.random.default_rng(batch)
    return {n: rng.standard_normal((batch, embed_dim), dtype=np.float32) for n in ("x_a", "x_t")}


# ------------------------------------------------------------------------ cases from a preset
def preset_cases(preset_name: str, fusions: tuple[str, ...], engines: tuple[str, ...], work_dir: Path,
                 progress: Callable[[str], None] | None = None, cache: Path | None = None) -> list[Case]:
    """Random-weight checkpoints at the preset's shapes (no download) and their exports, built
    under `work_dir`, or with `cache` under `cache/<cache_key>` and reused from there by the next
    run (the paper preset's exports took 24 minutes)."""
    say = progress or (lambda _msg: None)
    cases = []
    for fusion in fusions:
        cfg = preset_config(preset_name, fusion)
        root = cache / cache_key(preset_name, cfg) if cache else work_dir / fusion
        checkpoint = root / "checkpoint"
        if (checkpoint / "config.json").is_file():  # checkpoints are renamed in whole: present = complete
            say(f"reusing the {preset_name} {fusion} checkpoint in {root}")
        else:
            say(f"building {preset_name} {fusion} model (random weights) in {root}")
            _random_model(cfg).save_pretrained(checkpoint)
        case = Case(fusion=fusion, checkpoint=checkpoint, paper_shaped=preset_name == "paper")
        export_for_engines(case, engines, root, say, reuse=cache is not None)
        cases.append(case)
    return cases


def preset_config(preset_name: str, fusion: str):
    """The preset's config for a random-weight model; the paper preset at base shapes without a
    download (latency is measured at the paper's size, weights do not matter)."""
    from dmf.config import preset

    cfg = preset(preset_name, fusion=fusion)
    if preset_name == "paper":
        cfg = cfg.replace("model", audio_encoder=None, text_encoder=None,
                          audio_encoder_config={}, text_encoder_config={})
    return cfg


def _random_model(cfg):
    import torch

    from dmf.model import DMFModel

    torch.manual_seed(0)  # same encoder weights for every fusion, and for every run (the cache relies on it)
    return DMFModel(cfg, pretrained=False).eval()


def cache_key(preset_name: str, cfg) -> str:
    """'<preset>-<fusion>-<hash>': the hash covers the whole config, dmf's version and the versions
    of torch / onnxruntime / openvino, so a change to any of them builds afresh. Engine and
    precision are the folders inside (bench engine names, ARTIFACT_ENGINES)."""
    from dmf import __version__

    blob = json.dumps({"config": cfg.to_dict(), "dmf": __version__, "versions": _versions(), "seed": 0},
                      sort_keys=True, default=str)
    return f"{preset_name}-{cfg.model.fusion}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dmf/bench, else ~/.cache/dmf/bench."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmf" / "bench"


def export_for_engines(case: Case, engines: tuple[str, ...], out_root: Path, say: Callable[[str], None],
                       reuse: bool = False) -> None:
    """Export the case's checkpoint once per artifact engine (with `reuse`, an artifact already in
    out_root is kept); one that cannot be built here (TensorRT without a GPU) is recorded with the
    reason and reported as skipped. Static int8 calibrates on seeded synthetic clips: random
    weights have no corpus, and the speed is the same."""
    from dmf.export import ExportError, export_checkpoint

    for name in engines:
        if name not in ARTIFACT_ENGINES:
            continue
        if reuse and _artifact_present(out_root / name):
            say(f"reusing {case.fusion} -> {name} from {out_root / name}")
            case.artifacts[name] = out_root / name
            continue
        kind, precision = ARTIFACT_ENGINES[name]
        calibration = _synthetic_calibration(case) if (kind, precision) == ("openvino", "int8") else None
        say(f"exporting {case.fusion} -> {name}")
        try:
            case.artifacts[name] = export_checkpoint(case.checkpoint, out_root / name, engine=kind,
                                                     precision=precision, calibration=calibration, force=True)
        except ExportError as exc:
            case.unavailable[name] = str(exc)


def _artifact_present(path: Path) -> bool:
    """An artifact folder that reads as one (exports are renamed in whole; the engine's open
    checks every file's sha256 again)."""
    from dmf.runtime.artifact import ArtifactError, load_artifact

    try:
        load_artifact(path, verify=False)
    except (ArtifactError, OSError):
        return False
    return True


def _synthetic_calibration(case: Case, samples: int = 16) -> dict:
    from dmf.export.verify import verify_inputs

    model = _torch_model(case)
    return {"calibration": verify_inputs(model.model_config, model.tokenizer, samples, seed=7)}


def artifact_cases(paths: list[Path]) -> list[Case]:
    """Cases from existing artifact dirs; torch engines use the source checkpoint when present."""
    from dmf.runtime.artifact import load_artifact

    cases: dict[tuple[str, str], Case] = {}
    for path in paths:
        art = load_artifact(path)
        meta = art.meta
        src = Path(meta.get("source_checkpoint", {}).get("path", ""))
        case = cases.setdefault((meta["fusion"], str(src)), Case(
            fusion=meta["fusion"], checkpoint=src if src.is_dir() else None,
            paper_shaped=is_paper_shaped(meta.get("model_config", {}))))
        case.artifacts[bench_engine_name(art.engine, art.precision)] = Path(path)
    return list(cases.values())


def engine_precision(name: str) -> str:
    """The precision a bench engine runs at."""
    return TORCH_ENGINES[name] if name in TORCH_ENGINES else ARTIFACT_ENGINES[name][1]


def bench_engine_name(engine: str, precision: str) -> str:
    """The bench engine that runs an artifact of this engine and precision."""
    for name, spec in ARTIFACT_ENGINES.items():
        if spec == (engine, precision):
            return name
    return engine if precision == "fp32" else f"{engine}-{precision}"


def is_paper_shaped(model_config: dict) -> bool:
    """The paper's dimensions (768-d embeddings, 120 slots, CBP 1024, 5 s audio, 30 tokens, base-size
    12-layer encoders): only then is "x the paper's 91 ms" a statement about the paper's model."""
    from dmf.config import ModelConfig

    ref = ModelConfig()
    same = all(model_config.get(k) == getattr(ref, k) for k in
               ("embed_dim", "memory_slots", "cbp_dim", "max_audio_samples", "max_tokens"))
    encoders = [model_config.get(k) or {} for k in ("audio_encoder_config", "text_encoder_config")]
    return same and all(e.get("hidden_size", 768) == 768 and e.get("num_hidden_layers", 12) == 12 for e in encoders)


def temporary_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dmf-bench-"))


def remove_work_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
