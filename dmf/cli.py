"""The `dmf` command line. It parses options, builds configs and calls the library; only this layer
prints or exits. Each feature area registers its own commands (`register(app)`); heavy imports
(torch, onnxruntime, tensorrt) happen inside the commands, so `dmf --help` and the torch-free
commands (`predict`, `serve`, `data`, `synth`) work on a runtime-only install.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

from dmf import __version__, install_hint

app = typer.Typer(
    name="dmf",
    help="Dual Memory Fusion speech emotion recognition: synth, train, export, predict, serve, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Feature areas, in help order. Each module defines register(app). A module that is absent from an
# install registers nothing, so only commands that work are shown; one that is present but broken
# raises, rather than silently hiding its commands.
COMMAND_MODULES = (
    "dmf.data.cli",
    "dmf.train.cli",
    "dmf.export.cli",
    "dmf.runtime.cli",
    "dmf.runtime.live_cli",
    "dmf.runtime.evaluate_cli",
    "dmf.bench.cli",
)

# Modules of the `train` extra. A command that needs one (train, export, demo, bench --preset) on a
# runtime-only install ends in a one-line hint instead of a traceback; the commands import them
# late, so this is caught where the command runs, not guessed from its name.
TRAIN_EXTRA_MODULES = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "nncf")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dmf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Dual Memory Fusion for multimodal speech emotion recognition."""


def _register_all() -> None:
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(app)


_register_all()


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        from dmf.cliutil import fail

        command = next((f"`dmf {a}`" for a in sys.argv[1:] if not a.startswith("-")), "this command")
        try:
            fail(f"{command} needs the [train] extra (no module named {exc.name!r}): {install_hint('train')}")
        except typer.Exit as stop:  # outside the app, so exit as typer would have
            raise SystemExit(stop.exit_code) from None


if __name__ == "__main__":
    main()
