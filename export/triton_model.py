"""Triton Python-backend model of a dmf model repository (written by `dmf export --triton`).

Not imported by dmf: `dmf.export.triton` copies this file as `model.py` into two entries, and the
config.pbtxt parameter `dmf_step` picks the role:

- preprocess: AUDIO (an encoded audio file) + TEXT (UTF-8), TYPE_STRING [1] each ->
  audio (S,) float32, input_ids (L,) and attention_mask (L,) int64, the numbers
  dmf.runtime's Predictor.preprocess gives for the same bytes and text;
- postprocess: log_probs (C,) -> label TYPE_STRING [1], the arg-max over dmf.json's labels.

Torch-free, and no dmf install needed: `dmf/` beside this file holds copies of dmf/contract.py and
dmf/preprocess.py made by the dmf that exported the artifact, and the settings come from the
artifact's dmf.json and tokenizer.json, copied here too. The server's Python needs numpy,
soundfile, soxr and tokenizers. Each request is answered on its own: bad input gets an error
response with the runtime's one-line message; the other requests of the batch go on.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent  # the entry's version folder, which holds every file read here


class BadRequest(ValueError):
    """A request that cannot be served as sent; its message goes back to the client."""


def _shipped(*names: str) -> list:
    """dmf.<name> for each name (in import order) from the copies in HERE/dmf, never from an
    installed dmf of another version. They are loaded by path under their own names, so their
    `from dmf.contract import ...` lines find the copies; names already imported (a process that
    has dmf, such as a test) are put back afterwards."""
    keys = ["dmf"] + [f"dmf.{name}" for name in names]
    saved = {key: sys.modules[key] for key in keys if key in sys.modules}
    package = types.ModuleType("dmf")
    package.__path__ = [str(HERE / "dmf")]
    sys.modules["dmf"] = package
    try:
        modules = []
        for name in names:
            spec = importlib.util.spec_from_file_location(f"dmf.{name}", HERE / "dmf" / f"{name}.py")
            modules.append(importlib.util.module_from_spec(spec))
            sys.modules[f"dmf.{name}"] = modules[-1]
            spec.loader.exec_module(modules[-1])
        return modules
    finally:
        sys.modules.update(saved)


def _error_response(message: str, invalid_input: bool):
    # Error codes exist from Triton 23.09 on; older servers take the message alone (INTERNAL).
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_input else "INTERNAL", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _input(request, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise BadRequest(f"{name}: missing input")
    return tensor.as_numpy()


class Preprocess:
    """AUDIO + TEXT (B, 1) -> the model's inputs (B, S) / (B, L)."""

    def __init__(self, params: dict[str, str]) -> None:
        self.C, self.P = C, P = _shipped("contract", "preprocess")
        meta = json.loads((HERE / C.META_FILE).read_text(encoding="utf-8"))
        self.audio_name, self.text_name = params["audio_input"], params["text_input"]
        self.outputs = [(spec["name"], np.dtype(spec["dtype"])) for spec in meta["inputs"]]
        self.sample_rate, self.input_samples = int(meta["sample_rate"]), int(meta["input_samples"])
        norm = meta["normalisation"]
        self.do_normalize, self.eps = bool(norm["do_normalize"]), float(norm.get("eps", P.NORM_EPS))
        self.normalize_over = norm.get("over", "all")  # artifacts from before "over" normalised over "all"
        tokenizer = HERE / meta["tokenizer_file"]
        digest = meta.get("files", {}).get(meta["tokenizer_file"])
        if digest and C.sha256_file(tokenizer) != digest:
            raise RuntimeError(f"{tokenizer}: sha256 does not match {C.META_FILE} 'files' (re-export the repository)")
        self.encoder = P.TextEncoder.from_file(tokenizer, int(meta["max_tokens"]), max_chars=C.MAX_TEXT_CHARS)

    def arrays(self, audio: object, text: object) -> dict[str, np.ndarray]:
        """One clip and transcript -> unbatched model inputs. The same steps, limits and order as
        Predictor.preprocess(audio_bytes, text): the text is checked first, then the audio."""
        C, P = self.C, self.P
        clean = P.validate_text(text, field="text", max_chars=C.MAX_TEXT_CHARS)
        ids, mask = self.encoder.encode([clean])
        if not isinstance(audio, (bytes, bytearray)):  # a str would be read as a file path
            raise P.AudioError(f"audio: expected the bytes of an audio file, got {type(audio).__name__}")
        if len(audio) == 0:
            raise P.AudioError("<bytes>: audio is empty (0 bytes)")
        x = P.preprocess_audio(bytes(audio), None, target_rate=self.sample_rate, num_samples=self.input_samples,
                               normalize=self.do_normalize, normalize_over=self.normalize_over, eps=self.eps,
                               min_seconds=C.MIN_CLIP_SECONDS, max_seconds=C.MAX_CLIP_SECONDS)
        return {C.AUDIO_INPUT: x, C.IDS_INPUT: ids[0], C.MASK_INPUT: mask[0]}

    def run(self, request) -> list:
        audio = _input(request, self.audio_name).reshape(-1)  # (B, 1) -> (B,) bytes objects
        text = _input(request, self.text_name).reshape(-1)
        if len(audio) != len(text) or len(audio) == 0:
            raise BadRequest(f"{self.audio_name} has {len(audio)} items and {self.text_name} {len(text)}: "
                             "expected one transcript per clip")
        items = []
        for i, (clip, transcript) in enumerate(zip(audio, text)):
            try:
                items.append(self.arrays(clip, transcript))
            except (self.P.AudioError, self.P.TextError) as exc:
                raise BadRequest(f"items[{i}]: {exc}" if len(audio) > 1 else str(exc)) from None
        return [pb_utils.Tensor(name, np.stack([item[name] for item in items]).astype(dtype, copy=False))
                for name, dtype in self.outputs]


class Postprocess:
    """log_probs (B, C) -> label (B, 1): dmf.json's label of each row's arg-max."""

    def __init__(self, params: dict[str, str]) -> None:
        (C,) = _shipped("contract")
        meta = json.loads((HERE / C.META_FILE).read_text(encoding="utf-8"))
        self.labels = [label.encode("utf-8") for label in meta["labels"]]
        self.input_name = meta["outputs"][0]["name"]
        self.label_name = params["label_output"]

    def run(self, request) -> list:
        rows = _input(request, self.input_name)
        if rows.ndim != 2 or rows.shape[1] != len(self.labels):
            raise BadRequest(f"{self.input_name} has shape {list(rows.shape)}: expected [batch, {len(self.labels)}]")
        for i, finite in enumerate(np.isfinite(rows).all(axis=1)):
            if not finite:  # as dmf.runtime's Predictor.postprocess: no label for NaN / Inf scores
                message = "the model's scores for this input are not finite (NaN or Inf); no label is given for it"
                raise BadRequest(f"items[{i}]: {message}" if len(rows) > 1 else message)
        labels = np.array([[self.labels[int(i)]] for i in np.argmax(rows, axis=1)], dtype=np.object_)
        return [pb_utils.Tensor(self.label_name, labels)]


STEPS = {"preprocess": Preprocess, "postprocess": Postprocess}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        step = params.get("dmf_step")
        if step not in STEPS:
            raise ValueError(f"config.pbtxt parameter dmf_step = {step!r}: expected one of {sorted(STEPS)}")
        self.step = STEPS[step](params)

    def execute(self, requests: list) -> list:
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            return pb_utils.InferenceResponse(output_tensors=self.step.run(request))
        except BadRequest as exc:
            return _error_response(str(exc), invalid_input=True)
        except Exception as exc:  # an unforeseen failure fails its own request, never the batch
            first = (str(exc).strip().splitlines() or [""])[0]
            return _error_response(f"internal error: {type(exc).__name__}: {first}", invalid_input=False)
