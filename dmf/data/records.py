"""The corpus model every reader returns: `Utterance`, `Corpus`, and `DataError` for what cannot
be read. The readers (iemocap, manifest, synth) import it; `corpus.load_corpus` picks a reader.
Kept apart from the readers' dispatcher so no reader imports the module that imports it.

Torch-free: the CLI's `data stats` and the runtime-side tools read corpora without torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dmf.contract import LABELS

IEMOCAP_LABELS = LABELS  # the contract's four classes


class DataError(ValueError):
    """A corpus that cannot be read; the one-line message names the path."""


@dataclass(frozen=True)
class Utterance:
    id: str
    audio_path: Path
    text: str
    label: str
    session: str
    speaker: str


@dataclass
class Corpus:
    utterances: list[Utterance]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.utterances)

    def sessions(self) -> list[str]:
        """Sorted unique session ids (the LOSO folds)."""
        return sorted({u.session for u in self.utterances})

    def counts(self) -> dict:
        """{total, by_label (in `labels` order), by_session (sorted), speakers (sorted ids)}."""
        by_label = Counter(u.label for u in self.utterances)
        by_session = Counter(u.session for u in self.utterances)
        return {
            "total": len(self.utterances),
            "by_label": {label: by_label.get(label, 0) for label in self.labels},
            "by_session": {s: by_session[s] for s in sorted(by_session)},
            "speakers": sorted({u.speaker for u in self.utterances}),
        }
