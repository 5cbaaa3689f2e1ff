"""`load_corpus`, which picks the reader for a path: an IEMOCAP release tree or a manifest (its
type from `manifest.manifest_kind`, the one table of manifest suffixes). The corpus model lives in
`dmf.data.records`; its names are re-exported here for the callers that import them from this module.

Torch-free: the CLI's `data stats` and the runtime-side tools read corpora without torch.
"""

from __future__ import annotations

from pathlib import Path

from dmf.data.iemocap import load_iemocap
from dmf.data.manifest import MANIFEST_KINDS, load_manifest, manifest_kind
from dmf.data.records import IEMOCAP_LABELS, Corpus, DataError, Utterance

__all__ = ["FORMATS", "IEMOCAP_LABELS", "Corpus", "DataError", "Utterance", "detect_format", "load_corpus"]

FORMATS = ("auto", "iemocap", "manifest")


def detect_format(path: Path) -> str:
    """'iemocap' for a folder with Session* subfolders, 'manifest' for a file with a manifest suffix."""
    if path.is_dir() and any(p.is_dir() and p.name.startswith("Session") for p in path.iterdir()):
        return "iemocap"
    if path.is_file() and manifest_kind(path) is not None:
        return "manifest"
    raise DataError(f"{path} is not a corpus: expected an IEMOCAP tree (Session1..5/) "
                    f"or a manifest ({', '.join(MANIFEST_KINDS)})")


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
        return load_iemocap(path, labels=labels)
    return load_manifest(path, labels=labels)
