"""Which engine runs an artifact, and opening it: `create_engine` (from an artifact, engine
"auto" by default: `choose_engine`) and `open_engine` (one model file, engine named).

The interface and `EngineError` are in runtime/engine.py, one module per backend beside it
(runtime/ort.py, runtime/openvino.py, runtime/trt.py). OpenVINO and TensorRT are imported only when
asked for: their modules pull in CPU detection and ctypes CUDA loading.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

from .artifact import Artifact, ModelFile
from .engine import Engine, EngineError
from .ort import OrtEngine

# Engines by the artifact engine ("engine" in dmf.json) they can run.
RUNNABLE = {"onnx": ("onnx", "openvino"), "openvino": ("openvino",), "trt": ("trt",)}
ENGINE_NAMES = ("auto", "onnx", "openvino", "trt")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


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
