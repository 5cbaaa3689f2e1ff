"""Inference backends behind one interface: `infer(batch: dict[str, np.ndarray]) -> (B, C) log_probs`.

- `OrtEngine`: onnxruntime `InferenceSession` for `model.onnx`; execution providers CPU, CUDA,
  TensorRT, chosen from what the installed onnxruntime offers and what the caller asks for.
- `TrtEngine`: a native TensorRT plan (`model.plan`); needs a CUDA GPU, the `tensorrt` module and
  the CUDA runtime library (found through ctypes, so no pycuda/cupy/torch dependency).

Pre- and post-processing live in the predictor; an engine only maps named arrays to log-probs.
onnxruntime and tensorrt are imported lazily, inside the functions that use them.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .artifact import Artifact


class EngineError(RuntimeError):
    """An engine or execution provider cannot be created or run; the message says why."""


class Engine(Protocol):
    name: str
    providers: list[str]
    max_batch: int | None  # a limit the engine itself imposes (TensorRT profile), else None

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------- onnxruntime

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32,
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise EngineError("onnxruntime is not installed: `pip install dmf[cpu]` (or `dmf[gpu]` for "
                          "onnxruntime-gpu; never both)") from None
    return onnxruntime


def available_providers() -> list[str]:
    """The execution providers the installed onnxruntime offers."""
    return list(_import_ort().get_available_providers())


def select_providers(requested: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Provider names in priority order. None: CUDA when the installed onnxruntime has it, then CPU
    (TensorRT through ORT builds engines at start-up, so it is only used when asked for).
    Requested names may be aliases (cpu, cuda, tensorrt) or full ORT names, as a list or a
    comma-separated string; CPU is always appended as the fallback."""
    if requested is None:
        chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    else:
        if isinstance(requested, str):
            requested = [r for r in requested.split(",")]
        chosen = []
        for raw in requested:
            raw = raw.strip()
            if not raw:
                continue
            name = PROVIDER_ALIASES.get(raw.lower(), raw)
            if name not in available:
                hint = (" (install onnxruntime-gpu, `pip install dmf[gpu]`, for CUDA and TensorRT)"
                        if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "")
                raise EngineError(f"execution provider {raw!r} is not available in this onnxruntime "
                                  f"(available: {', '.join(available)}){hint}")
            if name not in chosen:
                chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OrtEngine:
    """onnxruntime session over `model.onnx`. `InferenceSession.run` is thread-safe."""

    name = "onnx"

    def __init__(self, artifact: Artifact, providers: str | Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        ort = _import_ort()
        chosen = select_providers(providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 0:
                raise EngineError(f"threads = {threads} is invalid: expected 0 (onnxruntime's default) or more")
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(artifact.model_path), sess_options=options, providers=chosen)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"{artifact.model_path}: onnxruntime cannot load the model: {first}") from None
        self.providers = list(self.session.get_providers())
        if providers is not None:
            lost = [p for p in chosen if p not in self.providers]
            if lost:
                raise EngineError(f"execution provider(s) {lost} were requested but failed to initialise "
                                  f"(running: {self.providers}); check the CUDA/TensorRT libraries")
        declared = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n in artifact.input_names if n not in declared]
        if missing:
            raise EngineError(f"{artifact.model_path}: model has no input(s) {missing} that dmf.json names "
                              f"(model inputs: {list(declared)})")
        self.input_types = {n: _ORT_TYPES.get(declared[n].type, None) for n in artifact.input_names}
        outputs = [o.name for o in self.session.get_outputs()]
        if artifact.output_name not in outputs:
            raise EngineError(f"{artifact.model_path}: model has no output {artifact.output_name!r} "
                              f"(outputs: {outputs})")
        self.output_name = artifact.output_name
        self.max_batch = None

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {}
        for name, kind in self.input_types.items():
            arr = batch[name]
            feeds[name] = np.ascontiguousarray(arr if kind is None else arr.astype(kind, copy=False))
        (out,) = self.session.run([self.output_name], feeds)
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.session = None


# --------------------------------------------------------------------------------------- factory

def create_engine(artifact: Artifact, engine: str = "auto", providers: str | Sequence[str] | None = None,
                  threads: int | None = None) -> Engine:
    """The backend for `artifact`. engine: auto (dmf.json's `engine`), onnx or trt."""
    kind = artifact.engine if engine == "auto" else engine
    if kind not in ("onnx", "trt"):
        raise EngineError(f"engine {engine!r} is invalid: expected auto, onnx or trt")
    if kind != artifact.engine:
        raise EngineError(f"{artifact.path}: the artifact holds a {artifact.engine} model "
                          f"({artifact.model_path.name}); engine {kind!r} cannot run it "
                          f"(export with `--engine {kind}`, or use engine 'auto')")
    if kind == "onnx":
        return OrtEngine(artifact, providers=providers, threads=threads)
    if providers is not None:
        raise EngineError("providers apply to the onnx engine only; a TensorRT plan runs on the GPU it was built for")
    from .trt import TrtEngine

    return TrtEngine(artifact)
