"""TensorRT paths: the runtime's TrtEngine and CUDA layer, export's plan build and verification.

On CPU (every machine this project is tested on) the CUDA runtime and TensorRT are replaced by
Python fakes: `FakeCuda` stands in for libcudart's functions (it tracks allocations, frees,
streams and device bytes, and records any use of a freed or unknown pointer) and `fake_tensorrt`
for the `tensorrt` module (its plan computes `fake_log_probs` from the device bytes). So buffer
growth, failure after free, close and stream lifetime, error messages and export's verification
wiring are tested here; the `gpu` / `trt`-marked tests at the end run the real thing
(`make test-gpu`) and skip elsewhere with the reason from tests/gpu_skip.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest_runtime import TEXTS, predictor, rt, tone  # noqa: F401

from dmf import contract as C
from dmf.fileio import atomic_write_json
from dmf.runtime import EngineError, Predictor
from dmf.runtime import cudart as CU
from dmf.runtime import trt as T
from dmf.runtime.artifact import ModelFile

REPO = Path(__file__).resolve().parents[1]
WIDTHS = {C.AUDIO_INPUT: 16, C.IDS_INPUT: 5, C.MASK_INPUT: 5}  # tiny fake plan inputs (dims after batch)
LABELS = 4
ART_WIDTHS = {C.AUDIO_INPUT: 1600}  # the audio-only plan artifact: 0.1 s at 16 kHz
OOM = 2  # cudaErrorMemoryAllocation


# --------------------------------------------------------------------------------- fake CUDA

class FakeCuda:
    """libcudart's functions as Python closures (ctypes argtypes can be set on them)."""

    def __init__(self, runtime_version: int = 12080, device_status: int = 0, devices: int = 1):
        self.live: dict[int, bytearray] = {}  # device ptr -> its bytes
        self.freed: set[int] = set()
        self.streams: set[int] = set()
        self.destroyed: list[int] = []
        self.allocs = self.frees = 0
        self.violations: list[str] = []
        self.fail_malloc = False  # next cudaMalloc returns out-of-memory
        self.fail_free: set[int] = set()  # cudaFree of these returns an error (and leaves them allocated)
        self.runtime_version, self.device_status, self.devices = runtime_version, device_status, devices
        self._next = 0x10000
        self.lib = types.SimpleNamespace(**{name: self._fn(getattr(self, "_" + name)) for name in (
            "cudaMalloc", "cudaFree", "cudaMemcpyAsync", "cudaStreamCreate", "cudaStreamSynchronize",
            "cudaStreamDestroy", "cudaGetErrorString", "cudaRuntimeGetVersion", "cudaDriverGetVersion",
            "cudaGetDeviceCount")})

    @staticmethod
    def _fn(method):
        def call(*args):
            return method(*args)
        return call

    def _handle(self) -> int:
        self._next += 0x1000  # never reused: a stale pointer stays recognisable
        return self._next

    def device(self, ptr: int, nbytes: int, what: str) -> bytearray | None:
        if ptr in self.live and nbytes <= len(self.live[ptr]):
            return self.live[ptr]
        kind = "freed" if ptr in self.freed else ("too small" if ptr in self.live else "unknown")
        self.violations.append(f"{what}: {kind} pointer {ptr:#x}")
        return None

    def stream_ok(self, stream, what: str) -> None:
        if stream not in self.streams:
            self.violations.append(f"{what}: stream {stream} not live")

    def _cudaMalloc(self, ref, size):
        if self.fail_malloc:
            self.fail_malloc = False
            return OOM
        ptr = self._handle()
        self.live[ptr] = bytearray(size)
        self.allocs += 1
        ref._obj.value = ptr
        return 0

    def _cudaFree(self, ptr):
        ptr = ptr.value
        if ptr in self.fail_free:
            return 1
        if self.device(ptr, 0, "cudaFree") is None:
            return 1
        del self.live[ptr]
        self.freed.add(ptr)
        self.frees += 1
        return 0

    def _cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.stream_ok(stream.value, "cudaMemcpyAsync")
        if kind == CU.CudaRuntime.H2D and (mem := self.device(dst.value, nbytes, "copy to device")) is not None:
            mem[:nbytes] = ctypes.string_at(src.value, nbytes)
        if kind == CU.CudaRuntime.D2H and (mem := self.device(src.value, nbytes, "copy to host")) is not None:
            ctypes.memmove(dst.value, bytes(mem[:nbytes]), nbytes)
        return 0

    def _cudaStreamCreate(self, ref):
        ref._obj.value = self._handle()
        self.streams.add(ref._obj.value)
        return 0

    def _cudaStreamSynchronize(self, stream):
        self.stream_ok(stream.value, "cudaStreamSynchronize")
        return 0

    def _cudaStreamDestroy(self, stream):
        self.stream_ok(stream.value, "cudaStreamDestroy")
        self.streams.discard(stream.value)
        self.destroyed.append(stream.value)
        return 0

    def _cudaGetErrorString(self, status):
        return {OOM: b"out of memory", 35: b"CUDA driver version is insufficient for CUDA runtime version",
                100: b"no CUDA-capable device is detected"}.get(status, b"unspecified failure")

    def _cudaRuntimeGetVersion(self, ref):
        ref._obj.value = self.runtime_version
        return 0

    def _cudaDriverGetVersion(self, ref):
        ref._obj.value = 12040
        return 0

    def _cudaGetDeviceCount(self, ref):
        ref._obj.value = self.devices if self.device_status == 0 else 0
        return self.device_status


# ----------------------------------------------------------------------------- fake TensorRT

def fake_log_probs(batch: dict[str, np.ndarray]) -> np.ndarray:
    """What the fake plan computes: (B, LABELS) log-softmax of a per-row score of every input."""
    score = sum(np.asarray(v, dtype=np.float64).reshape(len(v), -1).mean(axis=1) for v in batch.values())
    logits = np.outer(score, np.arange(1, LABELS + 1)) / 10.0
    return (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)


class FakeContext:
    def __init__(self, plan: "FakePlan"):
        self.plan, self.shapes, self.addresses, self.batches = plan, {}, {}, []

    def set_input_shape(self, name, shape):
        ok = len(shape) == 2 and 1 <= shape[0] <= self.plan.max_batch and shape[1] == self.plan.widths[name]
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def set_tensor_address(self, name, ptr):
        self.plan.cuda.device(ptr, 1, f"set_tensor_address({name})")
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        rows = {s[0] for s in self.shapes.values()}
        return (rows.pop() if len(rows) == 1 and len(self.shapes) == len(self.plan.widths) else -1, LABELS)

    def execute_async_v3(self, stream):
        cuda = self.plan.cuda
        cuda.stream_ok(stream, "execute_async_v3")
        batch = {}
        for name, shape in self.shapes.items():
            dtype = self.plan.dtypes[name]
            mem = cuda.device(self.addresses[name], int(np.prod(shape)) * dtype.itemsize, f"read {name}")
            batch[name] = np.frombuffer(bytes(mem), dtype=dtype)[:int(np.prod(shape))].reshape(shape)
        out = fake_log_probs(batch)
        cuda.device(self.addresses[C.OUTPUT_NAME], out.nbytes, "write output")[:out.nbytes] = out.tobytes()
        self.batches.append(len(out))
        return True


class FakePlan:
    """A deserialized engine: dynamic batch dim, profile 1..max_batch."""

    def __init__(self, cuda: FakeCuda, widths: dict[str, int], max_batch: int, context_fails: bool = False):
        self.cuda, self.widths, self.max_batch, self.context_fails = cuda, dict(widths), max_batch, context_fails
        self.names = [*widths, C.OUTPUT_NAME]
        floats = (C.AUDIO_INPUT, C.OUTPUT_NAME)
        self.dtypes = {n: np.dtype(np.float32 if n in floats else np.int64) for n in self.names}
        self.contexts: list[FakeContext] = []

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.widths else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_shape(self, name):
        return (-1, self.widths.get(name, LABELS))

    def get_tensor_profile_shape(self, name, profile):
        w = self.widths[name]
        return [(1, w), (min(8, self.max_batch), w), (self.max_batch, w)]

    def create_execution_context(self):
        if self.context_fails:
            return None
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt(cuda: FakeCuda, widths=WIDTHS, max_batch: int = 8, runtime_error: Exception | None = None,
                  context_fails: bool = False, version: str = "10.99.0") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dtype: dtype
    trt.plans = []

    class Runtime:
        def __init__(self, logger):
            if runtime_error is not None:
                raise runtime_error

        def deserialize_cuda_engine(self, data):
            if data != b"fake-plan":
                return None
            trt.plans.append(FakePlan(cuda, widths, max_batch, context_fails))
            return trt.plans[-1]

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(CU, "load_cudart", lambda: fake.lib)
    return fake


@pytest.fixture
def fake_trt(monkeypatch, cuda):
    def install(**kwargs):
        module = fake_tensorrt(cuda, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        return module
    return install


@pytest.fixture
def plan_file(tmp_path) -> Path:
    path = tmp_path / "fake.plan"
    path.write_bytes(b"fake-plan")
    return path


def _batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {C.AUDIO_INPUT: rng.standard_normal((rows, WIDTHS[C.AUDIO_INPUT])).astype(np.float32),
            C.IDS_INPUT: rng.integers(0, 100, (rows, WIDTHS[C.IDS_INPUT])),
            C.MASK_INPUT: rng.integers(0, 2, (rows, WIDTHS[C.MASK_INPUT]))}


def _model(plan_file, audio: int = WIDTHS[C.AUDIO_INPUT]) -> ModelFile:
    return ModelFile.for_shapes(plan_file, audio, WIDTHS[C.IDS_INPUT], LABELS)


def _engine(plan_file) -> T.TrtEngine:
    return T.TrtEngine(_model(plan_file))


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------- engine on the fake CUDA

def test_buffers_grow_from_batch_1_to_8_and_are_reused(cuda, fake_trt, plan_file):
    fake_trt()
    engine = _engine(plan_file)
    assert engine.max_batch == 8 and engine.name == "trt" and engine.providers == ["TensorRT"]
    for rows, allocs in ((1, 4), (8, 8), (1, 8), (8, 8)):  # 4 tensors: grow once, then reuse
        batch = _batch(rows, seed=rows)
        np.testing.assert_allclose(engine.infer(batch), fake_log_probs(batch), rtol=1e-6)
        assert cuda.allocs == allocs and len(cuda.live) == 4
    assert cuda.frees == 4 and cuda.violations == []
    assert all(p not in cuda.freed for p, _ in engine.buffers.values())
    engine.close()
    assert cuda.allocs == cuda.frees == 8 and not cuda.live and len(cuda.destroyed) == 1 and not cuda.streams
    assert cuda.violations == []


def test_malloc_failing_after_the_old_buffer_was_freed(cuda, fake_trt, plan_file):
    fake_trt()
    engine = _engine(plan_file)
    engine.infer(_batch(1))
    cuda.fail_malloc = True  # growing the first input: its old buffer is freed, the new malloc fails
    with pytest.raises(EngineError) as err:
        engine.infer(_batch(8))
    assert _one_line(err) == "CUDA cudaMalloc failed: out of memory (error 2)"
    assert all(p not in cuda.freed for p, _ in engine.buffers.values())  # no dangling pointer kept
    batch = _batch(2, seed=5)  # smaller than before: must not be handed the freed pointer
    np.testing.assert_allclose(engine.infer(batch), fake_log_probs(batch), rtol=1e-6)
    engine.close()
    assert cuda.violations == [] and cuda.allocs == cuda.frees and not cuda.live  # no double free, no leak


def test_close_releases_everything_once_and_refuses_infer(cuda, fake_trt, plan_file):
    fake_trt()
    engine = _engine(plan_file)
    engine.infer(_batch(3))
    engine.close()
    engine.close()
    assert len(cuda.destroyed) == 1 and cuda.allocs == cuda.frees == 4 and cuda.violations == []
    with pytest.raises(EngineError) as err:
        engine.infer(_batch(1))
    assert _one_line(err) == "the TensorRT engine is closed"


def test_close_reports_a_cuda_error_after_releasing_the_rest(cuda, fake_trt, plan_file):
    fake_trt()
    engine = _engine(plan_file)
    engine.infer(_batch(2))
    bad = engine.buffers[C.IDS_INPUT][0]
    cuda.fail_free.add(bad)
    with pytest.raises(EngineError, match="closing the TensorRT engine: CUDA cudaFree failed"):
        engine.close()
    assert list(cuda.live) == [bad] and len(cuda.destroyed) == 1 and engine.closed
    engine.close()  # nothing left to release: no second attempt on any handle
    assert cuda.frees == 3 and len(cuda.destroyed) == 1 and cuda.violations == []


def test_bad_batches_are_one_line_errors(cuda, fake_trt, plan_file):
    fake_trt()
    engine = _engine(plan_file)
    with pytest.raises(EngineError) as err:
        engine.infer(_batch(9))
    assert _one_line(err) == "batch of 9 exceeds the plan's max batch 8"
    uneven = _batch(2) | {C.MASK_INPUT: np.ones((3, WIDTHS[C.MASK_INPUT]), dtype=np.int64)}
    with pytest.raises(EngineError, match=r"batch sizes \[2, 3\]"):
        engine.infer(uneven)
    wrong = _batch(2) | {C.AUDIO_INPUT: np.zeros((2, 7), dtype=np.float32)}
    with pytest.raises(EngineError, match="rejected input shape"):
        engine.infer(wrong)
    assert cuda.allocs == 0  # refused before any device memory was touched
    engine.close()


def test_plan_problems_are_engine_errors(cuda, fake_trt, plan_file, tmp_path):
    fake_trt(context_fails=True)
    with pytest.raises(EngineError) as err:
        _engine(plan_file)
    assert "cannot create an execution context" in _one_line(err)
    fake_trt()
    bad = tmp_path / "other.plan"
    bad.write_bytes(b"built elsewhere")
    with pytest.raises(EngineError) as err:
        _engine(bad)
    assert "TensorRT 10.99.0 cannot deserialize the plan: a plan runs only on" in _one_line(err)
    with pytest.raises(EngineError, match=r"input 'audio' has shape \[None, 16\] in the model but \['batch', 17\]"):
        T.TrtEngine(_model(plan_file, audio=17))
    audio_only = _model(plan_file)
    audio_only = ModelFile(plan_file, audio_only.inputs[:1], audio_only.outputs)
    with pytest.raises(EngineError, match=r"the plan needs input\(s\) \['input_ids', 'attention_mask'\]"):
        T.TrtEngine(audio_only)
    assert not cuda.streams  # nothing was left open by the failed constructions


# ------------------------------------------------------------------------- choosing libcudart

def _libraries(monkeypatch, libs: dict[str, FakeCuda], prefer: int | None) -> None:
    monkeypatch.setattr(CU, "_library_names", lambda: list(libs))
    monkeypatch.setattr(CU, "_open_library", lambda name: libs[name].lib if name in libs else None)
    monkeypatch.setattr(CU, "_tensorrt_cuda_major", lambda: prefer)


def test_cudart_with_the_tensorrt_wheels_cuda_major_wins(monkeypatch):
    libs = {"libcudart.so.13": FakeCuda(13000), "libcudart.so.12": FakeCuda(12080), "missing.so": None}
    _libraries(monkeypatch, {k: v for k, v in libs.items() if v}, prefer=12)
    assert CU.load_cudart() is libs["libcudart.so.12"].lib
    _libraries(monkeypatch, {k: v for k, v in libs.items() if v}, prefer=None)
    assert CU.load_cudart() is libs["libcudart.so.13"].lib  # no wheel to go by: the first that works


def test_cudart_too_new_for_the_driver_falls_back_to_one_that_works(monkeypatch):
    libs = {"libcudart.so.13": FakeCuda(13000, device_status=35), "libcudart.so.12": FakeCuda(12080)}
    _libraries(monkeypatch, libs, prefer=13)
    assert CU.load_cudart() is libs["libcudart.so.12"].lib


def test_no_usable_cudart_is_one_line_naming_each_candidate(monkeypatch):
    libs = {"libcudart.so.13": FakeCuda(13000, device_status=35), "libcudart.so.12": FakeCuda(12080, devices=0)}
    _libraries(monkeypatch, libs, prefer=None)
    with pytest.raises(EngineError) as err:
        CU.load_cudart()
    msg = _one_line(err)
    assert "libcudart.so.13: CUDA 13.0 runtime needs driver >= 580.65" in msg and "supports CUDA 12.4" in msg
    assert "libcudart.so.12: CUDA 12.8 runtime: no CUDA device" in msg
    _libraries(monkeypatch, {}, prefer=None)
    with pytest.raises(EngineError, match="libcudart.*was not found"):
        CU.load_cudart()


# ------------------------------------------------------------------ Predictor on a plan artifact

@pytest.fixture
def plan_artifact(tmp_path) -> Path:
    """An audio-only trt artifact whose model.plan the fake TensorRT accepts."""
    art = tmp_path / "plan-artifact"
    art.mkdir()
    (art / "model.plan").write_bytes(b"fake-plan")
    inputs, outputs = C.io_spec(ART_WIDTHS[C.AUDIO_INPUT], WIDTHS[C.IDS_INPUT], LABELS)
    meta = {"format": C.FORMAT, "schema_version": C.SCHEMA_VERSION, "engine": "trt", "precision": "fp16",
            "model_file": "model.plan", "labels": list(C.LABELS), "sample_rate": 16000,
            "input_samples": ART_WIDTHS[C.AUDIO_INPUT], "max_tokens": WIDTHS[C.IDS_INPUT],
            "normalisation": {"do_normalize": True, "eps": 1e-7},
            "inputs": [i for i in inputs if i["name"] == C.AUDIO_INPUT], "outputs": outputs, "max_batch": 8,
            "files": {"model.plan": C.sha256_file(art / "model.plan")},
            "tensorrt": {"version": "10.99.0", "gpu": "Fake GPU", "compute_capability": "9.0"}}
    atomic_write_json(art / C.META_FILE, C.seal(meta))  # with its content digest, as export writes it
    return art


def test_predictor_without_tensorrt_is_one_engine_error_line(plan_artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(EngineError) as err:
        Predictor.load(plan_artifact, engine="trt")
    from dmf import install_hint

    assert _one_line(err) == f"tensorrt is not installed: `{install_hint('trt')}` (needs a CUDA GPU)"


def test_predictor_when_tensorrt_runtime_fails_is_one_engine_error_line(plan_artifact, fake_trt, cuda):
    fake_trt(runtime_error=TypeError("pybind11::init(): factory function returned nullptr"))
    with pytest.raises(EngineError) as err:
        Predictor.load(plan_artifact, engine="trt")
    assert _one_line(err) == ("TensorRT cannot create its runtime (TypeError: pybind11::init(): factory function "
                              "returned nullptr): no usable CUDA GPU, or a driver older than this TensorRT's CUDA")
    assert not cuda.streams and cuda.allocs == 0


def test_predictor_cli_shows_the_engine_error_as_one_line(plan_artifact, fake_trt, tmp_path):
    import soundfile as sf
    import typer
    from typer.testing import CliRunner

    from dmf.runtime.cli import register

    fake_trt(runtime_error=TypeError("pybind11::init(): factory function returned nullptr"))
    sf.write(tmp_path / "clip.wav", tone(1.0), 16000)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["predict", str(plan_artifact), "--audio", str(tmp_path / "clip.wav"),
                                      "--text", "unused by an audio-only model"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: TensorRT cannot create its runtime (TypeError" in " ".join(result.output.split())


def test_predictor_runs_a_plan_artifact_through_the_fake_gpu(plan_artifact, fake_trt, cuda):
    trt = fake_trt(widths=ART_WIDTHS)
    clips = [tone(1.0 + 0.1 * i, freq=200 + 30 * i) for i in range(10)]
    with Predictor.load(plan_artifact) as pred:
        assert pred.engine.name == "trt" and pred.max_batch == 8
        got = pred.predict_batch([(c, None, 16000) for c in clips])  # 10 > max batch 8: split 8 + 2
        arrays = [pred.preprocess(c, None, 16000) for c in clips]
    want = fake_log_probs({C.AUDIO_INPUT: np.stack([a[C.AUDIO_INPUT] for a in arrays])})
    np.testing.assert_allclose([p.log_probs for p in got], want, rtol=1e-5, atol=1e-6)
    assert trt.plans[0].contexts[0].batches[-2:] == [8, 2]
    assert cuda.allocs == cuda.frees and len(cuda.destroyed) == 1 and cuda.violations == []


# ------------------------------------------------------------------------------- export side

def test_trt_builder_failure_is_one_export_error_line(monkeypatch, tmp_path):
    from dmf.export import ExportError
    from dmf.export.tensorrt import build_engine

    def no_gpu(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.Logger, trt.Builder = "10.99.0", fake_tensorrt(FakeCuda()).Logger, no_gpu
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ExportError) as err:
        build_engine(tmp_path / "g.onnx", tmp_path / "m.plan", precision="fp16", max_batch=8, input_dims={})
    assert _one_line(err).startswith("TensorRT cannot create its builder (TypeError: pybind11::init(): factory")
    assert not (tmp_path / "m.plan").exists()


def test_profile_opt_batch_is_the_servers_default_batch():
    from dmf.export.tensorrt import profile_batches
    from dmf.runtime.server import GPU_MAX_BATCH, machine_defaults

    assert GPU_MAX_BATCH == 8 and machine_defaults({"running_engine": "trt", "providers": ["TensorRT"]}) == (1, 8)
    assert profile_batches(32) == (1, 8, 32) and profile_batches(4) == (1, 4, 4) and profile_batches(1) == (1, 1, 1)


def test_fp16_pins_only_float_outputs_to_fp32():
    from dmf.export.tensorrt import pin_fp32

    trt = types.SimpleNamespace(float32="f32", float16="f16", int64="i64", int32="i32",
                                LayerType=types.SimpleNamespace(NORMALIZATION="norm", SOFTMAX="softmax",
                                                                REDUCE="reduce", MATRIX_MULTIPLY="mm"))

    class Layer:
        def __init__(self, kind, *outputs):
            self.type, self.outs, self.precision, self.set = kind, outputs, None, {}
            self.num_outputs = len(outputs)

        def get_output(self, j):
            dtype, shape = self.outs[j]
            return types.SimpleNamespace(dtype=dtype, is_shape_tensor=shape)

        def set_output_type(self, j, dtype):
            self.set[j] = dtype

    layers = [Layer("norm", ("f32", False)), Layer("softmax", ("f16", False)), Layer("reduce", ("f32", False)),
              Layer("reduce", ("i64", False)), Layer("reduce", ("i32", True)), Layer("reduce", ("f32", True)),
              Layer("mm", ("f32", False))]
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert pin_fp32(trt, network) == 3
    assert [lay.precision for lay in layers] == ["f32", "f32", "f32", None, None, None, None]
    assert [lay.set for lay in layers] == [{0: "f32"}] * 3 + [{}] * 4


def _export_wiring(monkeypatch, plan_file, precision: str, version: str = "10.99.0"):
    """pipeline._tensorrt with the build faked: what build_engine got, and the _opcheck calls."""
    from dmf.export import pipeline
    from dmf.export import tensorrt as ET

    seen = {"opcheck": []}

    def build(source, plan, **kwargs):
        seen.update(source=Path(source), **kwargs)
        shutil.copyfile(plan_file, plan)
        return Path(plan)

    monkeypatch.setattr(ET, "build_engine", build)
    target = {"version": version, "gpu": "Fake GPU", "compute_capability": "9.0"}
    monkeypatch.setattr(ET, "build_target", lambda: target)
    monkeypatch.setattr(pipeline, "_opcheck", lambda path, what, extra_allowed=(): seen["opcheck"].append(what))
    options = pipeline.ExportOptions(engine="trt", precision=precision, max_batch=4)
    cfg = types.SimpleNamespace(max_audio_samples=WIDTHS[C.AUDIO_INPUT], max_tokens=WIDTHS[C.IDS_INPUT],
                                num_labels=LABELS)
    return pipeline, options, cfg, seen


def _report():
    """The parity report as _build hands it to the engine step (fp32 graph verified on ONNX Runtime)."""
    from dmf.export.artifact import ParityReport

    return ParityReport(samples=2, max_abs_diff=0.0, argmax_agreement=1.0, fp32_max_abs_diff=0.0,
                        fp32_argmax_agreement=1.0, inputs={}, tolerance=1e-4)


def _trt_job(pipeline, tmp_path, feeds, reference, options, cfg, parity=None):
    """The export job record _tensorrt takes (no real clips: reduced precisions are not gated)."""
    return pipeline._Job(tmp_path / "fp32.onnx", tmp_path, feeds, reference, options, cfg, parity or _report(), None)


def test_export_verifies_the_plan_through_the_runtime_engine(monkeypatch, cuda, fake_trt, plan_file, tmp_path):
    from dmf.export import ExportError
    from dmf.export.artifact import manifest

    trt = fake_trt(max_batch=4)
    pipeline, options, cfg, seen = _export_wiring(monkeypatch, plan_file, "fp32")
    feeds, parity = _batch(6, seed=3), _report()
    plan = pipeline._tensorrt(_trt_job(pipeline, tmp_path, feeds, fake_log_probs(feeds), options, cfg, parity))
    assert plan == tmp_path / "model.plan" and seen["source"] == tmp_path / "fp32.onnx" and seen["max_batch"] == 4
    assert seen["input_dims"] == {n: (w,) for n, w in WIDTHS.items()}
    assert [c.batches for c in trt.plans[0].contexts] == [[4, 2, 1, 1, 1, 1, 1, 1]]  # whole (max 4), then batch 1
    assert parity.checked_with == "tensorrt" and parity.argmax_agreement == 1.0
    assert parity.max_abs_diff < 1e-6
    assert cuda.allocs == cuda.frees and len(cuda.destroyed) == 1 and cuda.violations == []  # engine closed
    from dmf.config import preset

    meta = manifest(model_config=preset("tiny").model, engine="trt", precision="fp32", max_batch=4,
                    checkpoint=tmp_path, checkpoint_sha256="0", files={}, parity=parity)
    assert meta["tensorrt"] == {"version": "10.99.0", "gpu": "Fake GPU", "compute_capability": "9.0"}
    assert "tensorrt" not in manifest(model_config=preset("tiny").model, engine="onnx", precision="fp32",
                                      max_batch=4, checkpoint=tmp_path, checkpoint_sha256="0", files={},
                                      parity=_report())
    with pytest.raises(ExportError) as err:  # a plan that disagrees with the reference is refused
        pipeline._tensorrt(_trt_job(pipeline, tmp_path, feeds, fake_log_probs(feeds) + 1e-3, options, cfg))
    assert _one_line(err).startswith("TensorRT fp32 export failed verification: max abs diff 1.0e-03")


def test_export_fp16_on_tensorrt_11_op_checks_the_fp16_graph(monkeypatch, cuda, fake_trt, plan_file, tmp_path):
    from dmf.export import optimize

    fake_trt(max_batch=4, version="11.1.0")
    pipeline, options, cfg, seen = _export_wiring(monkeypatch, plan_file, "fp16", version="11.1.0")
    monkeypatch.setattr(optimize, "convert_fp16", lambda src, dst: Path(dst))
    feeds, parity = _batch(2), _report()
    pipeline._tensorrt(_trt_job(pipeline, tmp_path, feeds, fake_log_probs(feeds), options, cfg, parity))
    assert seen["source"] == tmp_path / "fp16.onnx" and seen["opcheck"] == ["fp16 graph"]
    assert seen["precision"] == "fp16"
    # no real clips given: the plan ships, and dmf.json says in one line that it was not gated
    assert parity.accuracy_gate == {"gated": False, "reason": pipeline.NOT_GATED} and parity.tolerance is None


def test_make_test_gpu_stops_before_installing_without_a_cuda_device(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv-gpu"
    proc = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), "test-gpu", "NVIDIA_SMI=false",
                           f"GPU_VENV={venv}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and not venv.exists() and proc.stdout == ""
    ours = [line for line in proc.stderr.splitlines() if not line.startswith(("make:", "make["))]
    assert ours == ["make test-gpu: no CUDA device (false -L lists no GPU); nothing installed, nothing run"]


def test_required_gpu_tests_that_cannot_run_fail_the_run():
    from gpu_skip import skip_reason

    if skip_reason("gpu") is None and skip_reason("trt") is None:
        pytest.skip("the gpu and trt tests can run here: nothing to refuse")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or trt",
                           str(Path(__file__))], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DMF_REQUIRE_GPU": "1"})
    assert proc.returncode not in (0, 5), proc.stdout[-2000:]
    assert "DMF_REQUIRE_GPU=1 but tests/test_trt.py::" in proc.stdout + proc.stderr


# ----------------------------------------------------------------- on a GPU (make test-gpu)

def _probs(pred) -> np.ndarray:
    return np.array(list(pred.probabilities.values()))


@pytest.mark.gpu
def test_cuda_runtime_round_trip_on_the_gpu():
    cuda = CU.CudaRuntime()
    stream = cuda.stream()
    host = np.arange(4096, dtype=np.float32)
    back = np.zeros_like(host)
    ptr = cuda.malloc(host.nbytes)
    cuda.copy(ptr, host.ctypes.data, host.nbytes, cuda.H2D, stream)
    cuda.copy(back.ctypes.data, ptr, host.nbytes, cuda.D2H, stream)
    cuda.sync(stream)
    cuda.free(ptr)
    cuda.destroy_stream(stream)
    np.testing.assert_array_equal(back, host)


@pytest.mark.gpu
def test_ort_cuda_provider_matches_cpu(rt, predictor):
    gpu = Predictor.load(rt.artifact, providers="cuda")
    assert gpu.engine.providers[0] == "CUDAExecutionProvider"
    for i in range(4):
        a, b = gpu.predict(rt.clips[f"good{i}.wav"], TEXTS[i]), predictor.predict(rt.clips[f"good{i}.wav"], TEXTS[i])
        assert a.label == b.label
        np.testing.assert_allclose(_probs(a), _probs(b), atol=1e-3)


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_plan_is_verified_recorded_and_matches_onnx(precision, rt, predictor, tmp_path):
    import tensorrt

    from dmf.export import export_checkpoint

    if rt.checkpoint is None:
        pytest.skip("no checkpoint to export a plan from (DMF_TEST_ARTIFACT without DMF_TEST_CHECKPOINT)")
    out = export_checkpoint(rt.checkpoint, tmp_path / "plan", engine="trt", precision=precision, max_batch=8,
                            triton_dir=tmp_path / "tri")
    meta = json.loads((out / "dmf.json").read_text())
    assert meta["model_file"] == "model.plan" and meta["parity"]["checked_with"] == "tensorrt"
    assert (tmp_path / "tri" / "dmf_model" / "1" / "model.plan").is_file()
    assert 'platform: "tensorrt_plan"' in (tmp_path / "tri" / "dmf_model" / "config.pbtxt").read_text()
    assert meta["parity"]["argmax_agreement"] == 1.0 and meta["tensorrt"]["version"] == tensorrt.__version__
    items = [(rt.clips[f"good{i}.wav"], TEXTS[i]) for i in range(8)]
    items += items[:2]  # 10 > max batch 8: the predictor splits it
    atol = 1e-3 if precision == "fp32" else 5e-2
    with Predictor.load(out) as trt_pred:
        assert trt_pred.engine.name == "trt" and trt_pred.max_batch == 8
        one = trt_pred.predict(*items[0])  # batch 1, then 8 and 2: the device buffers grow, then are reused
        many = trt_pred.predict_batch(items)
        engine = trt_pred.engine
    want = predictor.predict_batch(items)
    np.testing.assert_allclose(_probs(one), _probs(want[0]), atol=atol)
    for a, b in zip(many, want):
        assert precision == "fp16" or a.label == b.label
        np.testing.assert_allclose(_probs(a), _probs(b), atol=atol)
    with pytest.raises(EngineError, match="closed"):
        engine.infer({n: np.zeros((1, 1)) for n in engine.inputs})
