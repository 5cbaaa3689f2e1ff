"""Corpora: IEMOCAP release trees, manifests (CSV/JSONL) and a synthetic demo corpus.

Torch-free. `load_corpus(path)` picks the reader; every reader returns a `Corpus` of `Utterance`s
and raises `DataError` (one line, naming the path) for anything it cannot use.
"""

from dmf.data.corpus import load_corpus
from dmf.data.records import IEMOCAP_LABELS, Corpus, DataError, Utterance
from dmf.data.iemocap import load_iemocap
from dmf.data.manifest import ManifestError, load_manifest

__all__ = ["IEMOCAP_LABELS", "Corpus", "DataError", "ManifestError", "Utterance", "load_corpus",
           "load_iemocap", "load_manifest"]
