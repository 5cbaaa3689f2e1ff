"""`dmf export CHECKPOINT --out DIR`: checkpoint -> verified artifact (ONNX or TensorRT plan).

Library code raises ExportError; only this layer prints and exits (one red `error:` line, code 2).
Heavy imports (torch, onnx, onnxruntime, tensorrt) happen inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dmf.cliutil import fail

STEP_LABELS = {
    "load": "loading checkpoint",
    "export": "exporting to ONNX (torch.onnx, dynamo)",
    "check": "checking ops (no DFT/random, TensorRT allow-list)",
    "optimise": "optimising (ONNX Runtime, basic, offline)",
    "verify": "verifying against torch (ONNX Runtime CPU)",
    "quantise": "quantising (dynamic int8, MatMul)",
    "fp16": "converting to fp16",
    "trt": "building TensorRT engine",
    "write": "writing artifact",
}


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        checkpoint: Path = typer.Argument(..., help="Checkpoint folder written by `dmf train`."),
        out: Path = typer.Option(..., "--out", help="Artifact folder to create."),
        engine: str = typer.Option("onnx", "--engine", help="onnx | trt (TensorRT, needs a CUDA GPU)."),
        precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 (int8: onnx only)."),
        max_batch: int = typer.Option(32, "--max-batch", help="Largest batch (TensorRT profile, Triton)."),
        triton: Path = typer.Option(
            None, "--triton", help="Also write a Triton model repository here: ensemble NAME (raw audio + text in, "
            "log_probs + label out) over NAME_preprocess, NAME_model, NAME_postprocess."),
        triton_name: str = typer.Option("dmf", "--triton-name", help="Triton name NAME (the ensemble's)."),
        triton_bare: bool = typer.Option(
            False, "--triton-bare", help="Write only the model entry NAME (clients send preprocessed tensors)."),
        agreement_data: Path = typer.Option(
            None, "--agreement-data", help="int8: .npz of preprocessed inputs (audio, input_ids, attention_mask)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --out (and Triton model)."),
    ) -> None:
        """Export a checkpoint to a verified artifact folder (model, tokenizer.json, dmf.json, parity.json)."""
        import time

        from rich.console import Console

        from dmf.export import ExportError

        console = Console(stderr=True)
        start = time.perf_counter()
        try:
            from dmf.export.pipeline import export_checkpoint

            with console.status("starting", spinner="dots") as status:
                last = {"name": None, "t": start}

                def on_step(name: str) -> None:
                    now = time.perf_counter()
                    if last["name"] is not None:
                        console.print(f"  [green]done[/green] {STEP_LABELS.get(last['name'], last['name'])} "
                                      f"({now - last['t']:.1f} s)", highlight=False)
                    last.update(name=name, t=now)
                    status.update(STEP_LABELS.get(name, name))

                path = export_checkpoint(checkpoint, out, engine=engine, precision=precision,
                                         max_batch=max_batch, force=force, triton_dir=triton,
                                         triton_name=triton_name, triton_bare=triton_bare,
                                         agreement_data=agreement_data,
                                         on_step=on_step)
                on_step("done")
        except ExportError as exc:
            fail(exc)
            return
        import json

        meta = json.loads((path / "dmf.json").read_text())
        parity = meta["parity"]
        line = (f"exported {meta['engine']} {meta['precision']} {meta['fusion']} model to {path} in "
                f"{time.perf_counter() - start:.1f} s: parity vs torch on {parity['samples']} samples "
                f"max abs diff {parity['max_abs_diff']:.1e}, argmax agreement {parity['argmax_agreement']:.3f}")
        if parity.get("int8_agreement") is not None:
            line += f", int8 agreement with fp32 {parity['int8_agreement']:.3f}"
        if triton is not None:
            line += f"; Triton {'model' if triton_bare else 'ensemble'} {triton / triton_name}"
        typer.echo(line)
