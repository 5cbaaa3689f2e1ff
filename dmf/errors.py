"""Error-message helpers shared by the library: dmf's errors are one line, naming what failed."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty:
    onnxruntime, OpenVINO, TensorRT and transformers raise multi-line messages (context, stack
    dumps) that would otherwise break dmf's one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
