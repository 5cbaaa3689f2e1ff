"""export_checkpoint: checkpoint -> verified artifact folder (docs/artifact.md).

Steps: load -> export (torch.onnx, dynamo) -> check (op check) -> optimise (ORT basic, offline) ->
verify (ORT vs torch eval) -> quantise / fp16 / TensorRT build (each verified) -> write. Everything
is written into a hidden sibling folder and renamed into place at the end, so a failed export
leaves nothing (and an existing artifact is untouched unless the new one is complete).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dmf.export import ENGINES, PRECISIONS, ExportError
from dmf import contract as C
from dmf.export import artifact as art
from dmf.export.triton import NAME_RE, entry_paths
from dmf.fileio import commit_dir, stage_dir


@dataclass(frozen=True)
class ExportOptions:
    engine: str = "onnx"  # onnx (ONNX Runtime graph, model.onnx) | trt (TensorRT plan, needs a CUDA GPU)
    precision: str = "fp32"  # fp32 | fp16 (LayerNorm/Softmax kept fp32) | int8 (onnx only: dynamic MatMul int8)
    max_batch: int = 32  # largest batch: TensorRT profile max, Triton max_batch_size, dmf.json max_batch
    force: bool = False  # replace an existing out_dir (and Triton model folder) once the new one is complete
    triton_dir: Path | None = None  # also write a Triton model repository here (dmf.export.triton)
    triton_name: str = "dmf"  # Triton name: the ensemble; NAME_model, NAME_preprocess, NAME_postprocess
    triton_bare: bool = False  # write only the model entry <triton_dir>/<triton_name> (clients preprocess)
    verify_samples: int = 8  # seeded inputs compared against the torch eval model (>= 2)
    agreement_data: Any = None  # int8 only: preprocessed real inputs (.npz path, dict or 3-tuple)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ExportError(f"unknown engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"unknown precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.precision == "int8" and self.engine == "trt":
            raise ExportError("precision int8 is for engine onnx only (ORT dynamic quantisation); "
                              "use fp16 or fp32 with engine trt")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ExportError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if not isinstance(self.verify_samples, int) or self.verify_samples < 2:
            raise ExportError(f"verify_samples must be an integer >= 2, got {self.verify_samples!r}")
        if not NAME_RE.match(self.triton_name):
            raise ExportError(f"Triton model name {self.triton_name!r} must match {NAME_RE.pattern}")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, engine: str = "onnx",
                      precision: str = "fp32", max_batch: int = 32, force: bool = False,
                      triton_dir: str | Path | None = None, verify_samples: int = 8,
                      agreement_data: Any = None, triton_name: str = "dmf", triton_bare: bool = False,
                      on_step: Callable[[str], None] | None = None) -> Path:
    """Export a dmf checkpoint folder to a verified artifact folder `out_dir`; returns out_dir.

    Raises ExportError (one-line message) for a missing/corrupt checkpoint, bad options, an
    existing out_dir without force, a graph that fails the op check, or failed verification.
    `on_step(name)` is called as each step starts (load, export, check, optimise, verify,
    quantise, fp16, trt, write)."""
    options = ExportOptions(engine=engine, precision=precision, max_batch=max_batch, force=force,
                            triton_dir=Path(triton_dir) if triton_dir is not None else None,
                            verify_samples=verify_samples, agreement_data=agreement_data,
                            triton_name=triton_name, triton_bare=triton_bare)
    return run(checkpoint, out_dir, options, on_step=on_step)


def run(checkpoint: str | Path, out_dir: str | Path, options: ExportOptions,
        on_step: Callable[[str], None] | None = None) -> Path:
    step = on_step or (lambda name: None)
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    triton_targets = (entry_paths(options.triton_dir, options.triton_name, options.triton_bare)
                      if options.triton_dir is not None else [])
    _check_targets(checkpoint, out_dir, triton_targets, options.force)
    if options.engine == "trt":
        from dmf.export.tensorrt import require_tensorrt

        require_tensorrt()  # before any heavy work: no GPU, no plan
    agreement = _load_agreement(options)

    step("load")
    model = _load(checkpoint)
    cfg = model.model_config
    weights_sha = C.sha256_file(checkpoint / C.WEIGHTS_FILE)
    if agreement is not None:
        _check_agreement_shapes(agreement, cfg)

    staging = stage_dir(out_dir)
    work = stage_dir(out_dir.with_name(out_dir.name + ".work"))
    triton = None
    try:
        model_file, parity = _build(model, checkpoint, work, options, agreement, step)
        step("write")
        _write(staging, model, checkpoint, model_file, parity, weights_sha, options)
        if options.triton_dir is not None:  # built from the staged artifact itself
            from dmf.export.triton import stage_repository

            triton = stage_repository(staging, options.triton_dir, name=options.triton_name,
                                      bare=options.triton_bare)
        commit_dir(staging, out_dir)
        if triton is not None:
            triton.commit()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if triton is not None:
            triton.discard()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


# ------------------------------------------------------------------------------------------ steps
def _check_targets(checkpoint: Path, out_dir: Path, triton_targets: list[Path], force: bool) -> None:
    if not checkpoint.is_dir():
        raise ExportError(f"cannot load checkpoint: checkpoint folder not found: {checkpoint}")
    for target in (out_dir, *triton_targets):
        if not target.exists():
            continue
        if not force:
            raise ExportError(f"output folder {target} exists (use --force to replace it)")
        if not target.is_dir():
            raise ExportError(f"output path {target} exists and is not a folder")
    if out_dir.resolve() == checkpoint.resolve():
        raise ExportError(f"output folder {out_dir} is the checkpoint folder")


def _load(checkpoint: Path):
    from dmf.model import CheckpointError, DMFModel

    try:
        return DMFModel.from_pretrained(checkpoint)
    except CheckpointError as exc:
        raise ExportError(f"cannot load checkpoint: {exc}") from None
    except Exception as exc:  # e.g. a config the encoders reject
        raise ExportError(f"cannot load checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from None


def _load_agreement(options: ExportOptions) -> dict[str, np.ndarray] | None:
    if options.agreement_data is None:
        return None
    if options.precision != "int8":
        raise ExportError("agreement data is used for int8 exports only (--precision int8)")
    from dmf.export.verify import load_agreement_data

    try:
        return load_agreement_data(options.agreement_data)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot read agreement data: {exc}") from None


def _check_agreement_shapes(data: dict[str, np.ndarray], cfg) -> None:
    want = {"audio": cfg.max_audio_samples, "input_ids": cfg.max_tokens, "attention_mask": cfg.max_tokens}
    for name, dim in want.items():
        if data[name].ndim != 2 or data[name].shape[1] != dim:
            raise ExportError(f"agreement data {name} has shape {data[name].shape}, expected (N, {dim})")


def _opcheck(path: Path, what: str, extra_allowed=()) -> None:
    import onnx

    from dmf.export.opcheck import check_model, check_opset

    model = onnx.load(str(path), load_external_data=False)
    result = check_model(model, extra_allowed=extra_allowed)
    if not result.ok:
        raise ExportError(f"{what} refused by the op check: {result.message()}")
    reason = check_opset(model)
    if reason:
        raise ExportError(f"{what} refused by the op check: {reason}")


def _build(model, checkpoint: Path, work: Path, options: ExportOptions, agreement, step):
    """Export, check, optimise and verify; returns (model file to ship, parity report)."""
    from dmf.export import verify as V
    from dmf.export.onnx_export import export_onnx
    from dmf.export.optimize import optimize_offline

    cfg = model.model_config
    feeds = V.verify_inputs(cfg, model.tokenizer, options.verify_samples)
    model.eval().exportable(False)
    reference = V.torch_reference(model, feeds)  # the plain eval model (FFT CBP) is the reference

    step("export")
    raw = export_onnx(model, work / "raw.onnx", {k: v[:2] for k, v in feeds.items()})
    step("check")
    _opcheck(raw, "exported graph")
    step("optimise")
    fp32 = optimize_offline(raw, work / "fp32.onnx", level="basic")
    _opcheck(fp32, "optimised graph")
    step("verify")
    p32 = V.verify_onnx(fp32, reference, feeds)
    failure = V.parity_failure(p32, V.FP32_ATOL)
    if failure:
        raise ExportError(failure)
    parity = {
        "reference": "torch-eval-fp32", "checked_with": "onnxruntime-cpu", "samples": p32.samples,
        "max_abs_diff": p32.max_abs_diff, "argmax_agreement": p32.argmax_agreement, "tolerance": V.FP32_ATOL,
        "fp32_max_abs_diff": p32.max_abs_diff, "fp32_argmax_agreement": p32.argmax_agreement,
        "int8_agreement": None, "inputs": {"seed": V.VERIFY_SEED, "batch_sizes": [p32.samples, 1]},
    }
    model_file = fp32

    if options.engine == "onnx" and options.precision == "int8":
        step("quantise")
        model_file = _int8(fp32, work, feeds, reference, agreement, options, parity)
    elif options.engine == "onnx" and options.precision == "fp16":
        step("fp16")
        from dmf.export.optimize import convert_fp16

        model_file = convert_fp16(fp32, work / "fp16.onnx")
        _opcheck(model_file, "fp16 graph")
        p16 = V.verify_onnx(model_file, reference, feeds)
        _gate(V.parity_failure(p16, V.FP16_ATOL, "fp16 export"))
        parity.update(max_abs_diff=p16.max_abs_diff, argmax_agreement=p16.argmax_agreement, tolerance=V.FP16_ATOL)
    elif options.engine == "trt":
        step("trt")
        model_file = _tensorrt(fp32, work, feeds, reference, options, cfg, parity)
    return model_file, parity


def _gate(failure: str | None) -> None:
    if failure:
        raise ExportError(failure)


def _int8(fp32: Path, work: Path, feeds, reference, agreement, options: ExportOptions, parity: dict) -> Path:
    from dmf.export import verify as V
    from dmf.export.opcheck import ORT_INT8_OPS
    from dmf.export.optimize import quantize_int8

    int8 = quantize_int8(fp32, work / "int8.onnx")
    _opcheck(int8, "int8 graph", extra_allowed=ORT_INT8_OPS)
    s32, s8 = V.ort_session(fp32), V.ort_session(int8)
    out32 = V.ort_run(s32, feeds)
    vs_torch = V.verify_onnx(int8, reference, feeds)
    vs_fp32 = V.compare(out32, V.ort_run(s8, feeds))
    parity.update(max_abs_diff=vs_torch.max_abs_diff, argmax_agreement=vs_torch.argmax_agreement,
                  tolerance=None, int8_verify_agreement=vs_fp32.argmax_agreement,
                  int8_verify_max_abs_diff=vs_fp32.max_abs_diff)
    if not np.isfinite(vs_fp32.max_abs_diff):
        raise ExportError("int8 export failed verification: non-finite log-probs")
    if vs_fp32.argmax_agreement < V.INT8_MIN_VERIFY_AGREEMENT:  # sanity gate: a broken graph is near chance
        raise ExportError(f"int8 export failed verification: argmax agreement with fp32 "
                          f"{vs_fp32.argmax_agreement:.3f} < {V.INT8_MIN_VERIFY_AGREEMENT} on the verify inputs")
    if agreement is not None:
        batch = options.max_batch
        a32 = V.ort_run(s32, agreement, batch=batch)
        a8 = V.ort_run(s8, agreement, batch=batch)
        rate = float(np.mean(a32.argmax(-1) == a8.argmax(-1)))
        parity.update(int8_agreement=rate, int8_agreement_samples=int(len(a32)))
        if rate < V.INT8_MIN_AGREEMENT:
            raise ExportError(f"int8 export failed agreement: argmax agreement with fp32 {rate:.3f} < "
                              f"{V.INT8_MIN_AGREEMENT} on {len(a32)} agreement samples")
    return int8


def _tensorrt(fp32: Path, work: Path, feeds, reference, options: ExportOptions, cfg, parity: dict) -> Path:
    """Build the plan, then verify it through the runtime's TrtEngine at batch min(max_batch, N) and 1."""
    from dmf.export import verify as V
    from dmf.export.tensorrt import build_engine, build_target, major_version, run_plan

    source = fp32
    if options.precision == "fp16" and major_version() >= 11:  # strongly typed: fp16 comes from the graph
        from dmf.export.optimize import convert_fp16

        source = convert_fp16(fp32, work / "fp16.onnx")
        _opcheck(source, "fp16 graph")
    plan = build_engine(source, work / "model.plan", precision=options.precision, max_batch=options.max_batch,
                        input_dims={C.AUDIO_INPUT: (cfg.max_audio_samples,), C.IDS_INPUT: (cfg.max_tokens,),
                                    C.MASK_INPUT: (cfg.max_tokens,)})
    batch = min(options.max_batch, len(feeds[C.AUDIO_INPUT]))
    outs = run_plan(plan, cfg, options.precision, feeds, (batch, 1))
    whole, single = (V.compare(reference, out) for out in outs)
    result = V.Parity(whole.samples, max(whole.max_abs_diff, single.max_abs_diff),
                      min(whole.argmax_agreement, single.argmax_agreement))
    atol = V.FP32_ATOL if options.precision == "fp32" else V.FP16_ATOL
    _gate(V.parity_failure(result, atol, f"TensorRT {options.precision} export"))
    parity.update(checked_with="tensorrt", max_abs_diff=result.max_abs_diff,
                  argmax_agreement=result.argmax_agreement, tolerance=atol, tensorrt=build_target())
    return plan


def _write(staging: Path, model, checkpoint: Path, model_file: Path, parity: dict, weights_sha: str,
           options: ExportOptions) -> None:
    name = C.MODEL_FILES[options.engine]
    shutil.copyfile(model_file, staging / name)
    tokenizer_src = checkpoint / C.TOKENIZER_FILE
    if tokenizer_src.is_file():
        shutil.copyfile(tokenizer_src, staging / C.TOKENIZER_FILE)
    else:  # checkpoints always carry it; keep a fallback for hand-made folders
        model.tokenizer.backend_tokenizer.save(str(staging / C.TOKENIZER_FILE))
    files = {name: C.sha256_file(staging / name), C.TOKENIZER_FILE: C.sha256_file(staging / C.TOKENIZER_FILE)}
    C.write_json(staging / C.PARITY_FILE, parity)
    files[C.PARITY_FILE] = C.sha256_file(staging / C.PARITY_FILE)
    meta = art.manifest(model_config=model.model_config, engine=options.engine, precision=options.precision,
                        max_batch=options.max_batch, checkpoint=checkpoint, checkpoint_sha256=weights_sha,
                        files=files, parity=parity)
    C.write_json(staging / C.META_FILE, meta)
