"""Native TensorRT plans (`model.plan`) behind the engine interface (runtime/engine.py).

Needs a CUDA GPU, the `tensorrt` module (imported inside `TrtEngine`) and the CUDA runtime library,
found and called through ctypes by runtime/cudart.py. `dmf export --engine trt` verifies each plan
it builds through this same class. Every CUDA or TensorRT failure is an `EngineError` with a
one-line message.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from dmf import install_hint
from dmf.errors import first_line

from .artifact import ModelFile
from .cudart import CudaRuntime
from .engine import EngineError, check_io


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(f"tensorrt is not installed: `{install_hint('trt')}` (needs a CUDA GPU)") from None
    except Exception as exc:  # a broken install: its libraries fail to load
        raise EngineError(f"tensorrt cannot be imported: {type(exc).__name__}: {first_line(exc)}") from None
    return trt


def _deserialize(trt, logger, plan: Path):
    """(runtime, engine) for `plan`; the runtime must outlive the engine."""
    try:
        runtime = trt.Runtime(logger)
    except Exception as exc:  # TypeError "factory function returned nullptr" without a usable GPU
        raise EngineError(f"TensorRT cannot create its runtime ({type(exc).__name__}: {first_line(exc)}): "
                          "no usable CUDA GPU, or a driver older than this TensorRT's CUDA") from None
    try:
        data = plan.read_bytes()
    except OSError as exc:
        raise EngineError(f"{plan}: cannot read the plan: {exc.strerror or exc}") from None
    try:
        engine, why = runtime.deserialize_cuda_engine(data), ""
    except Exception as exc:  # the bindings may raise instead of returning None
        engine, why = None, f" ({first_line(exc)})"
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
        raise EngineError(f"{model.model_path}: unsupported I/O data type: {first_line(exc)}") from None
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
        self.cuda = CudaRuntime()  # before TensorRT: its probe says why a GPU is unusable
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
                self.cuda.copy(ptr, host.ctypes.data, host.nbytes, CudaRuntime.H2D, self.stream)
            shape = tuple(self.context.get_tensor_shape(self.output_name))
            if any(d < 0 for d in shape):
                raise EngineError(f"TensorRT left the output shape {shape} of {self.output_name!r} unresolved")
            out = np.empty(shape, dtype=self.dtypes[self.output_name])
            out_ptr = self._bind(self.output_name, out.nbytes)
            if not self.context.execute_async_v3(self.stream):
                raise EngineError("TensorRT execution failed (see the TensorRT log above)")
            self.cuda.copy(out.ctypes.data, out_ptr, out.nbytes, CudaRuntime.D2H, self.stream)
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
