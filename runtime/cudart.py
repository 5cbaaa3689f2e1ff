"""The CUDA runtime library (libcudart) for TensorRT plans, through ctypes: no pycuda/cupy/torch
dependency. `load_cudart` finds a working one; `CudaRuntime` wraps the few calls a plan needs
(device buffers, a stream, copies), each status checked.

Which libcudart: every candidate (the system's, the pip wheels' `nvidia/*/lib`) is loaded and
probed (`cudaRuntimeGetVersion`, `cudaGetDeviceCount`) before use. A working one of the CUDA major
that the installed `tensorrt-cuXX` wheel was built for wins, else the first working one; a CUDA 13
runtime under a driver older than 580 fails the probe (error 35) and the next candidate is tried.
Every CUDA failure is an `EngineError` with a one-line message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

from .engine import EngineError

INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: the driver is older than the runtime's CUDA
MIN_DRIVER = {11: "450.80", 12: "525.60", 13: "580.65"}  # Linux driver each CUDA major needs (release notes)


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


class CudaRuntime:
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
