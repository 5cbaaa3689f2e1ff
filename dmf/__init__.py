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
    """The pip line that adds an optional extra, for error messages. dmf is not on the index yet, so
    an install from a clone (the usual one) is told to reinstall that clone with the extra:
    pip install -e "/path/to/clone[serve]"; an installed wheel gets pip install "dmf-ser[serve]"."""
    clone = source_checkout()
    if clone is not None:
        return f'pip install -e "{clone}[{extra}]"'
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def source_checkout():
    """The clone dmf runs from (an editable install: pyproject.toml beside the package), or None."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None

from dmf.contract import LABELS  # noqa: E402,F401  (the paper's four classes, defined once)
