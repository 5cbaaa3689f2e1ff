"""Run every ```bash block of README.md, in order, in a fresh copy of the repository; fail on the
first block that fails, printing which block (README line) and its output.

    .venv/bin/python .ci/readme_commands.py [--skip "make test"] [--keep] [--list]

The copy holds the tracked files only (no runs/, no build outputs), with their timestamps, and
shares this clone's installed `.venv` (activated: `dmf` is on PATH), so `make demo` in the copy
runs the demo from scratch without reinstalling. Blocks fenced ```console are documentation only:
commands that need a microphone, a cluster, a GPU, or that change the installed packages. CI
(.ci/run) calls this after `make test` and passes `--skip "make test"`: that line of the README has
just run.

Every block runs in its own `bash -euo pipefail`, in its own process group (a server it starts in
the background is stopped with the group when the block ends), with a time limit per block.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\S*)\s*$")
BLOCK_TIMEOUT_S = 45 * 60  # the slowest block (`make demo` from scratch) took about 15 minutes here


@dataclass(frozen=True)
class Block:
    line: int  # README line of the opening fence
    text: str


def bash_blocks(readme: Path) -> list[Block]:
    """The README's ```bash blocks in order (```console and others are left alone)."""
    blocks: list[Block] = []
    lang, lines, start = None, [], 0  # lang: None outside a fence, else the fence's info string
    for number, line in enumerate(readme.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line.strip())
        if match and lang is None:
            lang, lines, start = match.group(1), [], number
        elif match:
            if lang == "bash":
                blocks.append(Block(start, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def without_skipped(block: Block, skip: set[str]) -> tuple[str, list[str]]:
    """The block minus lines whose command (comment removed) is one of `skip`; and those lines."""
    kept, dropped = [], []
    for line in block.text.splitlines():
        command = line.split(" #", 1)[0].strip()
        (dropped if command in skip else kept).append(line)
    return "\n".join(kept) + "\n", dropped


def fresh_copy(target: Path) -> None:
    """The tracked files of this clone (working-tree contents, timestamps kept: `make` then sees
    the shared install as up to date) and a `.venv` link to this clone's install."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(REPO / ".venv")


def environment() -> dict[str, str]:
    """As after `source .venv/bin/activate`."""
    env = dict(os.environ, VIRTUAL_ENV=str(REPO / ".venv"))
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONHOME", None)
    return env


def run_block(text: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    """(exit status, output, seconds). Output goes to a file, not a pipe: a server the block starts
    with & would hold a pipe open after the block ends. The block's process group is stopped after."""
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            status = proc.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            status = 124
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # what the block left running (a server started with &)
            except ProcessLookupError:
                pass
            proc.wait()
        log.seek(0)
        output = log.read() + (f"\n(stopped after {BLOCK_TIMEOUT_S} s)" if status == 124 else "")
    return status, output, time.monotonic() - start


def install_is_current(copy: Path) -> bool:
    """`make -q install` in the copy: the shared .venv's stamp is newer than pyproject.toml."""
    return subprocess.run(["make", "-q", "install"], cwd=copy, capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", action="append", default=[], help="a README command line not to run (exact)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--list", action="store_true", help="print the blocks and exit")
    args = parser.parse_args(argv)
    blocks = bash_blocks(REPO / "README.md")
    if args.list:
        for block in blocks:
            print(f"--- README.md:{block.line}\n{block.text}", end="")
        return 0
    if not (REPO / ".venv" / "bin" / "dmf").exists():
        print("readme-commands: no .venv/bin/dmf: run `make install` (or `make test`) first", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dmf-readme-"))
    copy = work / "dmf"
    copy.mkdir()
    fresh_copy(copy)
    if not install_is_current(copy):
        shutil.rmtree(work, ignore_errors=True)
        print("readme-commands: .venv is older than pyproject.toml: run `make install` first", file=sys.stderr)
        return 2
    status = run_all(blocks, copy, set(args.skip))
    if args.keep:
        print(f"readme-commands: kept {copy}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return status


def run_all(blocks: list[Block], copy: Path, skip: set[str]) -> int:
    env, total = environment(), time.monotonic()
    for i, block in enumerate(blocks, 1):
        text, dropped = without_skipped(block, skip)
        for line in dropped:
            print(f"[{i}/{len(blocks)}] README.md:{block.line}: skipped (--skip): {line.strip()}", flush=True)
        if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
            continue
        status, output, seconds = run_block(text, copy, env)
        print(f"[{i}/{len(blocks)}] README.md:{block.line}: exit {status} in {seconds:.0f} s", flush=True)
        if status != 0:
            print(f"readme-commands: the block at README.md:{block.line} failed (exit {status}):\n{block.text}"
                  f"--- its output (last 200 lines):", file=sys.stderr)
            print("\n".join(output.splitlines()[-200:]), file=sys.stderr)
            return 1
    print(f"readme-commands: {len(blocks)} bash blocks of README.md ran in {time.monotonic() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
