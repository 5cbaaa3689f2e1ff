"""onnxruntime behind the engine interface (runtime/engine.py): `OrtEngine` ("onnx") over
`model.onnx`, with execution providers CPU, CUDA and TensorRT. `onnxruntime` is imported inside the
functions that use it (extra `cpu` or `gpu`: the two wheels install the same module, never both).
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np

from dmf import install_hint
from dmf.errors import first_line

from .artifact import ModelFile
from .engine import EngineError, check_io

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
            raise EngineError(f"{model.model_path}: onnxruntime cannot load the model: {first_line(exc)}") from None
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
