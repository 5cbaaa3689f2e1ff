"""A Triton Inference Server model repository entry for an exported model.

Layout: `<repo>/<name>/config.pbtxt`, `<repo>/<name>/1/model.onnx|model.plan`, and
`<repo>/<name>/labels.txt` (Triton's classification extension reads class names from it through
`label_filename`). Dims in config.pbtxt exclude the batch dim (max_batch_size > 0 implies it).
"""

from __future__ import annotations

import re
from pathlib import Path

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "trt": ("tensorrt_plan", "model.plan")}
TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "float16": "TYPE_FP16"}
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 4 up to max_batch, plus max_batch itself (at least [max_batch])."""
    sizes = [b for b in (4, 8, 16, 32, 64, 128, 256) if b < max_batch]
    return sizes[-3:] + [max_batch]


def config_pbtxt(name: str, engine: str, inputs: list[dict], outputs: list[dict], max_batch: int,
                 max_queue_delay_us: int = 2000) -> str:
    """config.pbtxt text. inputs/outputs: dmf.json entries ({"name", "dtype", "shape": ["batch", n]})."""
    platform, _ = PLATFORMS[engine]

    def tensor(entry: dict, extra: str = "") -> str:
        dims = ", ".join(str(d) for d in entry["shape"][1:])
        return (f'  {{\n    name: "{entry["name"]}"\n    data_type: {TRITON_TYPES[entry["dtype"]]}\n'
                f'    dims: [ {dims} ]{extra}\n  }}')

    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(tensor(e) for e in inputs) + "\n]",
        "output [\n" + ",\n".join(tensor(e, '\n    label_filename: "labels.txt"') for e in outputs) + "\n]",
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred_batch_sizes(max_batch))} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
    ]
    return "\n".join(lines) + "\n"


def write_model(folder: Path, *, name: str, engine: str, model_file: Path, inputs: list[dict],
                outputs: list[dict], labels: list[str], max_batch: int) -> Path:
    """Write one model entry into `folder` (a fresh folder that becomes `<repo>/<name>`)."""
    import shutil

    _, filename = PLATFORMS[engine]
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, folder / "1" / filename)
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "config.pbtxt").write_text(config_pbtxt(name, engine, inputs, outputs, max_batch))
    return folder
