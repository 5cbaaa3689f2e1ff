"""Backends with one interface, `infer(batch) -> log_probs`, for timing: torch eager from a
checkpoint, and the runtime's onnxruntime / TensorRT engines from an artifact. Inputs are the
same numpy arrays for all of them, so the comparison is the engine alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmf.bench.bench import BenchError, Case


class TorchBackend:
    """torch eager, eval mode, inference_mode: the reference every speedup is measured against."""

    def __init__(self, checkpoint: Path, threads: int | None):
        import torch

        from dmf.model import DMFModel

        if threads:
            torch.set_num_threads(threads)
        self.model = DMFModel.from_pretrained(checkpoint).eval()
        cfg = self.model.model_config
        self.model_config = {"max_audio_samples": cfg.max_audio_samples, "max_tokens": cfg.max_tokens}
        self.vocab_size = len(self.model.tokenizer)

    def tensors(self, batch: dict[str, np.ndarray]) -> tuple:
        import torch

        return tuple(torch.from_numpy(batch[k]) for k in ("audio", "input_ids", "attention_mask"))

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(*self.tensors(batch)).numpy()


class RuntimeBackend:
    """An artifact through dmf.runtime's engine (the code path `dmf serve` uses)."""

    def __init__(self, artifact_dir: Path, threads: int | None):
        from tokenizers import Tokenizer

        from dmf.runtime.artifact import ArtifactError, load_artifact
        from dmf.runtime.engines import EngineError, create_engine

        try:
            artifact = load_artifact(artifact_dir)
            self.engine = create_engine(artifact, threads=threads)
        except (ArtifactError, EngineError) as exc:
            raise BenchError(str(exc)) from None
        self.model_config = {"max_audio_samples": artifact.input_samples, "max_tokens": artifact.max_tokens}
        tok = artifact.tokenizer_path
        self.vocab_size = Tokenizer.from_file(str(tok)).get_vocab_size() if tok else 6

    def infer(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.engine.infer(batch)


def open_backend(engine: str, case: Case, threads: int | None):
    if engine == "torch":
        if case.checkpoint is None:
            raise BenchError("no source checkpoint next to the artifact (torch needs the checkpoint)")
        return TorchBackend(case.checkpoint, threads)
    if engine in case.unavailable:
        raise BenchError(case.unavailable[engine])
    if engine not in case.artifacts:
        raise BenchError(f"no {engine} artifact given")
    return RuntimeBackend(case.artifacts[engine], threads)
