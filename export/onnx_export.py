"""torch -> ONNX: one end-to-end graph (encoders + frozen fusion + classifier) with a dynamic batch dim.

The model is exported inside `with export_form(model):` (dmf.model): eval mode (reader =
deterministic softmax, BatchNorm on running statistics, memory buffers read-only so the exporter
folds them into constants), CBP as DFT matrices (MatMuls, no FFT/DFT op) and two-pass GroupNorm;
the model is given back in its own form afterwards. A thin wrapper gives the exporter a module whose
forward takes three positional tensors and returns exactly one tensor.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmf import contract as C
from dmf.errors import first_line
from dmf.export import ExportError

OPSET = 20  # TensorRT 10's ONNX parser accepts opset 9..20; Gelu (used by both encoders) is opset 20
# The IR version shipped graphs are stamped with: ONNX 1.15's, the newest that carries opset 20.
# torch and onnxruntime write IR 10 (ONNX 1.16), which onnxruntime before 1.18 refuses to load
# (Triton's ONNX Runtime backend before 24.06); the graph uses nothing IR 10 added.
IR_VERSION = 9
IR10_TENSOR_TYPES = {21, 22}  # UINT4, INT4: element types IR 10 added
TRACE_BATCH = 2  # trace with batch >= 2: a size-1 dim would be specialised to a static 1
INPUT_NAMES = list(C.INPUT_NAMES)
OUTPUT_NAMES = [C.OUTPUT_NAME]


class EndToEnd(nn.Module):
    """(audio, input_ids, attention_mask) -> log_probs, with the model in its export form."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(audio, input_ids, attention_mask)


class FusionHead(nn.Module):
    """(x_a, x_t) -> log_probs: everything after the two encoders (`DMFModel.head`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x_a: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return self.model.head(x_a, x_t)


@contextlib.contextmanager
def _quiet():
    """The exporter reports progress and benign notes (skipped torchvision ops, constant-folding
    attempts) on stdout/stderr and through logging; keep them for an error message instead."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "onnxscript", "onnx_ir", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = tuple({0: batch} for _ in args)
    with _quiet() as log:
        try:
            torch.onnx.export(
                module, args, str(path), dynamo=True, opset_version=OPSET, external_data=False,
                input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
                optimize=True, verbose=False, report=False)
        except Exception as exc:  # the exporter raises many types; keep the first line of its message
            raise ExportError(f"torch.onnx export failed: {type(exc).__name__}: {first_line(exc)[:300]}") from exc
    del log


def export_onnx(model, path: str | Path, example: dict[str, np.ndarray]) -> Path:
    """Export the end-to-end graph of a DMFModel to `path`. `example`: numpy inputs with batch >= 2."""
    path = Path(path)
    if len(example["audio"]) < 2:
        raise ValueError("trace with batch >= 2 (a size-1 batch is baked in as static)")
    from dmf.model import export_form

    args = tuple(torch.from_numpy(np.ascontiguousarray(example[k])) for k in INPUT_NAMES)
    with torch.no_grad(), export_form(model):
        _export(EndToEnd(model).eval(), args, path, INPUT_NAMES, OUTPUT_NAMES)
    check_io(path, {name: (C.INPUT_DTYPES[name], example[name].shape[1]) for name in C.INPUT_NAMES},
             {C.OUTPUT_NAME: (C.OUTPUT_DTYPE, model.model_config.num_labels)})
    return path


def export_head(model, path: str | Path, batch: int = TRACE_BATCH) -> Path:
    """Export `model.head(x_a, x_t)` alone (fusion + classifier; inputs x_a, x_t: (batch, d))."""
    from dmf.model import export_form

    path = Path(path)
    d = model.model_config.embed_dim
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(max(batch, 2), d, generator=gen), torch.randn(max(batch, 2), d, generator=gen))
    with torch.no_grad(), export_form(model):
        _export(FusionHead(model).eval(), args, path, ["x_a", "x_t"], OUTPUT_NAMES)
    return path


_ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 6: "int32", 9: "bool"}


def check_io(path: Path, inputs: dict[str, tuple[str, int]], outputs: dict[str, tuple[str, int]]) -> None:
    """The graph's inputs/outputs are exactly these names, dtypes and (symbolic batch, dim) shapes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for kind, values, expected in (("input", graph.input, inputs), ("output", graph.output, outputs)):
        got = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            got[v.name] = (_ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), dims)
        if list(got) != list(expected):
            raise ExportError(f"exported graph has {kind}s {list(got)}, expected {list(expected)} "
                              "(an input the model does not use is dropped by the exporter)")
        for name, (dtype, dim) in expected.items():
            gdtype, gdims = got[name]
            if gdtype != dtype or len(gdims) != 2 or not isinstance(gdims[0], str) or gdims[1] != dim:
                raise ExportError(f"exported {kind} {name} is {gdtype}{gdims}, expected {dtype}[batch, {dim}]")


def stamp_for_older_runtimes(path: str | Path) -> Path:
    """Rewrite an ONNX file's header so older onnxruntime releases load it: IR version 9 (when the
    graph uses nothing IR 10 added) and opset imports only for the domains its nodes use
    (onnxruntime's optimiser lists every domain it knows, e.g. ai.onnx.ml 5, which older releases
    do not have). The graph itself is not touched. Returns `path`."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    used = _domains(model)
    keep = [o for o in model.opset_import if (o.domain or "ai.onnx") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if model.ir_version > IR_VERSION and not _uses_ir10(model):
        model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return path


def _nodes(model):
    yield from model.graph.node
    for function in model.functions:
        yield from function.node


def _domains(model) -> set[str]:
    """Operator domains the graph's nodes use ("ai.onnx" for the default one); always ai.onnx."""
    return {"ai.onnx"} | {n.domain or "ai.onnx" for n in _nodes(model)}


def _uses_ir10(model) -> bool:
    """Whether the graph uses what IR 10 added: 4-bit element types or node overloads."""
    g = model.graph
    types = [v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)]
    types += [t.data_type for t in g.initializer]
    return bool(IR10_TENSOR_TYPES & set(types)) or any(n.overload for n in _nodes(model))
