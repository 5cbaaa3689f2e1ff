"""Whether the `gpu` / `trt`-marked tests can run on this machine, and why not: one place, so every
such test skips with the same reason (tests/conftest.py applies it to the markers).

A CUDA device means `nvidia-smi -L` lists one: the probe `make test-gpu` uses too. /dev/nvidia0 is
not used: WSL2 exposes GPUs through /dev/dxg (no /dev/nvidia*), and a container can carry the
device node while no driver answers. Then:
- gpu: onnxruntime-gpu's CUDAExecutionProvider is installed (the `gpu` extra).
- trt: tensorrt imports and torch sees the GPU (export builds plans from the torch model;
  `dmf.export.tensorrt.unavailable_reason`, the check `dmf export --engine trt` makes).
"""

from __future__ import annotations

import functools
import shutil
import subprocess

NVIDIA_SMI = "nvidia-smi"


def cuda_device_reason() -> str | None:
    if shutil.which(NVIDIA_SMI) is None:
        return f"no CUDA device ({NVIDIA_SMI} not found: no NVIDIA driver)"
    try:
        proc = subprocess.run([NVIDIA_SMI, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no CUDA device ({NVIDIA_SMI} -L failed: {exc})"
    if proc.returncode != 0 or not any(line.startswith("GPU ") for line in proc.stdout.splitlines()):
        return f"no CUDA device ({NVIDIA_SMI} -L lists none)"
    return None


def _ort_cuda_reason() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu: `make test-gpu`)"
    return None


def _trt_reason() -> str | None:
    from dmf.export.tensorrt import unavailable_reason

    return unavailable_reason()


@functools.lru_cache(maxsize=None)
def skip_reason(marker: str) -> str | None:
    """None when tests carrying `marker` (gpu | trt) can run here, else '<marker>: why not'."""
    checks = {"gpu": (cuda_device_reason, _ort_cuda_reason), "trt": (cuda_device_reason, _trt_reason)}[marker]
    for check in checks:
        reason = check()
        if reason:
            return f"{marker}: {reason}"
    return None
