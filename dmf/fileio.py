"""Atomic file and folder writes: readers never see a half-written file, checkpoint or artifact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


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


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a hidden temp file beside `path` (same filesystem); it is flushed to disk
    and renamed over `path`. A reader sees the old file or the new one, never half of one; on any
    error the temp file is removed and `path` is untouched. For writers that want a path of their
    own (matplotlib's savefig); `atomic_write_bytes` / `atomic_write_text` for data in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        write(tmp)
        with open(tmp, "rb+") as fh:  # the data reaches the disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8, newlines as given (no platform translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Indented JSON and a final newline; NaN and infinity raise (they are not JSON) before anything
    is written."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
