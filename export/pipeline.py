"""export_checkpoint: checkpoint -> verified artifact folder (docs/artifact.md).

Steps: load -> export (torch.onnx, dynamo) -> check (op check) -> optimise (ORT basic, offline) ->
verify (ORT vs torch eval) -> quantise / fp16 / TensorRT build (each verified) -> write. Everything
is written into a hidden sibling folder and renamed into place at the end, so a failed export
leaves nothing (and an existing artifact is untouched unless the new one is complete).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dmf.export import ENGINE_PRECISIONS, ENGINES, PRECISIONS, ExportError
from dmf import contract as C
from dmf.export import artifact as art
from dmf.export import verify as V
from dmf.export.triton import NAME_RE, entry_paths
from dmf.fileio import atomic_write_json, commit_dir, stage_dir


@dataclass(frozen=True)
class ExportOptions:
    engine: str = "onnx"  # onnx (model.onnx) | openvino (OpenVINO IR, CPU) | trt (TensorRT plan, needs a CUDA GPU)
    precision: str = "fp32"  # fp32 | fp16 (onnx, trt) | bf16 (openvino) | int8 (onnx: dynamic MatMul; openvino: static)
    max_batch: int = 32  # largest batch: TensorRT profile max, Triton max_batch_size, dmf.json max_batch
    force: bool = False  # replace an existing out_dir (and Triton model folder) once the new one is complete
    triton_dir: Path | None = None  # also write a Triton model repository here (dmf.export.triton)
    triton_name: str = "dmf"  # Triton name: the ensemble; NAME_model, NAME_preprocess, NAME_postprocess
    triton_bare: bool = False  # write only the model entry <triton_dir>/<triton_name> (clients preprocess)
    verify_samples: int = 8  # seeded inputs compared against the torch eval model (>= 2)
    agreement_data: Any = None  # reduced precisions: held-out preprocessed inputs (.npz path, dict or 3-tuple)
    calibration: Any = None  # reduced precisions: a corpus (folder or manifest): its training sessions
    #   calibrate static int8, the checkpoint's held-out session gates accuracy
    calibration_samples: int = 32  # clips static int8 calibrates on

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ExportError(f"unknown engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"unknown precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.precision not in ENGINE_PRECISIONS[self.engine]:
            raise ExportError(f"precision {self.precision} is not available for engine {self.engine} "
                              f"(it offers {', '.join(ENGINE_PRECISIONS[self.engine])})")
        if self.engine == "openvino" and self.precision == "int8" and self.calibration is None:
            raise ExportError("static int8 needs calibration clips: give --calibration CORPUS (the training corpus)")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ExportError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if not isinstance(self.verify_samples, int) or self.verify_samples < 2:
            raise ExportError(f"verify_samples must be an integer >= 2, got {self.verify_samples!r}")
        if not NAME_RE.match(self.triton_name):
            raise ExportError(f"Triton model name {self.triton_name!r} must match {NAME_RE.pattern}")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, options: ExportOptions | None = None, *,
                      on_step: Callable[[str], None] | None = None, **fields: Any) -> Path:
    """Export a dmf checkpoint folder to a verified artifact folder `out_dir`; returns out_dir.

    The export is described by `options`, or by ExportOptions' fields as keywords
    (`engine="openvino", precision="int8", calibration=corpus`), which also override `options`.
    Raises ExportError (one-line message) for a missing/corrupt checkpoint, bad options, an
    existing out_dir without force, a graph that fails the op check, or failed verification.
    `on_step(name)` is called as each step starts (load, export, check, optimise, verify,
    quantise, fp16, trt, write)."""
    options = _options(options, fields)
    step = on_step or (lambda name: None)
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    triton_targets = (entry_paths(options.triton_dir, options.triton_name, options.triton_bare)
                      if options.triton_dir is not None else [])
    _check_targets(checkpoint, out_dir, triton_targets, options.force)
    if options.engine == "trt":
        from dmf.export.tensorrt import require_tensorrt

        require_tensorrt()  # before any heavy work: no GPU, no plan
    model, clips = _load_with_clips(checkpoint, options, step)
    _build_and_commit(model, checkpoint, out_dir, options, clips, step)
    return out_dir


def _load_with_clips(checkpoint: Path, options: ExportOptions, step) -> tuple[Any, dict | None]:
    """The model, and the real clips reduced precisions calibrate and are gated on (None without
    --calibration / --agreement-data); too few gate clips are refused here, before the long steps."""
    agreement = _load_agreement(options)
    step("load")
    model = _load(checkpoint)
    if agreement is not None:
        _check_agreement_shapes(agreement, model.model_config)
    if options.calibration is not None:
        step("calibration")
        agreement = _calibration_data(options, model, checkpoint, agreement)
    _check_gate_clips(agreement, options)
    return model, agreement


def _build_and_commit(model, checkpoint: Path, out_dir: Path, options: ExportOptions, clips: dict | None,
                      step) -> None:
    """Build into a staging folder beside out_dir and swap it in (with the Triton repository) only
    when every check has passed; on any failure nothing is left behind."""
    weights_sha = C.sha256_file(checkpoint / C.WEIGHTS_FILE)
    staging = stage_dir(out_dir)
    work = stage_dir(out_dir.with_name(out_dir.name + ".work"))
    triton = None
    try:
        model_file, parity = _build(model, checkpoint, work, options, clips, step)
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


def _options(options: ExportOptions | None, fields: dict[str, Any]) -> ExportOptions:
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ExportOptions)})
    if unknown:
        raise ExportError(f"unknown export option {unknown[0]!r}: ExportOptions has no such field")
    if fields.get("triton_dir") is not None:
        fields["triton_dir"] = Path(fields["triton_dir"])
    return dataclasses.replace(options, **fields) if options is not None else ExportOptions(**fields)


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
    from dmf.checkpoint import CheckpointError
    from dmf.model import DMFModel

    try:
        return DMFModel.from_pretrained(checkpoint)
    except CheckpointError as exc:
        raise ExportError(f"cannot load checkpoint: {exc}") from None
    except Exception as exc:  # e.g. a config the encoders reject
        raise ExportError(f"cannot load checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from None


def _load_agreement(options: ExportOptions) -> dict | None:
    """Held-out rows given as arrays ({"held_out": rows}), or None."""
    if options.agreement_data is None:
        return None
    if options.precision == "fp32":
        raise ExportError("agreement data gates reduced precisions only (--precision fp16|bf16|int8)")
    from dmf.export.verify import load_agreement_data

    try:
        return {"held_out": load_agreement_data(options.agreement_data), "held_out_session": None}
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot read agreement data: {exc}") from None


def _calibration_data(options: ExportOptions, model, checkpoint: Path, given: dict | None) -> dict:
    """Calibration and held-out rows from the corpus (a dict of rows is taken as is); held-out
    rows given as agreement data win over the corpus's."""
    if options.precision == "fp32":
        raise ExportError("--calibration is for reduced precisions (--precision fp16|bf16|int8)")
    data = options.calibration
    if not isinstance(data, dict):
        from dmf.export.calibration import corpus_data

        try:
            data = corpus_data(data, model, checkpoint, options.calibration_samples)
        except Exception as exc:  # DataError, AudioError, ValueError: all one-liners naming the file
            raise ExportError(f"cannot read calibration corpus {data}: {exc}") from None
    return {**data, **(given or {})}


def _check_gate_clips(data: dict | None, options: ExportOptions) -> None:
    """Too few clips to gate on: refused before the long steps (export, calibration), with the count."""
    if data is None or data.get("held_out") is None:
        return
    try:
        V.check_gate_clips(len(data["held_out"][C.AUDIO_INPUT]), f"{options.engine} {options.precision} export",
                           data.get("gate_sources"))
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def _check_agreement_shapes(data: dict, cfg) -> None:
    data = data["held_out"]
    want = {C.AUDIO_INPUT: cfg.max_audio_samples, C.IDS_INPUT: cfg.max_tokens, C.MASK_INPUT: cfg.max_tokens}
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


def _build(model, checkpoint: Path, work: Path, options: ExportOptions, data: dict | None, step):
    """Export, check, optimise and verify; returns (model file to ship, parity report)."""
    from dmf.export.onnx_export import export_onnx
    from dmf.export.optimize import optimize_offline

    cfg = model.model_config
    feeds = V.verify_inputs(cfg, model.tokenizer, options.verify_samples)
    model.eval()
    reference = V.torch_reference(model, feeds)  # the plain eval model (FFT CBP) is the reference

    step("export")
    raw = export_onnx(model, work / "raw.onnx", {k: v[:2] for k, v in feeds.items()})
    step("check")
    _opcheck(raw, "exported graph")
    step("optimise")
    fp32 = optimize_offline(raw, work / "fp32.onnx", level="basic")
    _opcheck(fp32, "optimised graph")
    step("verify")
    p32 = V.verify_onnx(fp32, reference, feeds, cfg)
    _gate(V.parity_failure(p32, V.FP32_ATOL))
    parity = art.ParityReport(samples=p32.samples, max_abs_diff=p32.max_abs_diff,
                              argmax_agreement=p32.argmax_agreement, fp32_max_abs_diff=p32.max_abs_diff,
                              fp32_argmax_agreement=p32.argmax_agreement, tolerance=V.FP32_ATOL,
                              inputs={"seed": V.VERIFY_SEED, "batch_sizes": [p32.samples, 1]})
    job = _Job(fp32, work, feeds, reference, options, cfg, parity, data)
    if options.engine == "openvino":
        step("openvino")
        return _openvino(job), parity
    if options.engine == "trt":
        step("trt")
        return _tensorrt(job), parity
    if options.precision == "int8":
        step("quantise")
        return _int8(job), parity
    if options.precision == "fp16":
        step("fp16")
        return _fp16(job), parity
    return fp32, parity


@dataclass
class _Job:
    """What each reduced-precision step needs: the verified fp32 graph and its verification."""

    fp32: Path  # the verified fp32 ONNX graph
    work: Path  # scratch folder
    feeds: dict  # the seeded verify inputs
    reference: np.ndarray  # (N, C) torch eval log-probs on feeds
    options: ExportOptions
    cfg: Any  # ModelConfig
    parity: art.ParityReport  # the report, updated in place
    data: dict | None  # {"calibration", "held_out", ...} rows, or None


def _gate(failure: str | None) -> None:
    if failure:
        raise ExportError(failure)


NOT_GATED = ("not gated: no real clips to measure the accuracy of this reduced precision on; give --calibration "
             "CORPUS (the training corpus) or --agreement-data to gate it")


def _check_reduced(job: _Job, kind: str, path: Path) -> None:
    """A graph through the runtime's engine `kind`: fp32 against torch within FP32_ATOL; a reduced
    precision against torch only for a broken graph (argmax agreement on the verify inputs >=
    MIN_VERIFY_AGREEMENT), then through the accuracy gate on real clips when there are any."""
    what = f"{job.options.engine} {job.options.precision} export"
    reduced = V.open_graph(kind, path, job.cfg, job.options.precision)
    try:
        _check_engine(job, reduced, kind, what)
    finally:
        reduced.close()


def _check_engine(job: _Job, reduced, kind: str, what: str) -> None:
    _check_parity(job, V.verify_engine(reduced, job.reference, job.feeds), kind, what)
    if job.options.precision != "fp32":
        _accuracy_gate(job, reduced, what)


def _has_gate_data(job: _Job) -> bool:
    return job.data is not None and job.data.get("held_out") is not None


def _accuracy_gate(job: _Job, reduced, what: str) -> None:
    """The held-out gate when there are real clips; otherwise dmf.json says it was not gated."""
    if _has_gate_data(job):
        _held_out_gate(job, reduced, what)
    else:
        _not_gated(job)


def _not_gated(job: _Job) -> None:
    job.parity.accuracy_gate = {"gated": False, "reason": NOT_GATED}


def _check_parity(job: _Job, vs_torch, kind: str, what: str) -> None:
    """Record the engine against torch on the verify inputs; fp32 within FP32_ATOL, reduced
    precisions only for a broken graph."""
    report = job.parity
    report.checked_with = _CHECKED_WITH[kind]
    report.max_abs_diff, report.argmax_agreement = vs_torch.max_abs_diff, vs_torch.argmax_agreement
    if job.options.precision == "fp32":
        report.tolerance = V.FP32_ATOL
        _gate(V.parity_failure(vs_torch, V.FP32_ATOL, what))
        return
    _gate(_broken_graph(vs_torch, what, judged_on_clips=_has_gate_data(job)))
    report.tolerance, report.verify_min_agreement = None, V.MIN_VERIFY_AGREEMENT
    if job.options.precision == "int8":  # the key dmf.json had before every precision was gated alike
        report.int8_verify_agreement = vs_torch.argmax_agreement


def _broken_graph(vs_torch, what: str, judged_on_clips: bool) -> str | None:
    """A reduced graph's failure on the verify inputs: non-finite output, or agreement near chance
    when no real clips will judge it. With real clips the accuracy gate decides: on a trained
    model the seeded noise inputs are often near-ties (fold 2 of the demo corpus: 16 of 112 real
    clips are), so 8 of them would refuse an export the real clips could accept, or refuse a bad
    one without its figures."""
    if not np.isfinite(vs_torch.max_abs_diff):
        return f"{what} failed verification: non-finite log-probs"
    if not judged_on_clips and vs_torch.argmax_agreement < V.MIN_VERIFY_AGREEMENT:
        return (f"{what} failed verification: argmax agreement with fp32 {vs_torch.argmax_agreement:.3f} "
                f"< {V.MIN_VERIFY_AGREEMENT} on the verify inputs")
    return None


_CHECKED_WITH = {"onnx": "onnxruntime-cpu", "openvino": "openvino-cpu", "trt": "tensorrt"}


def _held_out_gate(job: _Job, reduced, what: str) -> None:
    """verify.accuracy_gate: the reduced graph against the fp32 graph on the gate's clips."""
    rows = job.data["held_out"]
    batch = min(job.options.max_batch, 8)
    fp32 = V.open_graph("onnx", job.fp32, job.cfg)
    try:
        record = V.accuracy_gate(V.run_chunks(fp32, rows, batch), V.run_chunks(reduced, rows, batch),
                                 rows.get("labels"), what, labelled=job.data.get("ua_rows"))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    finally:
        fp32.close()
    record.update(gated=True, held_out_session=job.data.get("held_out_session"),
                  sources=job.data.get("gate_sources") or {"agreement data": record["clips"]})
    job.parity.accuracy_gate = record
    if job.options.precision == "int8":  # the keys dmf.json had before the gate covered every precision
        job.parity.int8_agreement, job.parity.int8_agreement_samples = record["argmax_agreement"], record["clips"]


def _int8(job: _Job) -> Path:
    """ONNX Runtime dynamic int8 (MatMul weights; Conv and the fusion's MatMuls stay fp32)."""
    from dmf.export.opcheck import ORT_INT8_OPS
    from dmf.export.optimize import quantize_int8

    int8 = quantize_int8(job.fp32, job.work / "int8.onnx")
    _opcheck(int8, "int8 graph", extra_allowed=ORT_INT8_OPS)
    _check_reduced(job, "onnx", int8)
    return int8


def _fp16(job: _Job) -> Path:
    from dmf.export.optimize import convert_fp16

    fp16 = convert_fp16(job.fp32, job.work / "fp16.onnx")
    _opcheck(fp16, "fp16 graph")
    _check_reduced(job, "onnx", fp16)
    return fp16


def _openvino(job: _Job) -> Path:
    """OpenVINO IR: fp32 (checked at fp32 tolerance), bf16 (the same IR, bf16 at run time where the
    CPU has it) or mixed static int8 calibrated on the corpus's training clips (export/openvino.py)."""
    from dmf.export import openvino as OV

    xml = job.work / C.MODEL_FILES["openvino"]
    if job.options.precision == "int8":
        if job.data is None or job.data.get("calibration") is None:
            raise ExportError("static int8 needs calibration clips: give --calibration CORPUS")
        calibration = job.data["calibration"]
        _, kept = OV.quantize(job.fp32, xml, calibration)
        job.parity.quantization = {"recipe": "mixed-int8", "smooth_quant": False,
                                   "calibration_clips": int(len(calibration[C.AUDIO_INPUT])), "float_ops": kept}
    else:
        OV.convert(job.fp32, xml)
    _check_reduced(job, "openvino", xml)
    return xml


def _tensorrt(job: _Job) -> Path:
    """Build the plan, then check it through the runtime's TrtEngine at batch min(max_batch, N) and
    1: fp32 against torch within FP32_ATOL; fp16 / int8 as every reduced precision (broken-graph
    check on the verify inputs, the accuracy gate on real clips when there are any)."""
    from dmf.export.tensorrt import build_engine, build_target, major_version, run_plan

    options, cfg = job.options, job.cfg
    source = job.fp32
    if options.precision == "fp16" and major_version() >= 11:  # strongly typed: fp16 comes from the graph
        from dmf.export.optimize import convert_fp16

        source = convert_fp16(job.fp32, job.work / "fp16.onnx")
        _opcheck(source, "fp16 graph")
    plan = build_engine(source, job.work / C.MODEL_FILES["trt"], precision=options.precision, max_batch=options.max_batch,
                        input_dims={C.AUDIO_INPUT: (cfg.max_audio_samples,), C.IDS_INPUT: (cfg.max_tokens,),
                                    C.MASK_INPUT: (cfg.max_tokens,)})
    job.parity.tensorrt = build_target()
    what = f"TensorRT {options.precision} export"
    batch = min(options.max_batch, len(job.feeds[C.AUDIO_INPUT]))
    whole, single = (V.compare(job.reference, out) for out in run_plan(plan, cfg, options.precision, job.feeds, (batch, 1)))
    _check_parity(job, V.Parity(whole.samples, max(whole.max_abs_diff, single.max_abs_diff),
                                min(whole.argmax_agreement, single.argmax_agreement)), "trt", what)
    if options.precision == "fp32":
        return plan
    if not _has_gate_data(job):
        _not_gated(job)
        return plan
    engine = V.open_graph("trt", plan, cfg, options.precision)
    try:
        _held_out_gate(job, engine, what)
    finally:
        engine.close()
    return plan


def _write(staging: Path, model, checkpoint: Path, model_file: Path, parity: art.ParityReport, weights_sha: str,
           options: ExportOptions) -> None:
    name = C.MODEL_FILES[options.engine]
    shipped = [name] + ([C.OPENVINO_WEIGHTS_FILE] if options.engine == "openvino" else [])
    shutil.copyfile(model_file, staging / name)
    if options.engine == "onnx":  # header only (IR 9, used opsets): onnxruntime before 1.18 / Triton before 24.06 load it
        from dmf.export.onnx_export import stamp_for_older_runtimes
        stamp_for_older_runtimes(staging / name)
    if options.engine == "openvino":  # the IR's weights, written beside model.xml
        shutil.copyfile(model_file.with_name(C.OPENVINO_WEIGHTS_FILE), staging / C.OPENVINO_WEIGHTS_FILE)
    tokenizer_src = checkpoint / C.TOKENIZER_FILE
    if tokenizer_src.is_file():
        shutil.copyfile(tokenizer_src, staging / C.TOKENIZER_FILE)
    else:  # checkpoints always carry it; keep a fallback for hand-made folders
        model.tokenizer.backend_tokenizer.save(str(staging / C.TOKENIZER_FILE))
    files = {f: C.sha256_file(staging / f) for f in (*shipped, C.TOKENIZER_FILE)}
    atomic_write_json(staging / C.PARITY_FILE, parity.to_dict())
    files[C.PARITY_FILE] = C.sha256_file(staging / C.PARITY_FILE)
    meta = art.manifest(model_config=model.model_config, engine=options.engine, precision=options.precision,
                        max_batch=options.max_batch, checkpoint=checkpoint, checkpoint_sha256=weights_sha,
                        files=files, parity=parity)
    atomic_write_json(staging / C.META_FILE, meta)
