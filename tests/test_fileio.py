"""Atomic writes (dmf/fileio.py): one helper behind the files dmf writes whole (configs, metrics,
reports, bench and conversation outputs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dmf import fileio


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(target, half)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_data_is_on_disk_before_the_rename(tmp_path, monkeypatch):
    """fsync before os.replace: else a crash just after the rename can leave an empty file under
    the new name (ext4, xfs: the rename is journaled before the data)."""
    calls = []
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: calls.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    fileio.atomic_write_text(tmp_path / "sub" / "x.txt", "new\n")
    assert calls == ["fsync", "replace"]
    assert (tmp_path / "sub" / "x.txt").read_bytes() == b"new\n"  # parent made, no newline translation


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_a_new_file_gets_the_usual_mode_not_the_temp_files(tmp_path):
    """mkstemp creates 0600; a config or dmf.json written that way would be unreadable to the
    group that serves it."""
    mask = os.umask(0o022)
    try:
        fileio.atomic_write_bytes(tmp_path / "a.bin", b"\x00")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_whole_file_writers_go_through_it(tmp_path, monkeypatch):
    """A config and a conversation's turns are written by the helper: fsynced, with the usual mode
    (the turns writer once made its own 0600 temp file and never synced it)."""
    from types import SimpleNamespace

    from dmf.config import DMFConfig
    from dmf.runtime.outputs import write_turns

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    mask = os.umask(0o022)
    try:
        DMFConfig().save(tmp_path / "config.json")
        write_turns(SimpleNamespace(turns=[]), tmp_path / "turns.jsonl")
    finally:
        os.umask(mask)
    assert len(synced) == 2
    assert sorted((p.name, p.stat().st_mode & 0o777) for p in tmp_path.iterdir()) == [
        ("config.json", 0o644), ("turns.jsonl", 0o644)]
