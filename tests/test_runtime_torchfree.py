"""dmf.runtime works with torch and transformers unimportable (edge installs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest_runtime import rt  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

BLOCK = "import sys\nsys.modules['torch'] = None\nsys.modules['transformers'] = None\n"


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
