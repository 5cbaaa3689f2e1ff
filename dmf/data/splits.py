"""Leave-one-session-out splits: fold K holds out the K-th session; validation is carved from the
other sessions, stratified by label. Torch-free: training builds its folds from them and export
rebuilds a checkpoint's fold from them (its validation clips join the accuracy gate's clips)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dmf.config import ConfigError
from dmf.data.records import Corpus, DataError, Utterance


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
