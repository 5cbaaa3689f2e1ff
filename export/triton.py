"""A Triton Inference Server model repository for an exported artifact.

Usage and layout: docs/serving.md, "Serving with Triton".

For the Triton name NAME (`--triton-name`, default `dmf`) the full repository is four entries:

    REPO/NAME_preprocess/   Python backend: AUDIO (encoded file bytes) + TEXT (UTF-8), TYPE_STRING
                            -> the model's inputs, with dmf's own preprocessing (torch-free)
    REPO/NAME_model/        the artifact's model.onnx (onnxruntime_onnx) or model.plan (tensorrt_plan)
    REPO/NAME_postprocess/  Python backend: log_probs -> label (arg-max over dmf.json's labels)
    REPO/NAME/              ensemble of the three: AUDIO + TEXT -> log_probs + label

`bare=True` (`--triton-bare`) writes only REPO/NAME, the model entry, for clients that preprocess
themselves. Each entry is `config.pbtxt` plus a version folder `1/`; dims exclude the batch dim
(max_batch_size > 0 implies it). The Python entries carry everything they read in `1/`: model.py
(export/triton_model.py), the artifact's dmf.json and tokenizer.json, and `dmf/`, copies of
dmf/contract.py and dmf/preprocess.py, so the server needs no dmf install (numpy, soundfile, soxr
and tokenizers only) and runs the preprocessing code of the dmf that exported the artifact.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dmf import contract as C

PLATFORMS = {"onnx": ("onnxruntime_onnx", C.MODEL_FILES["onnx"]), "trt": ("tensorrt_plan", C.MODEL_FILES["trt"])}
TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "float16": "TYPE_FP16",
                "bytes": "TYPE_STRING"}
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# Tensor names the ensemble shows to clients (the model's own names come from dmf.json).
AUDIO_BYTES = "AUDIO"  # encoded audio file (WAV, FLAC, OGG, ...), one element per item
TEXT_BYTES = "TEXT"  # UTF-8 transcript, one element per item
LABEL_OUTPUT = "label"  # the arg-max label name, one element per item
LABELS_FILE = "labels.txt"  # label_filename of the model entry (Triton's classification extension)
QUEUE_DELAY_US = 2000  # dynamic batching: the longest a request waits for others
PYTHON_INSTANCES = 2  # Python-backend instances per entry (each runs one batch at a time)

TEMPLATE = Path(__file__).resolve().parent / "triton_model.py"  # becomes each Python entry's model.py
# dmf's torch-free modules a Python entry ships in 1/dmf/ (model.py loads them by path), per role.
# preprocess.py imports contract.py and nothing else of dmf (tests/test_triton.py checks).
SHIPPED_MODULES = {"preprocess": ("contract.py", "preprocess.py"), "postprocess": ("contract.py",)}
SHIPPED_INIT = '"""Copies of dmf modules for this Triton entry\'s model.py (written by dmf export --triton)."""\n'


# ------------------------------------------------------------------------------------ naming
def entry_names(name: str, bare: bool = False) -> dict[str, str]:
    """role -> Triton model name, in the order entries are put in place (the ensemble last)."""
    if bare:
        return {"model": name}
    return {"model": f"{name}_model", "preprocess": f"{name}_preprocess",
            "postprocess": f"{name}_postprocess", "ensemble": name}


def entry_paths(repo: str | Path, name: str, bare: bool = False) -> list[Path]:
    """The folders an export writes into `repo` (what --force replaces)."""
    return [Path(repo) / entry for entry in entry_names(name, bare).values()]


# ------------------------------------------------------------------------------------ pbtxt
class Enum(str):
    """A protobuf enum value: written bare (TYPE_FP32), never quoted."""


def to_pbtxt(config: dict) -> str:
    """A config dict -> protobuf text format. dict: message; list of dicts: repeated message (maps
    are lists of {"key", "value"}); list of scalars: repeated scalar."""
    return "".join(_field(key, value, 0) for key, value in config.items())


def _field(key: str, value, depth: int) -> str:
    pad = "  " * depth
    if isinstance(value, dict):
        body = "".join(_field(k, v, depth + 1) for k, v in value.items())
        return f"{pad}{key} {{\n{body}{pad}}}\n"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "".join(_field(key, item, depth) for item in value)
    if isinstance(value, list):
        return f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]\n"
    return f"{pad}{key}: {_scalar(value)}\n"


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return repr(value)


# ----------------------------------------------------------------------------------- configs
def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 4 up to max_batch, plus max_batch itself (at least [max_batch])."""
    sizes = [b for b in (4, 8, 16, 32, 64, 128, 256) if b < max_batch]
    return sizes[-3:] + [max_batch]


def _tensor(name: str, dtype: str, dims: list[int], **extra) -> dict:
    return {"name": name, "data_type": Enum(TRITON_TYPES[dtype]), "dims": list(dims), **extra}


def _spec(entry: dict, **extra) -> dict:
    """A dmf.json tensor ({"name", "dtype", "shape": ["batch", n]}) as a config tensor."""
    return _tensor(entry["name"], entry["dtype"], entry["shape"][1:], **extra)


def _batching(max_batch: int) -> dict:
    return {"preferred_batch_size": preferred_batch_sizes(max_batch), "max_queue_delay_microseconds": QUEUE_DELAY_US}


def model_config(name: str, engine: str, inputs: list[dict], outputs: list[dict], max_batch: int) -> dict:
    """The ONNX Runtime / TensorRT entry: the artifact's tensors; log_probs names its labels.txt."""
    return {"name": name, "platform": PLATFORMS[engine][0], "max_batch_size": max_batch,
            "input": [_spec(e) for e in inputs], "output": [_spec(e, label_filename=LABELS_FILE) for e in outputs],
            "dynamic_batching": _batching(max_batch)}


def python_config(name: str, step: str, inputs: list[dict], outputs: list[dict], max_batch: int,
                  parameters: dict[str, str]) -> dict:
    """A Python-backend entry running export/triton_model.py as `step` (preprocess | postprocess)."""
    params = [{"key": k, "value": {"string_value": v}} for k, v in {"dmf_step": step, **parameters}.items()]
    return {"name": name, "backend": "python", "max_batch_size": max_batch, "input": inputs, "output": outputs,
            "instance_group": [{"kind": Enum("KIND_CPU"), "count": PYTHON_INSTANCES}],
            "dynamic_batching": _batching(max_batch), "parameters": params}


def config_pbtxt(name: str, engine: str, inputs: list[dict], outputs: list[dict], max_batch: int) -> str:
    """config.pbtxt text of the model entry. inputs/outputs: dmf.json entries."""
    return to_pbtxt(model_config(name, engine, inputs, outputs, max_batch))


def _mapping(names) -> list[dict]:
    return [{"key": n, "value": n} for n in names]


def repository_configs(name: str, engine: str, inputs: list[dict], outputs: list[dict],
                       max_batch: int) -> dict[str, dict]:
    """role -> config dict of the full repository. Ensemble tensors keep the composing models'
    names (audio, input_ids, attention_mask, log_probs), so every map is name -> same name."""
    names = entry_names(name)
    raw = [_tensor(AUDIO_BYTES, "bytes", [1]), _tensor(TEXT_BYTES, "bytes", [1])]
    label = [_tensor(LABEL_OUTPUT, "bytes", [1])]
    model_in, model_out = [e["name"] for e in inputs], [e["name"] for e in outputs]
    steps = [
        {"model_name": names["preprocess"], "model_version": -1,
         "input_map": _mapping([AUDIO_BYTES, TEXT_BYTES]), "output_map": _mapping(model_in)},
        {"model_name": names["model"], "model_version": -1,
         "input_map": _mapping(model_in), "output_map": _mapping(model_out)},
        {"model_name": names["postprocess"], "model_version": -1,
         "input_map": _mapping(model_out[:1]), "output_map": _mapping([LABEL_OUTPUT])},
    ]
    return {
        "model": model_config(names["model"], engine, inputs, outputs, max_batch),
        "preprocess": python_config(names["preprocess"], "preprocess", raw, [_spec(e) for e in inputs], max_batch,
                                    {"audio_input": AUDIO_BYTES, "text_input": TEXT_BYTES}),
        "postprocess": python_config(names["postprocess"], "postprocess", [_spec(outputs[0])], label, max_batch,
                                     {"label_output": LABEL_OUTPUT}),
        # Ensembles take no dynamic_batching (a oneof with ensemble_scheduling): the steps batch.
        "ensemble": {"name": name, "platform": "ensemble", "max_batch_size": max_batch, "input": raw,
                     "output": [_spec(e) for e in outputs] + label, "ensemble_scheduling": {"step": steps}},
    }


# ----------------------------------------------------------------------------------- writing
# Triton loads every folder of its repository, hidden ones included: a staging or backup folder
# left inside it by a killed export would stop Triton at start (exit_on_error) and a polling
# server would try to load it. So entries are built beside the repository (its parent folder,
# same filesystem) and renamed in; a replaced entry is swapped with its new version in one atomic
# step where the OS allows (Linux renameat2 RENAME_EXCHANGE), so a polling server never sees the
# model missing.

def staging_root(repo: Path) -> Path:
    """The folder entries are staged in: the repository's parent, which must be on the same
    filesystem as the repository (the rename into it is then atomic)."""
    from dmf.export import ExportError

    repo = Path(repo).absolute()
    try:
        repo.mkdir(parents=True, exist_ok=True)
        same_fs = os.stat(repo).st_dev == os.stat(repo.parent).st_dev
    except OSError as exc:
        raise ExportError(f"cannot create the Triton repository {repo}: {exc.strerror or exc}") from None
    if not same_fs:
        raise ExportError(f"{repo} is a mount point ({repo.parent} is another filesystem): dmf builds each "
                          "Triton entry beside the repository and renames it in, which needs one filesystem; "
                          "mount the repository's parent folder instead, or write the repository elsewhere and copy it")
    return repo.parent


def _stage_entry(repo: Path, target: Path) -> Path:
    """A fresh hidden folder beside `repo` to build `target` in."""
    from dmf.export import ExportError

    root = staging_root(repo)
    try:
        return Path(tempfile.mkdtemp(dir=root, prefix=f".{Path(repo).absolute().name}.{target.name}.tmp-"))
    except OSError as exc:
        raise ExportError(f"cannot stage Triton entries in {root} (beside the repository): "
                          f"{exc.strerror or exc}") from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic rename (Linux renameat2 RENAME_EXCHANGE); False where the
    OS, libc or filesystem cannot, and nothing was changed."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc before glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def commit_entry(staging: Path, target: Path) -> None:
    """Put a fully written entry in place. An existing entry is swapped out atomically where the
    OS allows, else moved beside the repository first (a moment without the entry); the old
    version is deleted from beside the repository, never from inside it."""
    if not target.exists():
        os.replace(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old entry
    else:
        old = staging.with_name(staging.name.replace(".tmp-", ".old-", 1))
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class StagedRepository:
    """Entries written into hidden folders beside the repository (`_stage_entry`)."""

    entries: list[tuple[Path, Path]]  # (staging folder, target entry folder), in commit order

    @property
    def targets(self) -> list[Path]:
        return [target for _, target in self.entries]

    def commit(self) -> None:
        """Move each entry into place, replacing an old one; the ensemble goes last, so a server
        polling the repository never loads it before its steps."""
        while self.entries:
            staging, target = self.entries[0]
            commit_entry(staging, target)
            self.entries.pop(0)

    def discard(self) -> None:
        for staging, _ in self.entries:
            shutil.rmtree(staging, ignore_errors=True)
        self.entries.clear()


def _read_artifact(artifact_dir: Path, bare: bool):
    """The artifact, validated by the runtime's own reader (sha256 included); ExportError if unusable."""
    from dmf.export import ExportError
    from dmf.runtime.artifact import ArtifactError, load_artifact

    try:
        artifact = load_artifact(artifact_dir)
    except ArtifactError as exc:
        raise ExportError(f"cannot write a Triton repository: {exc}") from None
    if not bare and artifact.input_names != C.INPUT_NAMES:
        raise ExportError(f"{artifact_dir / C.META_FILE}: the Triton ensemble feeds inputs {list(C.INPUT_NAMES)}, "
                          f"this model takes {list(artifact.input_names)} (use the bare model entry)")
    return artifact


def _write_entry(folder: Path, role: str, config: dict, artifact) -> None:
    """One entry: config.pbtxt and version folder 1/ (empty for the ensemble)."""
    version = folder / "1"
    version.mkdir()
    if role == "model":
        shutil.copyfile(artifact.model_path, version / PLATFORMS[artifact.engine][1])
        (folder / LABELS_FILE).write_text("\n".join(artifact.labels) + "\n", encoding="utf-8")
    elif role in SHIPPED_MODULES:
        import dmf

        shutil.copyfile(TEMPLATE, version / "model.py")
        shutil.copyfile(artifact.path / C.META_FILE, version / C.META_FILE)
        (version / "dmf").mkdir()
        (version / "dmf" / "__init__.py").write_text(SHIPPED_INIT, encoding="utf-8")
        for module in SHIPPED_MODULES[role]:
            shutil.copyfile(Path(dmf.__file__).resolve().parent / module, version / "dmf" / module)
    if role == "preprocess":
        tokenizer = version / artifact.tokenizer_path.relative_to(artifact.path)
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact.tokenizer_path, tokenizer)
    (folder / "config.pbtxt").write_text(to_pbtxt(config), encoding="utf-8")


def stage_repository(artifact_dir: str | Path, repo: str | Path, *, name: str = "dmf",
                     bare: bool = False) -> StagedRepository:
    """Write the Triton entries for the artifact folder `artifact_dir` into staging folders beside
    `repo` (never inside it: Triton would load them); nothing is in place until `.commit()`.
    Raises ExportError (one line)."""
    _check_name(name)
    artifact = _read_artifact(Path(artifact_dir), bare)
    inputs, outputs = [_as_entry(s) for s in artifact.inputs], [_as_entry(s) for s in artifact.outputs]
    if bare:
        configs = {"model": model_config(name, artifact.engine, inputs, outputs, artifact.max_batch)}
    else:
        configs = repository_configs(name, artifact.engine, inputs, outputs, artifact.max_batch)
    staged = StagedRepository([])
    try:
        for role, config in configs.items():
            target = Path(repo) / config["name"]
            staged.entries.append((_stage_entry(Path(repo), target), target))
            _write_entry(staged.entries[-1][0], role, config, artifact)
    except BaseException:
        staged.discard()
        raise
    return staged


def _check_name(name: str) -> None:
    from dmf.export import ExportError

    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ExportError(f"Triton model name {name!r} must match {NAME_RE.pattern}")


def _as_entry(spec) -> dict:
    """A runtime TensorSpec as the dmf.json entry the config builders take."""
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}


def write_repository(artifact_dir: str | Path, repo: str | Path, *, name: str = "dmf", bare: bool = False,
                     force: bool = False) -> list[Path]:
    """Write the Triton entries of an exported artifact folder into `repo` (created if missing);
    returns the entry folders. Existing entries are replaced only with `force`."""
    from dmf.export import ExportError

    _check_name(name)
    for target in entry_paths(repo, name, bare):
        if target.exists() and not force:
            raise ExportError(f"output folder {target} exists (use --force to replace it)")
        if target.exists() and not target.is_dir():
            raise ExportError(f"output path {target} exists and is not a folder")
    staged = stage_repository(artifact_dir, repo, name=name, bare=bare)
    targets = staged.targets
    staged.commit()
    return targets
