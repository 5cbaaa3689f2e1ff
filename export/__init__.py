"""dmf.export: freeze a checkpoint, export it to ONNX (or a TensorRT plan), verify and write an artifact.

`import dmf.export` is light (no torch); the pipeline imports torch, onnx and onnxruntime when it runs.
"""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export could not be made or failed verification; the message is one line."""


ENGINES = ("onnx", "openvino", "trt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# onnx int8: dynamic (MatMul); openvino int8: static, calibrated (NNCF), Conv included; bf16: run-time precision
ENGINE_PRECISIONS = {"onnx": ("fp32", "fp16", "int8"), "openvino": ("fp32", "bf16", "int8"), "trt": ("fp32", "fp16")}

__all__ = ["ENGINES", "ENGINE_PRECISIONS", "PRECISIONS", "ExportError", "ExportOptions", "export_checkpoint"]


def __getattr__(name: str):
    if name in ("ExportOptions", "export_checkpoint"):
        from dmf.export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'dmf.export' has no attribute {name!r}")
