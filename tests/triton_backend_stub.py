"""A stand-in for Triton's `triton_python_backend_utils` (the Python backend's API), for tests.

Only what dmf's model.py (export/triton_model.py) calls, with the same names and call shapes as
the real module: Tensor(name, array).name() / .as_numpy(), InferenceRequest inputs,
InferenceResponse(output_tensors, error) .output_tensors() / .has_error() / .error(),
TritonError(message, code).message() / .code() with the error-code constants, and
get_input_tensor_by_name / get_output_tensor_by_name. No Triton server is installable here.
"""

from __future__ import annotations

import types

import numpy as np


def module() -> types.ModuleType:
    """The slice of Triton's `triton_python_backend_utils` that model.py touches, same names and calls."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self._name, self._array = name, np.asarray(array)

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

    class TritonError:
        UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG = 0, 1, 2, 3

        def __init__(self, message: str, code: int = 1) -> None:
            self._message, self._code = message, code

        def message(self) -> str:
            return self._message

        def code(self) -> int:
            return self._code

    class InferenceRequest:
        def __init__(self, inputs: list[Tensor]) -> None:
            self._inputs = inputs

        def inputs(self) -> list[Tensor]:
            return self._inputs

    class InferenceResponse:
        def __init__(self, output_tensors: list, error: TritonError | None = None) -> None:
            for tensor in output_tensors:
                assert isinstance(tensor, Tensor)
            self._outputs, self._error = list(output_tensors), error

        def output_tensors(self) -> list[Tensor]:
            return self._outputs

        def has_error(self) -> bool:
            return self._error is not None

        def error(self) -> TritonError | None:
            return self._error

    def by_name(tensors, name):
        return next((t for t in tensors if t.name() == name), None)

    pb.Tensor, pb.TritonError, pb.InferenceRequest, pb.InferenceResponse = (Tensor, TritonError, InferenceRequest,
                                                                            InferenceResponse)
    pb.get_input_tensor_by_name = lambda request, name: by_name(request.inputs(), name)
    pb.get_output_tensor_by_name = lambda response, name: by_name(response.output_tensors(), name)
    return pb
