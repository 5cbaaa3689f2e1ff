"""Native TensorRT plans (`model.plan`) behind the engine interface (`runtime/engines.py`).

Needs a CUDA GPU, the `tensorrt` module (imported inside `TrtEngine`) and the CUDA runtime library,
found through ctypes, so no pycuda/cupy/torch dependency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .engines import EngineError


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
