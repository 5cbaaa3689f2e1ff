"""OpenVINO artifacts: the verified fp32 ONNX graph converted to OpenVINO IR (`model.xml` +
`model.bin`), as is (fp32, or bf16 at run time) or statically quantised to mixed int8 with NNCF.

Why static int8 through NNCF: dynamic int8 (MatMul only) leaves the wav2vec2 Conv feature encoder
(36 % of the FLOPs) in fp32 and quantises activations at run time; NNCF's post-training
quantisation calibrates activation ranges once, on clips of the training corpus, and OpenVINO runs
the quantised MatMuls with int8 dot products (VNNI / AMX) and the float ops in bf16 where the CPU
has it.

Why *mixed* int8 (docs/performance.md, "OpenVINO int8 on trained models"): on trained models full
int8 flipped 9-45 of 80 held-out labels, from two places in the audio encoder, while random
weights hid both:
- SmoothQuant (NNCF's default for transformers) on wav2vec2's head, whose input is the mean-pooled
  features, scaled the audio embedding's error from <0.5 % to 10-16 %. It is switched off.
- int8 convolutions of the feature encoder on zero padding and quiet frames: those frames reach
  the LayerNorm after the conv stack as near-zero vectors, which the LayerNorm scales back up,
  int8 error included. The feature encoder's convolutions stay float (the positional convolution
  is a group convolution and stays int8).
The audio head (projector and classifier) and everything after the two encoders (reader, CBP,
composer, classifier: ~0.1 % of the FLOPs) stay float too. What stayed float is returned and
recorded in dmf.json. `openvino` and `nncf` are imported inside the functions (export-time extras).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dmf.contract import INPUT_NAMES

CALIBRATION_SAMPLES = 32  # default clips NNCF calibrates on (about 1.5 min at the paper's size on 2 cores)
AUDIO_HEAD_WEIGHT = "audio_encoder.classifier.weight"  # wav2vec2's classifier: its input is the pooled features
TEXT_HEAD_WEIGHT = "text_encoder.classifier.weight"  # BERT's classifier: the text embedding
FLOAT_GROUPS = ("feature_encoder_convolutions", "audio_head", "fusion_and_classifier")


def convert(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """ONNX -> OpenVINO IR, weights kept fp32 (save_model's default would store them as fp16)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return Path(xml_path)


def quantize(onnx_path: str | Path, xml_path: str | Path, calibration: dict[str, np.ndarray]) -> tuple[Path, dict[str, list[str]]]:
    """Mixed static int8 calibrated on `calibration` (N rows, one per clip): SmoothQuant off, the
    groups of `float_ops` left float, every other Conv / MatMul int8. Returns (xml_path, {group:
    op names left float})."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters)

    model = ov.convert_model(str(onnx_path))
    kept = float_ops(model)
    rows = [{k: calibration[k][i:i + 1] for k in INPUT_NAMES} for i in range(len(calibration[INPUT_NAMES[0]]))]
    no_smooth_quant = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
    ignored = nncf.IgnoredScope(names=sorted({n for names in kept.values() for n in names}), validate=False)
    level = logging.getLogger("nncf").level
    logging.getLogger("nncf").setLevel(logging.ERROR)  # NNCF logs progress bars and hints on every call
    try:
        quantized = nncf.quantize(model, nncf.Dataset(rows), subset_size=len(rows),
                                  model_type=nncf.ModelType.TRANSFORMER, ignored_scope=ignored,
                                  advanced_parameters=no_smooth_quant)
    finally:
        logging.getLogger("nncf").setLevel(level)
    ov.save_model(quantized, str(xml_path), compress_to_fp16=False)
    return Path(xml_path), kept


def float_ops(model) -> dict[str, list[str]]:
    """The ops of an OpenVINO model (converted from dmf's ONNX) that mixed int8 leaves float, by
    group (FLOAT_GROUPS). Found by structure, so the same code covers the tiny and paper graphs:
    the feature encoder's plain (non-group) Convolutions; the audio head, i.e. the MatMul reading
    wav2vec2's classifier weight and the MatMuls feeding it through non-MatMul ops (the projector
    before the mean pool); every MatMul after the two encoders' heads."""
    ops = model.get_ordered_ops()
    heads = {kind: _weight_matmul(ops, weight) for kind, weight in (("audio", AUDIO_HEAD_WEIGHT),
                                                                      ("text", TEXT_HEAD_WEIGHT))}
    groups = {"feature_encoder_convolutions": [op for op in ops if op.get_type_name() == "Convolution"]}
    groups["audio_head"] = [*_matmuls_above(heads["audio"]), heads["audio"]] if heads["audio"] else []
    groups["fusion_and_classifier"] = _matmuls_below([h for h in heads.values() if h is not None])
    return {name: sorted(op.get_friendly_name() for op in group) for name, group in groups.items()}


def _weight_matmul(ops, weight_suffix: str):
    """The MatMul whose second input is the Constant named ...`weight_suffix`, or None (a fusion
    without that modality)."""
    for op in ops:
        if op.get_type_name() != "MatMul":
            continue
        source = op.input(1).get_source_output().get_node()
        if source.get_type_name() == "Constant" and source.get_friendly_name().endswith(weight_suffix):
            return op
    return None


def _matmuls_above(op) -> list:
    """The nearest MatMuls upstream of `op`'s data input, through non-MatMul ops (Add, ReduceMean ...)."""
    found, stack, seen = [], [op.input(0).get_source_output().get_node()], set()
    while stack:
        node = stack.pop()
        if node.get_friendly_name() in seen or node.get_type_name() in ("Parameter", "Constant"):
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() == "MatMul":
            found.append(node)
            continue
        stack += [i.get_source_output().get_node() for i in node.inputs()]
    return found


def _matmuls_below(starts: list) -> list:
    """Every MatMul downstream of `starts` (not the starts themselves)."""
    found, stack, seen = [], [c.get_node() for op in starts for out in op.outputs() for c in out.get_target_inputs()], set()
    while stack:
        node = stack.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() == "MatMul":
            found.append(node)
        stack += [c.get_node() for out in node.outputs() for c in out.get_target_inputs()]
    return found
