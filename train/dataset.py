"""Utterances -> model tensors, and the leave-one-session-out splits (DESIGN §3).

Tensors come from `dmf.preprocess`, the same functions the runtime uses, so training and serving
see identical numbers. Audio depends only on the model's input contract and is cached across
folds; token ids depend on the fold's tokenizer and are encoded per fold (cheap).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dmf.config import ConfigError, ModelConfig
from dmf.data.corpus import Corpus, DataError, Utterance
from dmf.preprocess import TextEncoder, preprocess_audio


# ------------------------------------------------------------------------------------------ splits


@dataclass(frozen=True)
class FoldSplit:
    """One LOSO fold: the held-out session and the three utterance lists."""

    fold: int  # 1-based index into corpus.sessions()
    test_session: str  # the held-out session id
    train: list[Utterance]  # training sessions minus validation
    val: list[Utterance]  # stratified by label, from the training sessions only
    test: list[Utterance]  # the held-out session


def stratified_split(utterances: Sequence[Utterance], fraction: float, seed: int
                     ) -> tuple[list[Utterance], list[Utterance]]:
    """(train, val): per label, a seeded `fraction` of its utterances go to val, at least one and
    never all of a class with >= 2 utterances. Independent of the input order."""
    by_label: dict[str, list[Utterance]] = defaultdict(list)
    for utt in sorted(utterances, key=lambda u: u.id):
        by_label[utt.label].append(utt)
    rng = np.random.default_rng(seed)
    train: list[Utterance] = []
    val: list[Utterance] = []
    for label in sorted(by_label):
        items = by_label[label]
        order = rng.permutation(len(items))
        k = int(round(len(items) * fraction))
        k = min(max(k, 1), len(items) - 1) if len(items) >= 2 else 0
        val += [items[i] for i in order[:k]]
        train += [items[i] for i in order[k:]]
    return sorted(train, key=lambda u: u.id), sorted(val, key=lambda u: u.id)


def check_fold(corpus: Corpus, fold: int) -> str:
    """The session held out by `fold` (1-based over the sorted sessions), or ConfigError."""
    sessions = corpus.sessions()
    if not isinstance(fold, int) or not 1 <= fold <= len(sessions):
        raise ConfigError(f"fold {fold!r} is out of range: the corpus has {len(sessions)} sessions "
                          f"(folds 1..{len(sessions)})")
    return sessions[fold - 1]


def loso_split(corpus: Corpus, fold: int, val_fraction: float, seed: int) -> FoldSplit:
    """Fold K holds out the K-th session; validation is carved from the other sessions."""
    test_session = check_fold(corpus, fold)
    rest = [u for u in corpus.utterances if u.session != test_session]
    test = sorted((u for u in corpus.utterances if u.session == test_session), key=lambda u: u.id)
    train, val = stratified_split(rest, val_fraction, seed)
    if len(train) < 2 or not val:
        raise DataError(f"fold {fold}: too few training utterances ({len(rest)}) for a validation split")
    return FoldSplit(fold, test_session, train, val, test)


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
