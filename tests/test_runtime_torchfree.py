"""dmf.runtime works with torch and transformers unimportable (edge installs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest_runtime import rt  # noqa: F401

from dmf import install_hint

REPO = Path(__file__).resolve().parents[1]

# torch and transformers made unimportable as in an install without them: a finder that says "no
# such module" (a None in sys.modules would also do that, but scipy, under scikit-learn, probes
# sys.modules["torch"] for its Tensor type and fails on the None).
BLOCK = """import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Absent())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_runtime_imports_and_predicts_without_torch(rt):
    proc = _run("""
        import json
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable: the block did not work")
        import dmf.runtime
        from dmf.runtime import MicroBatcher, Predictor, create_app
        import dmf.runtime.cli, dmf.runtime.server, dmf.runtime.engines, dmf.runtime.batcher
        p = Predictor.load(sys.argv[1])
        one = p.predict(sys.argv[2], "no torch here")
        with MicroBatcher(p, max_batch=4) as mb:
            two = mb.submit(sys.argv[2], "no torch here").result(60)
        create_app(p).state.batcher.close()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                       and sys.modules[m] is not None)
        print(json.dumps({"label": one.label, "same": one.label == two.label, "heavy": heavy}))
    """, str(rt.artifact), str(rt.clips["good0.wav"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same"] and out["heavy"] == []


def test_runtime_cli_predict_without_torch(rt):
    proc = _run("""
        import typer
        from dmf.runtime.cli import register
        app = typer.Typer(add_completion=False)
        register(app)
        app(args=["predict", sys.argv[1], "--audio", sys.argv[2], "--text", "hello", "--json"],
            prog_name="dmf", standalone_mode=True)
    """, str(rt.artifact), str(rt.clips["good1.wav"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "probabilities" in json.loads(proc.stdout.strip().splitlines()[-1])


def _dmf(*args: str, block: str = "") -> subprocess.CompletedProcess:
    """The `dmf` entry point (dmf.cli.main, as the console script runs it) with torch blocked."""
    return _run(block + "from dmf.cli import main\nsys.argv[0] = 'dmf'\nmain()\n", *args)


@pytest.mark.parametrize("args", [("train", "--data", "corpus", "--out", "runs/x"),
                                  ("export", "CHECKPOINT", "--out", "artifacts/x"),
                                  ("demo", "--out", "runs/x")])
def test_torch_commands_give_the_train_extra_hint(args, rt, tmp_path):
    """A runtime-only install: one line naming the command and the extra, exit 2, no traceback."""
    if "CHECKPOINT" in args and rt.checkpoint is None:
        pytest.skip("DMF_TEST_ARTIFACT given without DMF_TEST_CHECKPOINT: no checkpoint to export")
    args = tuple(str(rt.checkpoint) if a == "CHECKPOINT" else a for a in args)
    proc = subprocess.run([sys.executable, "-c", BLOCK + "from dmf.cli import main\nsys.argv[0] = 'dmf'\nmain()\n",
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: `dmf {args[0]}` needs the [train] extra")
    assert install_hint("train") in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written before the refusal


def test_evaluate_without_torch_and_its_eval_hint(rt, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"audio,text,label\n{rt.clips['good0.wav']},hello,neu\n{rt.clips['good1.wav']},hi,sad\n")
    proc = _dmf("evaluate", str(rt.artifact), "--manifest", str(manifest), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 clips: UA" in proc.stdout
    proc = _dmf("evaluate", str(rt.artifact), "--manifest", str(manifest), block="sys.modules['sklearn'] = None\n")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs the [eval] extra" in proc.stderr and install_hint("eval") in proc.stderr
