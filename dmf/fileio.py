"""Atomic file and folder writes: readers never see a half-written file, checkpoint or artifact."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def stage_dir(target: Path) -> Path:
    """A fresh hidden sibling of `target` to build into (same filesystem, so the rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))


def commit_dir(staging: Path, target: Path) -> None:
    """Move a fully written folder into place; an existing target is removed only after the swap."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
