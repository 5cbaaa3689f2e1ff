"""Real clips for reduced-precision exports, preprocessed as training does: calibration rows from
the checkpoint's training clips, and the accuracy gate's clips: every clip of its held-out session
(labels: UA) and of its validation split, none of which it was trained or calibrated on.

The held-out session is the one the checkpoint's fold left out (`metrics.json` beside it, written
by `dmf train`); without one, the corpus's last session is held out and the record says so. The
validation split is rebuilt from the checkpoint's own data settings (val_fraction, seed) with the
same function training used (dmf.data.splits), so it is the same list of clips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmf.contract import AUDIO_INPUT, IDS_INPUT, MASK_INPUT

GATE_SAMPLES = 400  # at most this many gate clips (held-out session first, then validation)


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
    """{"calibration": rows of training clips, "held_out": the gate's rows + labels (held-out session
    first, then validation), "ua_rows": (N,) True on held-out-session rows, "held_out_session",
    "held_out_choice", "gate_sources": {source: clips}}; rows are picked by a seeded permutation."""
    from dmf.data import load_corpus
    from dmf.data.splits import loso_split

    corpus = load_corpus(path)
    sessions = corpus.sessions()
    session, choice = held_out_session(checkpoint, sessions)
    data_cfg = model.config.data
    split = loso_split(corpus, sessions.index(session) + 1, data_cfg.val_fraction, data_cfg.seed)
    rng = np.random.default_rng(seed)
    pick = lambda items, n: [items[i] for i in sorted(rng.permutation(len(items))[:n])]  # noqa: E731
    test = pick(split.test, GATE_SAMPLES)
    val = pick(split.val, GATE_SAMPLES - len(test))
    gate = encode(test + val, model)
    return {"calibration": encode(pick(split.train, calibration_samples), model), "held_out": gate,
            "ua_rows": np.arange(len(test) + len(val)) < len(test), "held_out_session": session,
            "held_out_choice": choice, "gate_sources": {f"held-out session {session}": len(test),
                                                        "validation split of the training sessions": len(val)}}
