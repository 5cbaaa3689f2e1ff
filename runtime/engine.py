"""The engine interface every backend implements: `infer(batch: dict[str, np.ndarray]) -> (B, C)
log_probs`, and the contract check each runs when it opens.

- `OrtEngine` ("onnx", runtime/ort.py): onnxruntime over `model.onnx`; execution providers CPU,
  CUDA, TensorRT.
- `OpenVinoEngine` ("openvino", runtime/openvino.py): OpenVINO's CPU plugin over `model.onnx` or an
  OpenVINO IR (`model.xml`, e.g. dmf's static int8); bf16 where the artifact allows and the CPU has it.
- `TrtEngine` ("trt", runtime/trt.py): a native TensorRT plan; needs a CUDA GPU (libcudart through
  runtime/cudart.py).
- `dmf.torch_engine.TorchEngine` ("torch", "torch-bf16"): the training side's eager model, the
  reference for export verification and the baselines of `dmf bench`.

`runtime/engines.py` picks and opens one (`create_engine`, `open_engine`). Pre- and
post-processing live in the predictor; an engine only maps named arrays to log-probs. This module
imports no backend: each backend module imports it, never the other way round.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .artifact import ModelFile, TensorSpec


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
