"""Real clips for reduced-precision exports: calibration rows from the checkpoint's training
sessions and held-out rows (with labels) from its test session, preprocessed as training does.

The held-out session is the one the checkpoint's fold left out (`metrics.json` beside it, written
by `dmf train`); without one, the corpus's last session is held out and the record says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmf.contract import AUDIO_INPUT, IDS_INPUT, MASK_INPUT

HELD_OUT_SAMPLES = 200  # at most this many held-out clips for the accuracy gate


def held_out_session(checkpoint: Path, sessions: list[str]) -> tuple[str, str]:
    """(session, how it was chosen)."""
    try:
        session = json.loads((checkpoint / "metrics.json").read_text())["test_session"]
    except (OSError, ValueError, KeyError, TypeError):
        return sessions[-1], "last session of the corpus (the checkpoint records no test session)"
    if session not in sessions:
        raise ValueError(f"{checkpoint}/metrics.json: test session {session!r} is not in the corpus "
                         f"(sessions: {', '.join(sessions)})")
    return session, "the checkpoint's held-out test session (metrics.json)"


def encode(utterances, model) -> dict[str, np.ndarray]:
    """Model inputs and label indices of `utterances`, exactly as training builds them."""
    from dmf.preprocess import TextEncoder, preprocess_audio

    cfg = model.model_config
    audio = np.stack([preprocess_audio(u.audio_path, **cfg.audio_preprocessing()) for u in utterances])  # (N, S)
    ids, mask = TextEncoder(model.tokenizer.backend_tokenizer, cfg.max_tokens).encode([u.text for u in utterances])
    index = {name: i for i, name in enumerate(cfg.labels)}
    unknown = sorted({u.label for u in utterances} - set(index))
    if unknown:
        raise ValueError(f"corpus labels {unknown} are not among the model's labels {list(cfg.labels)}")
    return {AUDIO_INPUT: audio, IDS_INPUT: ids, MASK_INPUT: mask,
            "labels": np.array([index[u.label] for u in utterances], dtype=np.int64)}


def corpus_data(path: str | Path, model, checkpoint: Path, calibration_samples: int, seed: int = 0) -> dict:
    """{"calibration": rows from the training sessions, "held_out": rows + labels of the held-out
    session, "held_out_session", "held_out_choice"}; rows are picked by a seeded permutation."""
    from dmf.data import load_corpus

    corpus = load_corpus(path)
    session, choice = held_out_session(checkpoint, corpus.sessions())
    train = sorted((u for u in corpus.utterances if u.session != session), key=lambda u: u.id)
    test = sorted((u for u in corpus.utterances if u.session == session), key=lambda u: u.id)
    if not train or not test:
        raise ValueError(f"{path}: need utterances both in and outside session {session} for calibration")
    rng = np.random.default_rng(seed)
    pick = lambda items, n: [items[i] for i in sorted(rng.permutation(len(items))[:n])]  # noqa: E731
    return {"calibration": encode(pick(train, calibration_samples), model),
            "held_out": encode(pick(test, HELD_OUT_SAMPLES), model),
            "held_out_session": session, "held_out_choice": choice}
