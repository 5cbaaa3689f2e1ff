"""OpenVINO's CPU plugin behind the engine interface (runtime/engine.py).

It reads dmf's `model.onnx` directly and the OpenVINO IR (`model.xml` + `model.bin`) that
`dmf export --engine openvino` writes (fp32, bf16, or static int8 calibrated with NNCF).
Inference precision follows the artifact, never lower than it was verified at: fp32 graphs run at
f32; bf16 and int8 artifacts run their float parts in bf16 where the CPU has native bf16
(AVX512_BF16 / AMX), else f32. `openvino` is imported inside the engine (the `openvino` extra).
"""

from __future__ import annotations

import queue

import numpy as np

from dmf import install_hint
from dmf.cpuinfo import cpu_info
from dmf.errors import first_line

from .artifact import ModelFile
from .engine import EngineError, check_io

# dmf.json precision -> the float precision OpenVINO may compute in (bf16 needs the CPU for it).
FLOAT_PRECISION = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "bf16"}


def inference_precision(artifact_precision: str, cpu_bf16: bool) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for an artifact of this precision on this CPU."""
    wanted = FLOAT_PRECISION.get(artifact_precision, "f32")
    return "bf16" if wanted == "bf16" and cpu_bf16 else "f32"


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise EngineError(f"openvino is not installed: `{install_hint('openvino')}`") from None
    return openvino


class OpenVinoEngine:
    """A compiled model on OpenVINO's CPU device, latency hint. Thread-safe: each call borrows an
    infer request from a pool (OpenVINO's requests are not shareable across threads)."""

    name = "openvino"
    max_batch = None

    def __init__(self, model: ModelFile, threads: int | None = None) -> None:
        ov = _import_openvino()
        self.precision = inference_precision(model.precision, cpu_info().bf16)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(model.model_path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line context
            raise EngineError(f"{model.model_path}: OpenVINO cannot load the model: {first_line(exc)}") from None
        self._check(model)
        self.output = self.compiled.output(model.output_name)
        self.input_names = model.input_names
        self.providers = [f"CPU ({self.precision})"]
        self.requests: queue.SimpleQueue = queue.SimpleQueue()

    def _check(self, model: ModelFile) -> None:
        def dims(port) -> tuple:
            return tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())

        inputs = {n: (port.get_element_type().to_dtype().name, dims(port))
                  for port in self.compiled.inputs for n in port.get_names()}
        outputs = {n: dims(port) for port in self.compiled.outputs for n in port.get_names()}
        check_io(model, inputs, outputs)

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """(B, C) float32 log-probs."""
        try:
            request = self.requests.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            feeds = {n: np.ascontiguousarray(batch[n]) for n in self.input_names}
            return np.array(request.infer(feeds)[self.output], dtype=np.float32)
        finally:
            self.requests.put(request)

    def close(self) -> None:
        self.compiled = None
        self.requests = queue.SimpleQueue()
