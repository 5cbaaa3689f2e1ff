"""Utterances -> model tensors (the leave-one-session-out splits are in dmf.data.splits).

Tensors come from `dmf.preprocess`, the same functions the runtime uses, so training and serving
see identical numbers. Audio depends only on the model's input contract and is cached across
folds; token ids depend on the fold's tokenizer and are encoded per fold (cheap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dmf.config import ModelConfig
from dmf.data.corpus import Corpus, DataError, Utterance
from dmf.data.splits import FoldSplit, check_fold, loso_split, stratified_split  # noqa: F401  (re-exported)
from dmf.preprocess import TextEncoder, preprocess_audio


# ----------------------------------------------------------------------------------------- tensors


@dataclass
class Batchable:
    """Model inputs for N utterances; row i of every tensor is utterance ids[i]."""

    audio: torch.Tensor  # (N, max_audio_samples) float32
    input_ids: torch.Tensor  # (N, max_tokens) int64
    attention_mask: torch.Tensor  # (N, max_tokens) int64
    labels: torch.Tensor  # (N,) int64 indices into the model's labels
    ids: list[str]  # utterance ids

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(audio, input_ids, attention_mask, labels) of the rows in `index`."""
        return self.audio[index], self.input_ids[index], self.attention_mask[index], self.labels[index]


class AudioCache:
    """Preprocessed clips by (preprocessing, utterance id): one decode per clip and setting for all
    folds. The setting is the model's (`ModelConfig.audio_preprocessing`), whose normalisation comes from its encoder's
    feature extractor, so the cache needs no config of its own."""

    def __init__(self):
        self.clips: dict[tuple, np.ndarray] = {}

    def stack(self, utterances: Sequence[Utterance], cfg: ModelConfig, progress: bool = False) -> torch.Tensor:
        """(N, S) float32 model inputs of `utterances` under `cfg`'s input contract."""
        kwargs = cfg.audio_preprocessing()
        key = tuple(sorted(kwargs.items()))
        todo = [u for u in utterances if (key, u.id) not in self.clips]
        for utt in _track(todo, "preprocessing audio", progress):
            self.clips[(key, utt.id)] = preprocess_audio(utt.audio_path, **kwargs)  # (S,) float32
        return torch.from_numpy(np.stack([self.clips[(key, u.id)] for u in utterances]))  # (N, S)


def text_encoder_for(model) -> TextEncoder:
    """The runtime's text pipeline over the model's own tokenizer (same ids as the HF tokenizer)."""
    return TextEncoder(model.tokenizer.backend_tokenizer, model.model_config.max_tokens)


def label_indices(utterances: Sequence[Utterance], labels: Sequence[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({u.label for u in utterances} - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the model's labels {tuple(labels)}")
    return torch.tensor([index[u.label] for u in utterances], dtype=torch.int64)  # (N,)


def encode_utterances(utterances: Sequence[Utterance], model, audio: AudioCache | None = None,
                      progress: bool = False) -> Batchable:
    """Utterances -> tensors for `model` (its input contract, tokenizer and label order)."""
    if not utterances:
        raise DataError("no utterances to encode")
    cfg = model.model_config
    audio = audio or AudioCache()
    ids, mask = text_encoder_for(model).encode([u.text for u in utterances])  # (N, L) each
    return Batchable(audio=audio.stack(utterances, cfg, progress), input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy(mask), labels=label_indices(utterances, cfg.labels),
                     ids=[u.id for u in utterances])


def _track(items: list, description: str, enabled: bool):
    """Iterate with a rich progress bar when enabled (and there is something to show)."""
    if not enabled or not items:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, transient=True)
