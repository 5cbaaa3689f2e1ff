"""Op check: is an ONNX graph free of DFT/STFT and random ops, and parseable by TensorRT's ONNX parser?

Torch-free and GPU-free. The walk covers the main graph, every subgraph attribute (If/Loop/Scan
bodies) and every local function body, so a forbidden op cannot hide inside a function.

`TENSORRT_ONNX_OPS` is the "Supported = Y" column of onnx-tensorrt's docs/operators.md at the
TensorRT 10.1 GA release (opset 9..20). It lists RandomNormal/RandomUniform as supported, but an
export must be deterministic, so random ops are refused separately whatever TensorRT accepts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

# docs/design.md, 'CBP without an FFT': TensorRT 10's parser has no DFT,
# ORT's CUDA provider has no DFT kernel.
SPECTRAL_OPS = frozenset({"DFT", "STFT"})
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"})

# onnx-tensorrt docs/operators.md (TensorRT 10.1 GA), rows with Supported = Y. The graphs dmf exports
# use: Abs Add And BatchNormalization Cast Clip Concat Constant Conv Div Expand Gather GatherElements
# GatherND Gelu Gemm InstanceNormalization IsNaN LayerNormalization LogSoftmax MatMul Max Mul Range
# ReduceMean Relu Reshape Shape Slice Softmax Squeeze Sub Tanh Transpose Unsqueeze Where.
TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# ORT's dynamic int8 quantisation adds these; they run in onnxruntime only (int8 is never built for TRT).
ORT_INT8_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger"})

# Opset range TensorRT 10's parser accepts for the default domain.
TENSORRT_MAX_OPSET = 20


@dataclass
class OpCheckResult:
    ops: Counter = field(default_factory=Counter)  # op type (domain-qualified when not ai.onnx) -> count
    spectral: list[str] = field(default_factory=list)  # DFT/STFT found
    random: list[str] = field(default_factory=list)  # random ops found
    unsupported: list[str] = field(default_factory=list)  # not in the allow-list (or a foreign domain)

    @property
    def ok(self) -> bool:
        return not (self.spectral or self.random or self.unsupported)

    def message(self) -> str:
        parts = []
        if self.spectral:
            parts.append(f"DFT/STFT ops {', '.join(self.spectral)}")
        if self.random:
            parts.append(f"random ops {', '.join(self.random)}")
        if self.unsupported:
            parts.append(f"ops outside the TensorRT ONNX-parser allow-list {', '.join(self.unsupported)}")
        return "graph contains " + "; ".join(parts) if parts else "graph passes the op check"


def iter_nodes(graph, functions: Iterable = ()) -> Iterator:
    """Every NodeProto of a GraphProto, recursing into subgraph attributes; then function bodies."""
    from onnx import AttributeProto

    stack = [graph]
    for fn in functions:
        stack.append(fn)  # FunctionProto has .node like a graph
    while stack:
        g = stack.pop()
        for node in g.node:
            yield node
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def check_model(model, *, extra_allowed: Iterable[str] = ()) -> OpCheckResult:
    """model: onnx.ModelProto or a path. Names every DFT/STFT, random or non-allow-listed op.

    Calls of local functions (a node whose (domain, op_type) is a function in `model.functions`)
    are not ops themselves: their bodies are walked instead."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    local = {(fn.domain, fn.name) for fn in model.functions}
    allowed = TENSORRT_ONNX_OPS | frozenset(extra_allowed)
    result = OpCheckResult()
    for node in iter_nodes(model.graph, model.functions):
        if (node.domain, node.op_type) in local:
            continue
        default_domain = node.domain in ("", "ai.onnx")
        name = node.op_type if default_domain else f"{node.domain}:{node.op_type}"
        result.ops[name] += 1
        if node.op_type in SPECTRAL_OPS:
            _add(result.spectral, name)
        elif node.op_type in RANDOM_OPS:
            _add(result.random, name)
        elif not default_domain or node.op_type not in allowed:
            _add(result.unsupported, name)
    return result


def check_opset(model, max_opset: int = TENSORRT_MAX_OPSET) -> str | None:
    """A reason when the default-domain opset is above what TensorRT 10's parser accepts."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version > max_opset:
            return f"opset {entry.version} > {max_opset} (TensorRT 10 parses opset 9..{max_opset})"
    return None


def _add(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)
