"""dmf: Dual Memory Fusion for multimodal speech emotion recognition.

Importing `dmf` is cheap and torch-free: the runtime (`dmf.runtime`) and the shared preprocessing
(`dmf.preprocess`) must work on edge installs without torch or transformers. The model
(`dmf.model`), encoders and fusion modules import torch and are imported on demand.
"""

__version__ = "0.1.0"

# The name on the package index: `dmf` there is an unrelated project. The import package and the
# command stay `dmf`.
DISTRIBUTION = "dmf-ser"


def install_hint(extra: str) -> str:
    """The pip line that adds an optional extra, for error messages: pip install "dmf-ser[serve]"."""
    return f'pip install "{DISTRIBUTION}[{extra}]"'

from dmf.contract import LABELS  # noqa: E402,F401  (the paper's four classes, defined once)
