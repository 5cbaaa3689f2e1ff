"""Inference backends behind one interface: `infer(batch: dict[str, np.ndarray]) -> (B, C) log_probs`.

- `OrtEngine` ("onnx"): onnxruntime over `model.onnx`; execution providers CPU, CUDA, TensorRT.
- `OpenVinoEngine` ("openvino", runtime/openvino.py): OpenVINO's CPU plugin over `model.onnx` or an
  OpenVINO IR (`model.xml`, e.g. dmf's static int8); bf16 where the artifact allows and the CPU has it.
- `TrtEngine` ("trt", runtime/trt.py): a native TensorRT plan; needs a CUDA GPU.
- `dmf.torch_engine.TorchEngine` ("torch", "torch-bf16"): the training side's eager model, the
  reference for export verification and the baselines of `dmf bench`.

Pre- and post-processing live in the predictor; an engine only maps named arrays to log-probs.
Every engine checks the model's own tensors against the contract (names, dtypes, widths) when it
opens. onnxruntime, openvino and tensorrt are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Protocol, Sequence

import numpy as np

from dmf import install_hint

from .artifact import Artifact, ModelFile, TensorSpec

# Engines by the artifact engine ("engine" in dmf.json) they can run.
RUNNABLE = {"onnx": ("onnx", "openvino"), "openvino": ("openvino",), "trt": ("trt",)}
ENGINE_NAMES = ("auto", "onnx", "openvino", "trt")


class EngineError(RuntimeError):
    """An engine or execution provider cannot be created or run; the message says why."""


class Engine(Protocol):
    name: str
    providers: list[str]
    max_batch: int | None  # a limit the engine itself imposes (TensorRT profile), else None

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...


def check_io(model: ModelFile, inputs: dict[str, tuple[str | None, tuple]], outputs: dict[str, tuple]) -> None:
    """The model file's own tensors against the contract. inputs: name -> (dtype name or None when
    the engine cannot say, shape with None for dynamic dims); outputs: name -> shape."""
    where = model.model_path
    missing = [n for n in model.input_names if n not in inputs]
    if missing:
        raise EngineError(f"{where}: model has no input(s) {missing} that dmf.json names (model inputs: {list(inputs)})")
    for spec in model.inputs:
        dtype, shape = inputs[spec.name]
        if dtype is not None and dtype != spec.dtype:
            raise EngineError(f"{where}: input {spec.name!r} is {dtype} in the model but {spec.dtype} in dmf.json")
        _check_width(where, f"input {spec.name!r}", shape, spec)
    if model.output_name not in outputs:
        raise EngineError(f"{where}: model has no output {model.output_name!r} (outputs: {list(outputs)})")
    _check_width(where, f"output {model.output_name!r}", outputs[model.output_name], model.outputs[0])


def _check_width(where, what: str, shape: tuple, spec: TensorSpec) -> None:
    """Rank and the fixed (non-batch) width; dynamic dims (None) pass."""
    want = spec.shape[1:]
    got = tuple(shape)[1:]
    if len(shape) != len(spec.shape) or any(g is not None and g != w for g, w in zip(got, want)):
        raise EngineError(f"{where}: {what} has shape {list(shape)} in the model but {list(spec.shape)} in dmf.json")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


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
_ORT_DTYPES = {k: np.dtype(v).name for k, v in _ORT_TYPES.items()}


def _dims(shape) -> tuple:
    """ORT's declared shape with symbolic dims as None."""
    return tuple(d if isinstance(d, int) else None for d in shape)


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise EngineError(f"onnxruntime is not installed: `{install_hint('cpu')}` (or the `gpu` extra for "
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
                hint = (f" (install onnxruntime-gpu, `{install_hint('gpu')}`, for CUDA and TensorRT)"
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

    def __init__(self, model: ModelFile, providers: str | Sequence[str] | None = None,
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
            # onnxruntime-gpu prints a multi-line "EP Error ... Falling back" banner when a provider
            # fails; the lost-provider check below says it in one line instead
            with contextlib.redirect_stdout(io.StringIO()):
                self.session = ort.InferenceSession(str(model.model_path), sess_options=options, providers=chosen)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"{model.model_path}: onnxruntime cannot load the model: {first}") from None
        self.providers = list(self.session.get_providers())
        if providers is not None:
            lost = [p for p in chosen if p not in self.providers]
            if lost:
                raise EngineError(f"execution provider(s) {lost} were requested but failed to initialise "
                                  f"(running: {self.providers}); check the CUDA/TensorRT libraries")
        declared = {i.name: i for i in self.session.get_inputs()}
        check_io(model, {n: (_ORT_DTYPES.get(i.type), _dims(i.shape)) for n, i in declared.items()},
                 {o.name: _dims(o.shape) for o in self.session.get_outputs()})
        self.input_types = {n: _ORT_TYPES.get(declared[n].type) for n in model.input_names}
        self.output_name = model.output_name
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
    """The backend for `artifact`. engine: auto (`choose_engine`), onnx, openvino or trt."""
    if engine not in ENGINE_NAMES:
        raise EngineError(f"engine {engine!r} is invalid: expected one of {', '.join(ENGINE_NAMES)}")
    kind = choose_engine(artifact, providers) if engine == "auto" else engine
    if kind not in RUNNABLE[artifact.engine]:
        raise EngineError(f"{artifact.path}: the artifact holds a {artifact.engine} model "
                          f"({artifact.model_path.name}); engine {kind!r} cannot run it (engines for it: "
                          f"{', '.join(RUNNABLE[artifact.engine])}, or 'auto')")
    return open_engine(kind, artifact.model_file, providers=providers, threads=threads)


def open_engine(kind: str, model: ModelFile, *, providers: str | Sequence[str] | None = None,
                threads: int | None = None) -> Engine:
    """Engine `kind` (onnx, openvino, trt) over one model file."""
    if providers is not None and kind != "onnx":
        raise EngineError(f"providers apply to the onnx engine only, not {kind!r}")
    if kind == "onnx":
        return OrtEngine(model, providers=providers, threads=threads)
    if kind == "openvino":
        from .openvino import OpenVinoEngine

        return OpenVinoEngine(model, threads=threads)
    from .trt import TrtEngine

    return TrtEngine(model)


def choose_engine(artifact: Artifact, providers: str | Sequence[str] | None = None) -> str:
    """What `engine="auto"` runs: the fastest engine that the artifact, the installed packages and
    this CPU allow, without lowering the precision the artifact was verified at.

    - trt / openvino artifacts: their own engine.
    - onnx artifacts: onnxruntime when providers are asked for (CUDA, TensorRT), for int8 (dynamic
      MatMulInteger graphs, slow in OpenVINO) and fp16, and whenever it is installed: on fp32
      graphs OpenVINO at f32 only ties it (measured: docs/performance.md); OpenVINO when it is the one installed.
    """
    own = artifact.engine
    if own != "onnx":
        return own
    if providers is not None or installed("onnxruntime") or not installed("openvino"):
        return "onnx"
    return "openvino"
