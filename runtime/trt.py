"""Native TensorRT plans (`model.plan`) behind the engine interface (`runtime/engines.py`).

Needs a CUDA GPU, the `tensorrt` module (imported inside `TrtEngine`) and the CUDA runtime library
(libcudart), called through ctypes: no pycuda/cupy/torch dependency. `dmf export --engine trt`
verifies each plan it builds through this same class.

Which libcudart: every candidate (the system's, the pip wheels' `nvidia/*/lib`) is loaded and
probed (`cudaRuntimeGetVersion`, `cudaGetDeviceCount`) before use. A working one of the CUDA major
that the installed `tensorrt-cuXX` wheel was built for wins, else the first working one; a CUDA 13
runtime under a driver older than 580 fails the probe (error 35) and the next candidate is tried.
Every CUDA or TensorRT failure is an `EngineError` with a one-line message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import sys
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from dmf import install_hint

from .artifact import ModelFile
from .engines import EngineError, check_io

INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: the driver is older than the runtime's CUDA
MIN_DRIVER = {11: "450.80", 12: "525.60", 13: "580.65"}  # Linux driver each CUDA major needs (release notes)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ------------------------------------------------------------------------- finding libcudart

def _library_names() -> list[str]:
    """Candidate libcudart names/paths, in the order they are tried (duplicates removed)."""
    names = []
    found = ctypes.util.find_library("cudart")
    if found:
        names.append(found)
    names += ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
              "cudart64_13.dll", "cudart64_12.dll"]
    for base in sys.path:  # pip wheels: nvidia/cuda_runtime/lib (CUDA 12), nvidia/cu13/lib (CUDA 13)
        names += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)
    return list(dict.fromkeys(names))


def _open_library(name: str):
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _tensorrt_cuda_major() -> int | None:
    """The CUDA major of the installed TensorRT wheel (tensorrt-cu12, tensorrt-cu13, or their
    -libs), None when TensorRT came another way (a tarball, a container)."""
    from importlib import metadata

    for major in (13, 12, 11):
        for dist in (f"tensorrt_cu{major}_libs", f"tensorrt_cu{major}"):
            try:
                metadata.version(dist)
                return major
            except metadata.PackageNotFoundError:
                continue
    return None


def _declare(lib) -> None:
    """ctypes signatures of the calls used here (pointers must not be truncated to int)."""
    vp, sz, ip = ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)
    lib.cudaRuntimeGetVersion.argtypes = [ip]
    lib.cudaDriverGetVersion.argtypes = [ip]
    lib.cudaGetDeviceCount.argtypes = [ip]
    lib.cudaMalloc.argtypes = [ctypes.POINTER(vp), sz]
    lib.cudaFree.argtypes = [vp]
    lib.cudaMemcpyAsync.argtypes = [vp, vp, sz, ctypes.c_int, vp]
    lib.cudaStreamCreate.argtypes = [ctypes.POINTER(vp)]
    lib.cudaStreamSynchronize.argtypes = [vp]
    lib.cudaStreamDestroy.argtypes = [vp]
    lib.cudaGetErrorString.argtypes = [ctypes.c_int]
    lib.cudaGetErrorString.restype = ctypes.c_char_p


def _version(call) -> tuple[int, int]:
    value = ctypes.c_int(0)
    call(ctypes.byref(value))
    return value.value // 1000, value.value % 1000 // 10


def _probe(lib) -> tuple[int, str | None]:
    """(CUDA major of this runtime, None when it sees a device, else why not)."""
    _declare(lib)
    major, minor = _version(lib.cudaRuntimeGetVersion)
    count = ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status == INSUFFICIENT_DRIVER:
        dmaj, dmin = _version(lib.cudaDriverGetVersion)
        need = MIN_DRIVER.get(major, "a newer")
        return major, (f"CUDA {major}.{minor} runtime needs driver >= {need}; the installed driver supports "
                       f"CUDA {dmaj}.{dmin}")
    if status != 0:
        return major, f"CUDA {major}.{minor} runtime: {lib.cudaGetErrorString(status).decode(errors='replace')}"
    if count.value < 1:
        return major, f"CUDA {major}.{minor} runtime: no CUDA device"
    return major, None


def load_cudart():
    """The libcudart to use (see the module doc); EngineError naming each candidate that failed."""
    prefer = _tensorrt_cuda_major()
    fallback, failed = None, []
    for name in _library_names():
        lib = _open_library(name)
        if lib is None:
            continue
        major, reason = _probe(lib)
        if reason is not None:
            failed.append(f"{name}: {reason}")
        elif prefer is None or major == prefer:
            return lib
        elif fallback is None:
            fallback = lib
    if fallback is not None:
        return fallback
    if failed:
        raise EngineError(f"no usable CUDA runtime for TensorRT: {'; '.join(failed)}")
    raise EngineError("the CUDA runtime library (libcudart) was not found: install the CUDA runtime "
                      "(e.g. `pip install nvidia-cuda-runtime-cu12`) to run TensorRT plans")


class _CudaRuntime:
    """The few CUDA runtime calls a TensorRT plan needs. Pointers and streams are ints; every
    call's status is checked (EngineError naming the call)."""

    H2D, D2H = 1, 2  # cudaMemcpyKind

    def __init__(self, lib=None) -> None:
        self.lib = lib if lib is not None else load_cudart()
        _declare(self.lib)

    def check(self, status: int, what: str) -> None:
        if status != 0:
            msg = self.lib.cudaGetErrorString(status).decode(errors="replace")
            raise EngineError(f"CUDA {what} failed: {msg} (error {status})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(int(nbytes), 1)), "cudaMalloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def destroy_stream(self, stream: int) -> None:
        self.check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes, kind,
                                            ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


# ------------------------------------------------------------------------------------ engine

def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(f"tensorrt is not installed: `{install_hint('trt')}` (needs a CUDA GPU)") from None
    except Exception as exc:  # a broken install: its libraries fail to load
        raise EngineError(f"tensorrt cannot be imported: {type(exc).__name__}: {_first_line(exc)}") from None
    return trt


def _deserialize(trt, logger, plan: Path):
    """(runtime, engine) for `plan`; the runtime must outlive the engine."""
    try:
        runtime = trt.Runtime(logger)
    except Exception as exc:  # TypeError "factory function returned nullptr" without a usable GPU
        raise EngineError(f"TensorRT cannot create its runtime ({type(exc).__name__}: {_first_line(exc)}): "
                          "no usable CUDA GPU, or a driver older than this TensorRT's CUDA") from None
    try:
        data = plan.read_bytes()
    except OSError as exc:
        raise EngineError(f"{plan}: cannot read the plan: {exc.strerror or exc}") from None
    try:
        engine, why = runtime.deserialize_cuda_engine(data), ""
    except Exception as exc:  # the bindings may raise instead of returning None
        engine, why = None, f" ({_first_line(exc)})"
    if engine is None:
        raise EngineError(f"{plan}: TensorRT {getattr(trt, '__version__', '?')} cannot deserialize the plan{why}: "
                          "a plan runs only on the TensorRT version and GPU model it was built with (dmf.json's "
                          "`tensorrt` names them); re-export it on this machine")
    return runtime, engine


def _io_dtypes(trt, engine, model: ModelFile) -> dict[str, np.dtype]:
    """numpy dtype per I/O tensor, after checking the plan's tensors against the contract."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    try:
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
    except TypeError as exc:  # e.g. bf16 I/O, which numpy has no dtype for
        raise EngineError(f"{model.model_path}: unsupported I/O data type: {_first_line(exc)}") from None
    dims = {n: tuple(None if d < 0 else d for d in engine.get_tensor_shape(n)) for n in names}
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    check_io(model, {n: (dtypes[n].name, dims[n]) for n in inputs}, {n: dims[n] for n in names if n not in inputs})
    extra = [n for n in inputs if n not in model.input_names]
    if extra:
        raise EngineError(f"{model.model_path}: the plan needs input(s) {extra} that dmf.json does not name")
    return {n: dtypes[n] for n in [*model.input_names, model.output_name]}


def _profile_max_batch(engine, inputs: Sequence[str]) -> int | None:
    """The batch limit of the plan: its profile 0 max for a dynamic batch dim, else the fixed dim."""
    limits = []
    for name in inputs:
        shape = tuple(engine.get_tensor_shape(name))
        if shape and shape[0] == -1:
            limits.append(int(engine.get_tensor_profile_shape(name, 0)[2][0]))
        elif shape:
            limits.append(int(shape[0]))
    return min(limits) if limits else None


class TrtEngine:
    """A serialized TensorRT engine (TensorRT 10/11 named-tensor API) on its own CUDA stream.
    One execution context, guarded by a lock: calls are serialised, which the micro-batcher does
    anyway. Device buffers grow to the largest batch seen and are reused; `close()` frees them
    and the stream exactly once, after which `infer` raises EngineError."""

    name = "trt"

    def __init__(self, model: ModelFile) -> None:
        self.lock = threading.Lock()
        self.closed, self.stream, self.buffers = True, None, {}  # name -> (device ptr, capacity bytes)
        trt = _import_tensorrt()
        self.cuda = _CudaRuntime()  # before TensorRT: its probe says why a GPU is unusable
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime, self.engine = _deserialize(trt, self.logger, Path(model.model_path))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{model.model_path}: TensorRT cannot create an execution context (out of GPU memory?)")
        self.inputs, self.output_name = list(model.input_names), model.output_name
        self.dtypes = _io_dtypes(trt, self.engine, model)
        self.max_batch = _profile_max_batch(self.engine, self.inputs)
        self.providers = ["TensorRT"]
        self.stream = self.cuda.stream()
        self.closed = False

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of >= nbytes for `name`. The old one is forgotten before it is freed, so
        a failed free or malloc never leaves a freed pointer to hand out or free again."""
        ptr, cap = self.buffers.get(name, (0, 0))
        if cap >= nbytes:
            return ptr
        if name in self.buffers:
            del self.buffers[name]
            self.cuda.free(ptr)
        ptr = self.cuda.malloc(nbytes)
        self.buffers[name] = (ptr, nbytes)
        return ptr

    def _bind(self, name: str, nbytes: int) -> int:
        ptr = self._buffer(name, nbytes)
        if not self.context.set_tensor_address(name, ptr):
            raise EngineError(f"TensorRT rejected the device address of {name!r}")
        return ptr

    def _rows(self, batch: dict[str, np.ndarray]) -> int:
        missing = [n for n in self.inputs if n not in batch]
        if missing:
            raise EngineError(f"batch lacks input(s) {missing}")
        rows = {len(batch[n]) for n in self.inputs}
        if len(rows) != 1 or 0 in rows:
            raise EngineError(f"inputs have batch sizes {sorted(rows)}: expected one size >= 1")
        (n,) = rows
        if self.max_batch is not None and n > self.max_batch:
            raise EngineError(f"batch of {n} exceeds the plan's max batch {self.max_batch}")
        return n

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, ...) named inputs -> (B, C) float32 log-probs."""
        with self.lock:
            if self.closed:
                raise EngineError("the TensorRT engine is closed")
            self._rows(batch)
            hosts = {n: np.ascontiguousarray(batch[n], dtype=self.dtypes[n]) for n in self.inputs}
            for name, host in hosts.items():  # every input shape first: the output shape depends on them
                if not self.context.set_input_shape(name, tuple(host.shape)):
                    raise EngineError(f"TensorRT rejected input shape {host.shape} for {name!r} "
                                      f"(plan max batch {self.max_batch})")
            for name, host in hosts.items():
                ptr = self._bind(name, host.nbytes)
                self.cuda.copy(ptr, host.ctypes.data, host.nbytes, _CudaRuntime.H2D, self.stream)
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            if any(d < 0 for d in shape):
                raise EngineError(f"TensorRT left the output shape {shape} of {self.output_name!r} unresolved")
            out = np.empty(shape, dtype=self.dtypes[self.output_name])
            out_ptr = self._bind(self.output_name, out.nbytes)
            if not self.context.execute_async_v3(self.stream):
                raise EngineError("TensorRT execution failed (see the TensorRT log above)")
            self.cuda.copy(out.ctypes.data, out_ptr, out.nbytes, _CudaRuntime.D2H, self.stream)
            self.cuda.sync(self.stream)  # also keeps `hosts` alive until the copies are done
            return out.astype(np.float32, copy=False)

    def close(self) -> None:
        """Free every device buffer and the stream, once; a second call does nothing. A CUDA error
        is raised (EngineError) after everything else has been released."""
        with self.lock:
            self.closed = True
            self.context = self.engine = self.runtime = None  # TensorRT's own device memory first
            releases = [(self.cuda.free, ptr) for ptr, _ in self.buffers.values()]
            if self.stream is not None:
                releases.append((self.cuda.destroy_stream, self.stream))
            self.buffers.clear()
            self.stream = None
            errors = []
            for release, handle in releases:
                try:
                    release(handle)
                except EngineError as exc:
                    errors.append(str(exc))
            if errors:
                raise EngineError(f"closing the TensorRT engine: {errors[0]}")
