"""TensorRT: build a serialized engine (model.plan) from the exported ONNX graph, and run it for
verification through the runtime's own `TrtEngine` (the code `dmf predict` and `dmf serve` run).

`tensorrt` is imported inside the functions (it needs a CUDA GPU and is an extra: `trt`).
Precision:
- fp32: a plain build, TF32 off.
- fp16 on TensorRT 10: `BuilderFlag.FP16` (weak typing) with normalisation, softmax and float
  reduction layers pinned to fp32 through layer precision + `OBEY_PRECISION_CONSTRAINTS` (LayerNorm
  overflows in fp16, a known BERT issue). Only float outputs are pinned: integer and shape tensors
  keep their type (NvInfer.h `setOutputType`), else the constrained build fails.
- fp16 on TensorRT 11+: the FP16 flag and weak typing are gone; every network is strongly typed,
  so the build parses an fp16 ONNX graph (LayerNorm/Softmax kept fp32 in the graph by
  `optimize.convert_fp16`) with the STRONGLY_TYPED creation flag (required on 10.x, implied on 11).
The batch dim gets one optimisation profile: min 1, opt = the server's default batch (8) clipped
to max_batch, max max_batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dmf import install_hint
from dmf.errors import first_line
from dmf.export import ExportError

NEED = "TensorRT export needs a CUDA GPU and the tensorrt package"
NO_GPU_HINT = "no usable CUDA GPU, or a driver older than this TensorRT's CUDA (CUDA 13 wheels need driver >= 580)"


def unavailable_reason() -> str | None:
    """None when TensorRT can build here; else why not (no package, no CUDA GPU)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install whose CUDA libraries fail to load
        return f"tensorrt is not importable ({type(exc).__name__}: {exc}); install it with {install_hint('trt')}"
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


def build_target() -> dict:
    """What a plan is bound to (plans are not portable): TensorRT version, GPU name and compute
    capability of the current CUDA device. Recorded as `tensorrt` in parity.json and dmf.json."""
    import tensorrt as trt
    import torch

    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return {"version": str(trt.__version__), "gpu": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}"}


def profile_batches(max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimisation profile: TensorRT tunes kernels for opt, so opt is
    the batch `dmf serve` forms by default on a GPU, clipped to the plan's max."""
    from dmf.runtime.server import GPU_MAX_BATCH

    return 1, min(GPU_MAX_BATCH, max_batch), max_batch


def pin_fp32(trt, network) -> int:
    """TensorRT 10 fp16 (weak typing): run normalisation, softmax and reductions in fp32. A layer is
    pinned only when every output is a float execution tensor: integer and shape outputs must keep
    their type and, under OBEY_PRECISION_CONSTRAINTS, a float constraint on them fails the build.
    Returns the number of layers pinned."""
    keep = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    floats = {trt.float32, trt.float16}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if layer.type not in keep or not all(t.dtype in floats and not t.is_shape_tensor for t in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _builder(trt, logger):
    try:
        return trt.Builder(logger)
    except Exception as exc:  # TypeError "factory function returned nullptr": no usable GPU/driver
        raise ExportError(f"TensorRT cannot create its builder ({type(exc).__name__}: "
                          f"{first_line(exc)}): {NO_GPU_HINT}") from None


def _parse(trt, builder, logger, onnx_path: Path, strongly_typed: bool):
    """(network, parser) for the ONNX file; the parser must outlive the network."""
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors[:400]}")
    return network, parser


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, precision: str, max_batch: int,
                 input_dims: dict[str, tuple[int, ...]], workspace_bytes: int = 4 << 30) -> Path:
    """Parse `onnx_path` (an fp16 graph for fp16 on TensorRT >= 11), build, write `plan_path`.

    input_dims: per input, the dims after the batch dim."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = _builder(trt, logger)
    strongly_typed = precision == "fp16" and major_version() >= 11
    network, _parser = _parse(trt, builder, logger, Path(onnx_path), strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    low, opt, high = profile_batches(max_batch)
    for name, dims in input_dims.items():
        profile.set_shape(name, (low, *dims), (opt, *dims), (high, *dims))
    config.add_optimization_profile(profile)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls (on by default) would miss the 1e-4 parity
    if precision == "fp16" and not strongly_typed:  # TensorRT 10: weak typing with fp32 islands
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pin_fp32(trt, network)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT engine build failed (build_serialized_network returned None; "
                          "see the TensorRT log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    return Path(plan_path)


def run_plan(plan: str | Path, model_config, precision: str, feeds: dict[str, np.ndarray],
             batches: Sequence[int]) -> list[np.ndarray]:
    """The plan's (N, C) log-probs on `feeds`, once per chunk size in `batches`, through the
    runtime's TrtEngine (the code `dmf predict` and `dmf serve` run, on its own CUDA stream);
    the engine is closed afterwards."""
    from dmf.export.verify import open_graph, run_chunks
    from dmf.runtime.engine import EngineError

    try:
        engine = open_graph("trt", plan, model_config, precision)
        try:
            return [run_chunks(engine, feeds, batch) for batch in batches]
        finally:
            engine.close()
    except EngineError as exc:
        raise ExportError(f"cannot run the TensorRT plan {Path(plan).name}: {exc}") from None
