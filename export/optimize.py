"""Offline ONNX Runtime optimisation, fp16 conversion and dynamic int8 quantisation.

Graph optimisation level saved offline: BASIC. Basic rewrites (constant folding, redundant-node
elimination, semantics-preserving node fusions) keep the graph in standard ONNX ops, so the saved
model.onnx still runs on every provider (CPU, CUDA, TensorRT EP) and still parses in TensorRT.
EXTENDED would bake in com.microsoft contrib ops (SkipLayerNormalization, FusedMatMul, BiasGelu)
that only ORT's CPU/CUDA providers run; the runtime gets those fusions anyway by opening the
session at ORT_ENABLE_ALL, which is cheap at load time.

`onnxruntime.transformers.optimizer` (model_type="bert") was tried on the end-to-end graph and is
not applied: on the dynamo-exported graph it fuses no Attention / EmbedLayerNormalization (0 of
each, measured with onnxruntime 1.32), only SkipLayerNormalization and BiasGelu, which are
exactly the fusions ORT's EXTENDED level already applies online, and its output is contrib-op only
(not portable to TensorRT). `bert_fusion_stats` keeps the measurement reproducible.
"""

from __future__ import annotations

from pathlib import Path

# fp16 conversion keeps these in fp32: LayerNorm overflows in fp16 (a known BERT issue), and the
# softmax/normalisation/reduction family loses too much precision. Inputs/outputs stay fp32.
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax", "LogSoftmax", "InstanceNormalization",
                  "GroupNormalization", "BatchNormalization", "ReduceMean", "Pow", "Sqrt", "Range",
                  "Clip", "IsNaN", "Where", "Div"]


def optimize_offline(src: str | Path, dst: str | Path, level: str = "basic") -> Path:
    """Run ORT's graph optimiser at `level` (basic|extended) and save the optimised graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return Path(dst)


def fusion_matmuls(path: str | Path) -> list[str]:
    """MatMul nodes that read the fusion's constants (memory blocks, CBP's DFT matrices). They stay
    fp32: CBP multiplies two products, so int8 errors there compound, and they are ~0.1 % of the
    FLOPs. (On the demo model, quantising them flipped a near-tie the encoders' int8 alone did not.)"""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and any(".fusion." in f".{name}" for name in n.input)]


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8: MatMul weights only (Conv excluded: quantised Conv is slow and harms wav2vec2),
    the fusion's own MatMuls excluded too (see fusion_matmuls)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" hint on every call
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=False, reduce_range=False, nodes_to_exclude=fusion_matmuls(src))
    finally:
        root.setLevel(level)
    return Path(dst)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and compute, fp32 inputs/outputs; FP16_KEEP_FP32 ops stay fp32 (ORT's copy of
    onnxconverter-common's float16 converter, so no extra dependency)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32,
                                         disable_shape_infer=False)
    onnx.save(converted, str(dst))
    return Path(dst)


def bert_fusion_stats(src: str | Path) -> dict[str, int]:
    """What onnxruntime.transformers.optimizer would fuse in this graph (see module doc)."""
    from onnxruntime.transformers.optimizer import optimize_model

    return dict(optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0,
                               opt_level=0).get_fused_operator_statistics())
