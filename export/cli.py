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
    "calibration": "preprocessing calibration and held-out clips",
    "openvino": "converting to OpenVINO (int8: NNCF calibration) and checking accuracy",
    "fp16": "converting to fp16",
    "trt": "building TensorRT engine",
    "write": "writing artifact",
}


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        checkpoint: Path = typer.Argument(..., help="Checkpoint folder written by `dmf train`."),
        out: Path = typer.Option(..., "--out", help="Artifact folder to create."),
        engine: str = typer.Option("onnx", "--engine", help="onnx | openvino (CPU) | trt (TensorRT, needs a CUDA GPU)."),
        precision: str = typer.Option(
            "fp32", "--precision", help="fp32 | fp16 (onnx, trt) | bf16 (openvino) | int8 (onnx: dynamic; "
            "openvino: static, needs --calibration)."),
        max_batch: int = typer.Option(32, "--max-batch", help="Largest batch (TensorRT profile, Triton)."),
        triton: Path = typer.Option(
            None, "--triton", help="Also write a Triton model repository here: ensemble NAME (raw audio + text in, "
            "log_probs + label out) over NAME_preprocess, NAME_model, NAME_postprocess."),
        triton_name: str = typer.Option("dmf", "--triton-name", help="Triton name NAME (the ensemble's)."),
        triton_bare: bool = typer.Option(
            False, "--triton-bare", help="Write only the model entry NAME (clients send preprocessed tensors)."),
        agreement_data: Path = typer.Option(
            None, "--agreement-data", help="Reduced precisions: .npz of held-out preprocessed inputs (audio, "
            "input_ids, attention_mask, optional labels) for the accuracy gate."),
        calibration: Path = typer.Option(
            None, "--calibration", help="Reduced precisions: the training corpus (folder or manifest); static "
            "int8 calibrates on its training sessions, the accuracy gate uses the checkpoint's held-out session."),
        calibration_samples: int = typer.Option(32, "--calibration-samples", help="Clips to calibrate on."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --out (and Triton model)."),
    ) -> None:
        """Export a checkpoint to a verified artifact folder (model, tokenizer.json, dmf.json, parity.json)."""
        import time

        from rich.console import Console

        from dmf.export import ExportError

        console = Console(stderr=True)
        start = time.perf_counter()
        try:
            from dmf.export.pipeline import ExportOptions, export_checkpoint

            options = ExportOptions(engine=engine, precision=precision, max_batch=max_batch, force=force,
                                    triton_dir=triton, triton_name=triton_name, triton_bare=triton_bare,
                                    agreement_data=agreement_data, calibration=calibration,
                                    calibration_samples=calibration_samples)
            with console.status("starting", spinner="dots") as status:
                on_step = _StepPrinter(console, status)
                path = export_checkpoint(checkpoint, out, options, on_step=on_step)
                on_step("done")
        except ExportError as exc:
            fail(exc)
            return
        line = _summary(path, time.perf_counter() - start)
        if triton is not None:
            line += f"; Triton {'model' if triton_bare else 'ensemble'} {triton / triton_name}"
        typer.echo(line)


class _StepPrinter:
    """on_step callback: a spinner naming the running step, a 'done' line with its time after it."""

    def __init__(self, console, status) -> None:
        import time

        self.console, self.status, self.clock = console, status, time.perf_counter
        self.name, self.t = None, self.clock()

    def __call__(self, name: str) -> None:
        now = self.clock()
        if self.name is not None:
            self.console.print(f"  [green]done[/green] {STEP_LABELS.get(self.name, self.name)} "
                               f"({now - self.t:.1f} s)", highlight=False)
        self.name, self.t = name, now
        self.status.update(STEP_LABELS.get(name, name))


def _summary(path: Path, seconds: float) -> str:
    """The one line printed after a successful export: what, where, and the figures it passed."""
    import json

    from dmf.contract import META_FILE

    meta = json.loads((path / META_FILE).read_text())
    parity = meta["parity"]
    line = (f"exported {meta['engine']} {meta['precision']} {meta['fusion']} model to {path} in {seconds:.1f} s: "
            f"parity vs torch on {parity['samples']} samples max abs diff {parity['max_abs_diff']:.1e}, "
            f"argmax agreement {parity['argmax_agreement']:.3f}")
    return line + gate_summary(parity)


def gate_summary(parity: dict) -> str:
    """The accuracy gate's figures for the summary line ('' for fp32): clips, flips, near-ties,
    UA; or that the export was not gated (no real clips), in the same words dmf.json keeps."""
    gate = parity.get("accuracy_gate")
    if not gate:
        return ""
    if not gate.get("gated", True):
        return f"; {gate['reason']}"
    line = (f"; accuracy gate: agreement with fp32 {gate['argmax_agreement']:.3f} on {gate['decided']} decided "
            f"clips of {gate['clips']} ({gate['flips']} flipped; {gate['near_ties']} near-ties, "
            f"{gate['near_tie_flips']} flipped, not counted)")
    if gate.get("ua") is not None:
        line += f", UA {100 * gate['ua']:.1f} vs fp32 {100 * gate['ua_fp32']:.1f} on {gate['labelled']} held-out clips"
    return line
