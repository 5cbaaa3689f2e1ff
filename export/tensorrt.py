"""TensorRT: build a serialized engine (model.plan) from the exported ONNX graph; run it to verify.

`tensorrt` is imported inside the functions (it needs a CUDA GPU and is an extra: `dmf[trt]`).
Precision:
- fp32: a plain build.
- fp16 on TensorRT 10: `BuilderFlag.FP16` (weak typing) with normalisation and softmax layers
  pinned to fp32 through layer precision + `OBEY_PRECISION_CONSTRAINTS` (LayerNorm overflows in
  fp16, a known BERT issue).
- fp16 on TensorRT 11+: the FP16 flag and weak typing are gone; every network is strongly typed,
  so the build parses an fp16 ONNX graph (LayerNorm/Softmax kept fp32 in the graph by
  `optimize.convert_fp16`) with the STRONGLY_TYPED creation flag (required on 10.x, implied on 11).
The batch dim gets one optimisation profile: min 1, opt max(1, max_batch // 2), max max_batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmf.export import ExportError

NEED = "TensorRT export needs a CUDA GPU and the tensorrt package"


def unavailable_reason() -> str | None:
    """None when TensorRT can build here; else why not (no package, no CUDA GPU)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install whose CUDA libraries fail to load
        return f"tensorrt is not importable ({type(exc).__name__}: {exc}); install it with pip install 'dmf[trt]'"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    except Exception as exc:
        return f"cannot query CUDA through torch ({type(exc).__name__}: {exc})"
    return None


def require_tensorrt() -> None:
    reason = unavailable_reason()
    if reason:
        raise ExportError(f"{NEED}: {reason}")


def major_version() -> int:
    import tensorrt as trt

    return int(str(trt.__version__).split(".")[0])


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, precision: str, max_batch: int,
                 input_dims: dict[str, tuple[int, ...]], workspace_bytes: int = 4 << 30) -> Path:
    """Parse `onnx_path` (an fp16 graph for fp16 on TensorRT >= 11), build, write `plan_path`.

    input_dims: per input, the dims after the batch dim."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = major_version()
    strongly_typed = precision == "fp16" and major >= 11
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {Path(onnx_path).name}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    opt = max(1, max_batch // 2)
    for name, dims in input_dims.items():
        profile.set_shape(name, (1, *dims), (opt, *dims), (max_batch, *dims))
    config.add_optimization_profile(profile)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls (on by default) would miss the 1e-4 parity
    if precision == "fp16" and not strongly_typed:  # TensorRT 10: weak typing with fp32 islands
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT engine build failed (build_serialized_network returned None)")
    Path(plan_path).write_bytes(bytes(serialized))
    return Path(plan_path)


def run_engine(plan_path: str | Path, feeds: dict[str, np.ndarray], output: str = "log_probs",
               batch: int | None = None) -> np.ndarray:
    """Run a plan on the GPU (torch CUDA tensors as buffers), in chunks of `batch`."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT could not load {plan_path}")
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    n = len(next(iter(feeds.values())))
    step = batch or n
    outs = []
    for start in range(0, n, step):
        tensors = {}
        for name, value in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(value[start:start + step])).cuda()
            if engine.get_tensor_dtype(name) == trt.int32:
                t = t.to(torch.int32)
            tensors[name] = t
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        shape = tuple(context.get_tensor_shape(output))
        result = torch.empty(shape, dtype=torch.float32, device="cuda")
        context.set_tensor_address(output, result.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        outs.append(result.cpu().numpy())
    return np.concatenate(outs)
