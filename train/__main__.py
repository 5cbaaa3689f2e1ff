"""`python -m dmf.train --data ... --out ...`: the `dmf train` command on its own; what torchrun runs:
`torchrun --nproc-per-node N -m dmf.train --data ... --out ...` (one worker per GPU, see docs/training.md)."""

import typer

from dmf.train.cli import register

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
register(app)

if __name__ == "__main__":
    app()
