"""OpenVINO artifacts: the verified fp32 ONNX graph converted to OpenVINO IR (`model.xml` +
`model.bin`), as is (fp32, or bf16 at run time) or statically quantised to int8 with NNCF.

Why static int8 through NNCF: dynamic int8 (MatMul only) leaves the wav2vec2 Conv feature encoder
(36 % of the FLOPs) in fp32 and quantises activations at run time; NNCF's post-training
quantisation calibrates activation ranges once, on clips of the training corpus, and quantises
Conv and MatMul alike, which OpenVINO runs with int8 dot products (VNNI / AMX) and the remaining
float ops in bf16 where the CPU has it. Measured in README ("CPU speed"). `openvino` and `nncf`
are imported inside the functions (export-time extras; the runtime needs only `openvino`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dmf.contract import INPUT_NAMES

CALIBRATION_SAMPLES = 32  # default clips NNCF calibrates on (about 1.5 min at the paper's size on 2 cores)


def convert(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """ONNX -> OpenVINO IR, weights kept fp32 (save_model's default would store them as fp16)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return Path(xml_path)


def quantize(onnx_path: str | Path, xml_path: str | Path, calibration: dict[str, np.ndarray],
             keep_fp32: list[str] = ()) -> Path:
    """Static int8 (NNCF post-training quantisation, transformer preset: Conv and MatMul int8,
    LayerNorm/Softmax and friends float) calibrated on `calibration` (N rows, one per clip);
    `keep_fp32`: node names left unquantised (the fusion's own MatMuls)."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    rows = [{k: calibration[k][i:i + 1] for k in INPUT_NAMES} for i in range(len(calibration[INPUT_NAMES[0]]))]
    ignored = nncf.IgnoredScope(names=list(keep_fp32), validate=False)
    level = logging.getLogger("nncf").level
    logging.getLogger("nncf").setLevel(logging.ERROR)  # NNCF logs progress bars and hints on every call
    try:
        quantized = nncf.quantize(model, nncf.Dataset(rows), subset_size=len(rows),
                                  model_type=nncf.ModelType.TRANSFORMER, ignored_scope=ignored)
    finally:
        logging.getLogger("nncf").setLevel(level)
    ov.save_model(quantized, str(xml_path), compress_to_fp16=False)
    return Path(xml_path)
