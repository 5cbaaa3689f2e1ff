"""The corpus model every reader returns, and `load_corpus`, which picks the reader.

Torch-free: the CLI's `data stats` and the runtime-side tools read corpora without torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dmf.contract import LABELS

IEMOCAP_LABELS = LABELS  # the contract's four classes
FORMATS = ("auto", "iemocap", "manifest")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")


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


def detect_format(path: Path) -> str:
    """'iemocap' for a folder with Session* subfolders, 'manifest' for .csv/.jsonl/.json files."""
    if path.is_dir() and any(p.is_dir() and p.name.startswith("Session") for p in path.iterdir()):
        return "iemocap"
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    raise DataError(f"{path} is not a corpus: expected an IEMOCAP tree (Session1..5/) "
                    "or a manifest (.csv/.jsonl)")


def load_corpus(path: str | Path, format: str = "auto", labels: tuple[str, ...] | None = None) -> Corpus:
    """Read an IEMOCAP release tree or a manifest. `labels` applies to manifests (IEMOCAP has its
    four classes; a subset of them may be given to keep only those)."""
    path = Path(path)
    if format not in FORMATS:
        raise DataError(f"unknown corpus format {format!r}: expected one of {FORMATS}")
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if format == "auto":
        format = detect_format(path)
    if format == "iemocap":
        from dmf.data.iemocap import load_iemocap  # local import: iemocap imports this module
        return load_iemocap(path, labels=labels)
    from dmf.data.manifest import load_manifest
    return load_manifest(path, labels=labels)
