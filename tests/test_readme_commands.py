"""The README-commands check (.ci/readme_commands.py, run by CI after `make test`): which blocks it
runs, in what order, what --skip drops, and that a failing block fails the run with its line and
output. The real run (the demo from scratch, minutes) is CI's, not the suite's."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rc():
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


README = """# x
```bash
make demo   # the demo
make test
```
```console
dmf listen ARTIFACT   # needs a microphone: documentation only
```
```python
print("not a command")
```
```bash
echo second
```
"""


def test_only_bash_blocks_run_in_order(rc, tmp_path):
    (tmp_path / "README.md").write_text(README)
    blocks = rc.bash_blocks(tmp_path / "README.md")
    assert [(b.line, b.text) for b in blocks] == [(2, "make demo   # the demo\nmake test\n"), (12, "echo second\n")]
    text, dropped = rc.without_skipped(blocks[0], {"make test"})
    assert text == "make demo   # the demo\n" and dropped == ["make test"]


def test_a_failing_block_fails_the_run_with_its_line_and_output(rc, tmp_path, capsys):
    blocks = [rc.Block(3, "echo one > one.txt\n"), rc.Block(9, "cat one.txt\necho oops >&2\nfalse\necho never\n"),
              rc.Block(20, "touch never.txt\n")]
    assert rc.run_all(blocks, tmp_path, set()) == 1
    err = capsys.readouterr().err
    assert "the block at README.md:9 failed (exit 1)" in err and "one\noops" in err and "never" not in err.split("---")[1]
    assert not (tmp_path / "never.txt").exists()  # stops at the first failure


def test_a_background_server_is_stopped_with_its_block(rc, tmp_path):
    status, output, _ = rc.run_block("sleep 300 &\necho $! > pid\n", tmp_path, rc.environment())
    pid = int((tmp_path / "pid").read_text())
    assert status == 0
    for _ in range(50):  # the group got SIGTERM when the block ended
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} started by the block is still running")


def test_readme_has_bash_blocks_and_says_the_rule(rc):
    blocks = rc.bash_blocks(REPO / "README.md")
    assert blocks and "make demo" in blocks[0].text
    head = (REPO / "README.md").read_text().split("\n# ", 1)[0]
    assert "<!--" in head and "console" in head and "readme_commands.py" in head
