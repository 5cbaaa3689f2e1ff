"""Inference backends behind one interface: `infer(batch: dict[str, np.ndarray]) -> (B, C) log_probs`.

- `OrtEngine`: onnxruntime `InferenceSession` for `model.onnx`; execution providers CPU, CUDA,
  TensorRT, chosen from what the installed onnxruntime offers and what the caller asks for.
- `TrtEngine`: a native TensorRT plan (`model.plan`); needs a CUDA GPU, the `tensorrt` module and
  the CUDA runtime library (found through ctypes, so no pycuda/cupy/torch dependency).

Pre- and post-processing live in the predictor; an engine only maps named arrays to log-probs.
onnxruntime and tensorrt are imported lazily, inside the functions that use them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading
from pathlib import Path
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


# -------------------------------------------------------------------------------------- TensorRT

class _CudaRuntime:
    """The few CUDA runtime calls a TensorRT plan needs, through ctypes (no pycuda/cupy/torch)."""

    H2D, D2H = 1, 2

    def __init__(self) -> None:
        self.lib = self._load()
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(vp), sz]
        self.lib.cudaFree.argtypes = [vp]
        self.lib.cudaMemcpyAsync.argtypes = [vp, vp, sz, ctypes.c_int, vp]
        self.lib.cudaStreamCreate.argtypes = [ctypes.POINTER(vp)]
        self.lib.cudaStreamSynchronize.argtypes = [vp]
        self.lib.cudaStreamDestroy.argtypes = [vp]
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    @staticmethod
    def _load():
        names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "cudart64_12.dll"]
        found = ctypes.util.find_library("cudart")
        if found:
            names.insert(0, found)
        for base in sys.path:  # pip wheels: nvidia-cuda-runtime-cu12 / cu13
            names += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)
        for name in names:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
        raise EngineError("the CUDA runtime library (libcudart) was not found: install the CUDA runtime "
                          "(e.g. `pip install nvidia-cuda-runtime-cu12`) to run TensorRT plans")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            msg = self.lib.cudaGetErrorString(status).decode(errors="replace")
            raise EngineError(f"CUDA {what} failed: {msg} (error {status})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(int(nbytes), 1)), "cudaMalloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes, kind,
                                            ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


class TrtEngine:
    """A serialized TensorRT engine (TensorRT 10/11 named-tensor API). One execution context,
    guarded by a lock: calls are serialised, which the micro-batcher does anyway."""

    name = "trt"

    def __init__(self, artifact: Artifact) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("tensorrt is not installed: `pip install dmf[trt]` (needs a CUDA GPU)") from None
        self.trt = trt
        self.cuda = _CudaRuntime()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(artifact.model_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{artifact.model_path}: TensorRT cannot deserialize the plan (built for another "
                              "TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        missing = [n for n in artifact.input_names if not is_input.get(n)]
        if missing or artifact.output_name not in names:
            raise EngineError(f"{artifact.model_path}: plan tensors {names} do not match dmf.json "
                              f"(inputs {list(artifact.input_names)}, output {artifact.output_name!r})")
        self.inputs = list(artifact.input_names)
        self.output_name = artifact.output_name
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        limits = []
        for n in self.inputs:
            shape = tuple(self.engine.get_tensor_shape(n))
            if shape and shape[0] == -1:
                limits.append(int(self.engine.get_tensor_profile_shape(n, 0)[2][0]))
            elif shape:
                limits.append(int(shape[0]))
        self.max_batch = min(limits) if limits else None
        self.providers = ["TensorRT"]
        self.stream = self.cuda.stream()
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, capacity bytes)
        self.lock = threading.Lock()

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self.buffers.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr = self.cuda.malloc(nbytes)
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        with self.lock:
            hosts = {}
            for name in self.inputs:
                host = np.ascontiguousarray(batch[name], dtype=self.dtypes[name])
                hosts[name] = host  # kept alive until the copies complete
                ptr = self._buffer(name, host.nbytes)
                self.cuda.copy(ptr, host.ctypes.data, host.nbytes, _CudaRuntime.H2D, self.stream)
                if not self.context.set_input_shape(name, tuple(host.shape)):
                    raise EngineError(f"TensorRT rejected input shape {host.shape} for {name!r} "
                                      f"(profile max batch {self.max_batch})")
                self.context.set_tensor_address(name, ptr)
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = np.empty(shape, dtype=self.dtypes[self.output_name])
            out_ptr = self._buffer(self.output_name, out.nbytes)
            self.context.set_tensor_address(self.output_name, out_ptr)
            if not self.context.execute_async_v3(self.stream):
                raise EngineError("TensorRT execution failed (see the TensorRT log above)")
            self.cuda.copy(out.ctypes.data, out_ptr, out.nbytes, _CudaRuntime.D2H, self.stream)
            self.cuda.sync(self.stream)
            return out.astype(np.float32, copy=False)

    def close(self) -> None:
        with self.lock:
            for ptr, _ in self.buffers.values():
                self.cuda.free(ptr)
            self.buffers.clear()
            self.context = None
            self.engine = None


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
    return TrtEngine(artifact)
