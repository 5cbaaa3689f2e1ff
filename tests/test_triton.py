"""dmf.export.triton: the Triton model repository (preprocess + model + postprocess + ensemble).

No Triton server runs here. Instead: every config.pbtxt is parsed with Triton's own schema
(tritonclient's model_config_pb2), the ensemble's steps are checked the way Triton's loader checks
them, and the Python-backend model.py runs against a stand-in of `triton_python_backend_utils`
(the parts of its API the model uses), compared with dmf.runtime on the same bytes and text.
The artifact is conftest_runtime's tiny export (one per session).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import triton_backend_stub
from conftest_runtime import ACCEPTED, BAD_AUDIO, BAD_TEXT, TEXTS, predictor, rt  # noqa: F401

from dmf import contract as C
from dmf.export import ExportError
from dmf.export import triton as T
from dmf.runtime import INPUT_ERRORS

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- Triton stand-ins
@functools.lru_cache(maxsize=1)
def schema():
    """tritonclient's model_config_pb2, loaded by path: it needs protobuf only, not grpcio."""
    tritonclient = pytest.importorskip("tritonclient", reason="tritonclient is not installed (pip install -e '.[dev]')")
    spec = importlib.util.spec_from_file_location(
        "triton_model_config_pb2", Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(entry: Path):
    from google.protobuf import text_format

    return text_format.Parse((entry / "config.pbtxt").read_text(), schema().ModelConfig())


@pytest.fixture
def pb(monkeypatch):
    module = triton_backend_stub.module()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def load_python_model(entry: Path):
    """Load <entry>/1/model.py and run its initialize() with the args Triton passes."""
    from google.protobuf import json_format

    config = parse(entry)
    spec = importlib.util.spec_from_file_location(f"triton_entry_{entry.name}", entry / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
                      "model_instance_kind": "CPU", "model_instance_device_id": "0",
                      "model_repository": str(entry), "model_version": "1", "model_name": entry.name})
    return model


def strings(*values) -> np.ndarray:
    """A TYPE_STRING tensor of shape (B, 1) as Triton hands it to the Python backend: bytes objects."""
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=np.object_)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def repo(rt, tmp_path_factory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("triton") / "models"
    T.write_repository(rt.artifact, root, name="dmf")
    return root


@pytest.fixture
def preprocess(repo, pb):
    return load_python_model(repo / "dmf_preprocess")


@pytest.fixture
def postprocess(repo, pb):
    return load_python_model(repo / "dmf_postprocess")


def meta(rt) -> dict:  # noqa: F811
    return json.loads((rt.artifact / C.META_FILE).read_text())


# ------------------------------------------------------------------------------------ layout, schema
def test_repository_holds_four_self_contained_entries(repo, rt):  # noqa: F811
    assert sorted(p.name for p in repo.iterdir()) == ["dmf", "dmf_model", "dmf_postprocess", "dmf_preprocess"]
    assert (repo / "dmf_model" / "1" / "model.onnx").read_bytes() == (rt.artifact / "model.onnx").read_bytes()
    assert (repo / "dmf_model" / "labels.txt").read_text().split() == meta(rt)["labels"]
    copies = {"model.py": REPO_ROOT / "export" / "triton_model.py", C.META_FILE: rt.artifact / C.META_FILE,
              "dmf/contract.py": REPO_ROOT / "dmf" / "contract.py"}
    for entry in ("dmf_preprocess", "dmf_postprocess"):
        for name, source in copies.items():
            assert (repo / entry / "1" / name).read_bytes() == source.read_bytes(), (entry, name)
    pre = repo / "dmf_preprocess" / "1"
    assert (pre / C.TOKENIZER_FILE).read_bytes() == (rt.artifact / C.TOKENIZER_FILE).read_bytes()
    assert (pre / "dmf" / "preprocess.py").read_bytes() == (REPO_ROOT / "dmf" / "preprocess.py").read_bytes()
    assert sorted(p.name for p in (pre / "dmf").iterdir()) == ["__init__.py", "contract.py", "preprocess.py"]
    assert list((repo / "dmf" / "1").iterdir()) == []  # an ensemble's version folder is empty
    assert not [p for p in repo.parent.rglob(".*")]  # no staging folder left behind


def _tensors(items) -> list[tuple[str, str, list[int]]]:
    pb2 = schema()
    return [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in items]


def test_every_config_parses_with_tritons_schema(repo, rt):  # noqa: F811
    spec = meta(rt)
    configs = {entry.name: parse(entry) for entry in repo.iterdir()}
    assert {name: c.name for name, c in configs.items()} == {name: name for name in configs}
    assert {c.max_batch_size for c in configs.values()} == {spec["max_batch"]}
    model, pre, post, ens = (configs[n] for n in ("dmf_model", "dmf_preprocess", "dmf_postprocess", "dmf"))
    assert model.platform == "onnxruntime_onnx" and pre.backend == post.backend == "python"
    assert ens.platform == "ensemble" and ens.WhichOneof("scheduling_choice") == "ensemble_scheduling"
    for config in (model, pre, post):  # an ensemble cannot batch (a oneof); its steps do
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert list(config.dynamic_batching.preferred_batch_size)[-1] == spec["max_batch"]
    model_inputs = [(e["name"], T.TRITON_TYPES[e["dtype"]], e["shape"][1:]) for e in spec["inputs"]]
    assert _tensors(model.input) == _tensors(pre.output) == model_inputs
    raw = [("AUDIO", "TYPE_STRING", [1]), ("TEXT", "TYPE_STRING", [1])]
    assert _tensors(pre.input) == _tensors(ens.input) == raw
    assert _tensors(ens.output) == _tensors(model.output) + _tensors(post.output)
    assert _tensors(post.output) == [("label", "TYPE_STRING", [1])]
    assert model.output[0].label_filename == "labels.txt"
    assert pre.parameters["dmf_step"].string_value == "preprocess"
    assert post.parameters["dmf_step"].string_value == "postprocess"


def check_ensemble(configs: dict, name: str) -> None:
    """What Triton's loader checks (core/src/ensemble_utils.cc), stricter on order: each step's model
    exists and batches at least as far; every input is mapped once from a tensor an earlier step
    (or the request) made, with its type and dims; outputs map from real outputs, each tensor made
    once; every ensemble output is made, with the declared type and dims."""
    ensemble = configs[name]
    declared = {t.name: (t.data_type, list(t.dims)) for t in ensemble.output}
    made = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert model.max_batch_size >= ensemble.max_batch_size, step.model_name
        inputs = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        assert set(step.input_map) == set(inputs), (step.model_name, "inputs mapped")
        for key, tensor in step.input_map.items():
            assert made.get(tensor) == inputs[key], (step.model_name, key, tensor)
        outputs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        for key, tensor in step.output_map.items():
            assert key in outputs and tensor not in made, (step.model_name, key, tensor)
            assert declared.get(tensor, outputs[key]) == outputs[key], (step.model_name, tensor)
            made[tensor] = outputs[key]
    assert set(declared) <= set(made), "ensemble outputs not produced"


def test_ensemble_steps_connect_existing_tensors(repo):
    configs = {entry.name: parse(entry) for entry in repo.iterdir()}
    check_ensemble(configs, "dmf")
    assert [s.model_name for s in configs["dmf"].ensemble_scheduling.step] == [
        "dmf_preprocess", "dmf_model", "dmf_postprocess"]

    # the check can fail: a renamed model input, a wrong type, a missing producer
    broken = parse(repo / "dmf_model")
    broken.input[1].name = "token_ids"
    with pytest.raises(AssertionError, match="inputs mapped"):
        check_ensemble({**configs, "dmf_model": broken}, "dmf")
    broken = parse(repo / "dmf_preprocess")
    broken.output[0].data_type = schema().TYPE_FP16
    with pytest.raises(AssertionError, match="audio"):
        check_ensemble({**configs, "dmf_preprocess": broken}, "dmf")
    broken = parse(repo / "dmf")
    del broken.ensemble_scheduling.step[2]
    with pytest.raises(AssertionError, match="not produced"):
        check_ensemble({**configs, "dmf": broken}, "dmf")


def test_bare_repository_is_the_model_entry_alone(rt, tmp_path):  # noqa: F811
    entries = T.write_repository(rt.artifact, tmp_path / "models", name="emo", bare=True)
    assert entries == [tmp_path / "models" / "emo"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["emo"]
    config = parse(entries[0])
    assert config.name == "emo" and config.platform == "onnxruntime_onnx"
    assert [t.name for t in config.input] == list(C.INPUT_NAMES) and config.output[0].name == C.OUTPUT_NAME
    assert (entries[0] / "1" / "model.onnx").is_file() and (entries[0] / "labels.txt").is_file()


def test_existing_entries_need_force_and_bad_input_is_one_line(rt, tmp_path):  # noqa: F811
    models = tmp_path / "models"
    T.write_repository(rt.artifact, models)
    (models / "dmf_preprocess" / "stale.txt").write_text("old")
    with pytest.raises(ExportError, match=r"dmf_model exists \(use --force to replace it\)"):
        T.write_repository(rt.artifact, models)
    T.write_repository(rt.artifact, models, force=True)
    assert not (models / "dmf_preprocess" / "stale.txt").exists()
    assert sorted(p.name for p in models.iterdir()) == ["dmf", "dmf_model", "dmf_postprocess", "dmf_preprocess"]

    with pytest.raises(ExportError, match="Triton model name '../x' must match"):
        T.write_repository(rt.artifact, tmp_path / "other", name="../x")
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(rt.artifact, tampered)
    (tampered / C.TOKENIZER_FILE).write_text("{}")
    with pytest.raises(ExportError) as info:
        T.write_repository(tampered, tmp_path / "other")
    assert "sha256 does not match" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "other").exists() or list((tmp_path / "other").iterdir()) == []


def _hidden(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if p.name.startswith("."))


def test_a_killed_export_leaves_nothing_triton_would_load(rt, tmp_path):  # noqa: F811
    """Staged entries live beside the repository: an export stopped before its commit leaves no
    folder in the repository (Triton loads dot-folders too, and one half-written stops it), and a
    failed one cleans up beside it as well."""
    repo = tmp_path / "models"
    staged = T.stage_repository(rt.artifact, repo)  # as if killed here, before commit or discard
    assert list(repo.iterdir()) == []
    assert all(staging.parent == tmp_path for staging, _ in staged.entries)
    staged.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    staged = T.stage_repository(rt.artifact, repo)
    staged.commit()
    assert sorted(p.name for p in repo.iterdir()) == ["dmf", "dmf_model", "dmf_postprocess", "dmf_preprocess"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "fallback"])
def test_force_swaps_each_entry_without_a_folder_in_the_repository(rt, tmp_path, monkeypatch, atomic):  # noqa: F811
    """--force over an existing repository: with the atomic exchange no entry is ever missing
    (nothing moves an existing entry away); without it (another OS), the old entry goes beside the
    repository, never into it. A polling Triton sees no dot-folder either way."""
    import os

    repo = tmp_path / "models"
    T.write_repository(rt.artifact, repo)
    entries = {p.name for p in repo.iterdir()}
    moved_away, seen_hidden = [], []
    real_replace = os.replace

    def spy(src, dst):
        if Path(src).parent == repo and Path(src).name in entries:
            moved_away.append(Path(src).name)
        real_replace(src, dst)
        seen_hidden.extend(_hidden(repo))

    monkeypatch.setattr(os, "replace", spy)
    if not atomic:
        monkeypatch.setattr(T, "_exchange", lambda a, b: False)
    T.write_repository(rt.artifact, repo, force=True)
    assert seen_hidden == [] and _hidden(repo) == []
    assert {p.name for p in repo.iterdir()} == entries and sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    if atomic and sys.platform.startswith("linux"):
        assert moved_away == []  # renameat2 swapped each entry in one step
    else:
        assert sorted(moved_away) == sorted(entries)


def test_a_repository_on_its_own_filesystem_is_refused_in_one_line(rt, tmp_path, monkeypatch):  # noqa: F811
    import os

    repo = tmp_path / "models"
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # the repository as a mount point: another device than its parent
        result = real_stat(path, *args, **kwargs)
        if Path(path) == repo:
            return os.stat_result((*result[:2], result.st_dev + 1, *result[3:]))
        return result

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(ExportError) as info:
        T.write_repository(rt.artifact, repo)
    assert "is a mount point" in str(info.value) and "\n" not in str(info.value)
    assert list(repo.iterdir()) == []


def test_export_refuses_an_existing_entry_before_building(rt, tmp_path):  # noqa: F811
    if rt.checkpoint is None:
        pytest.skip("DMF_TEST_ARTIFACT given without DMF_TEST_CHECKPOINT")
    from dmf.export import export_checkpoint

    (tmp_path / "models" / "dmf_postprocess").mkdir(parents=True)
    with pytest.raises(ExportError, match="dmf_postprocess exists"):
        export_checkpoint(rt.checkpoint, tmp_path / "out", triton_dir=tmp_path / "models")
    assert not (tmp_path / "out").exists()
    (tmp_path / "models" / "dmf").mkdir()  # the bare entry is NAME itself
    with pytest.raises(ExportError, match="models/dmf exists"):
        export_checkpoint(rt.checkpoint, tmp_path / "out", triton_dir=tmp_path / "models", triton_bare=True)
    assert not (tmp_path / "out").exists()


def test_cli_passes_the_triton_options(rt, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    import dmf.export.pipeline as pipeline
    from dmf.cli import app

    seen = {}

    def fake_export(checkpoint, out, options, **kwargs):
        seen.update(vars(options))
        return rt.artifact

    monkeypatch.setattr(pipeline, "export_checkpoint", fake_export)
    result = CliRunner().invoke(app, ["export", "ckpt", "--out", "out", "--triton", "models", "--triton-name", "emo",
                                      "--triton-bare"])
    assert result.exit_code == 0, result.output
    assert seen["triton_dir"] == Path("models") and seen["triton_name"] == "emo" and seen["triton_bare"] is True
    assert "Triton model models/emo" in result.output
    CliRunner().invoke(app, ["export", "ckpt", "--out", "out", "--triton", "models"])
    assert seen["triton_bare"] is False and seen["triton_name"] == "dmf"


# ------------------------------------------------------------------------------ preprocess execute
def _request(pb, audio: list, text: list):
    return pb.InferenceRequest([pb.Tensor("AUDIO", strings(*audio)), pb.Tensor("TEXT", strings(*text))])


def _expected(predictor, items) -> dict[str, np.ndarray] | str:  # noqa: F811
    """dmf.runtime's arrays for a list of (audio bytes, text), or the error message the runtime gives."""
    arrays = []
    for i, (audio, text) in enumerate(items):
        try:
            arrays.append(predictor.preprocess(audio, text))
        except INPUT_ERRORS as exc:
            return f"items[{i}]: {exc}" if len(items) > 1 else str(exc)
    return {name: np.stack([a[name] for a in arrays]) for name in C.INPUT_NAMES}


def _cases(rt) -> list[list[tuple[bytes, object]]]:  # noqa: F811
    """Requests (each a list of items) mixing good and bad ones, every bad kind of conftest_runtime."""
    clip = {name: path.read_bytes() for name, path in rt.clips.items()}
    good = [[(clip[f"good{i}.wav"], TEXTS[i])] for i in range(4)]
    accepted = [[(clip[name], text)] for name, text in ACCEPTED.values()]
    bad = [[(clip[name], text)] for name, text, _ in {**BAD_AUDIO, **BAD_TEXT}.values()]
    both_bad = [[(clip["notaudio.wav"], "")]]  # the text is checked first, as in the runtime
    multi = [[(clip["good4.wav"], TEXTS[4]), (clip["good5.wav"], b"utf-8 bytes \xc3\xa9")],
             [(clip["good6.wav"], TEXTS[6]), (clip["truncated.wav"], TEXTS[7])]]
    mixed = []
    for i in range(max(len(good), len(bad), len(accepted))):
        mixed += good[i:i + 1] + bad[i:i + 1] + accepted[i:i + 1]
    return mixed + bad[len(good):] + both_bad + multi


def test_preprocess_execute_equals_the_runtime_per_request(preprocess, pb, predictor, rt):  # noqa: F811
    cases = _cases(rt)
    responses = preprocess.execute([_request(pb, [a for a, _ in items], [t for _, t in items]) for items in cases])
    assert len(responses) == len(cases)
    n_ok = n_bad = 0
    for items, response in zip(cases, responses):
        want = _expected(predictor, items)
        if isinstance(want, str):
            n_bad += 1
            assert response.has_error() and response.output_tensors() == []
            assert response.error().message() == want and "\n" not in want
            assert response.error().code() == pb.TritonError.INVALID_ARG
            continue
        n_ok += 1
        assert not response.has_error(), response.error().message()
        for name in C.INPUT_NAMES:
            got = pb.get_output_tensor_by_name(response, name).as_numpy()
            assert got.dtype == want[name].dtype and got.shape == (len(items),) + want[name].shape[1:]
            assert np.array_equal(got, want[name]), name  # bit-equal to dmf.runtime
    assert n_ok >= 10 and n_bad >= 12


def test_preprocess_malformed_requests_fail_alone(preprocess, pb, rt):  # noqa: F811
    good = rt.clips["good0.wav"].read_bytes()
    ok = _request(pb, [good], ["hello there"])
    requests = [
        pb.InferenceRequest([pb.Tensor("AUDIO", strings(good))]),  # no TEXT
        _request(pb, [good, good], ["one transcript"]),
        pb.InferenceRequest([pb.Tensor("AUDIO", np.array([[str(rt.clips["good0.wav"])]], dtype=np.object_)),
                             pb.Tensor("TEXT", strings("a str path, never opened as a file"))]),
        ok,
        _request(pb, [good], ["boom"]),
    ]
    original = preprocess.step.arrays

    def failing(audio, text):  # an unforeseen failure inside one request
        if text == b"boom":
            raise RuntimeError("kaput\nsecond line")
        return original(audio, text)

    preprocess.step.arrays = failing
    responses = preprocess.execute(requests)
    messages = [r.error().message() if r.has_error() else None for r in responses]
    assert messages == ["TEXT: missing input",
                        "AUDIO has 2 items and TEXT 1: expected one transcript per clip",
                        "audio: expected the bytes of an audio file, got str",
                        None,
                        "internal error: RuntimeError: kaput"]
    assert responses[4].error().code() == pb.TritonError.INTERNAL
    assert pb.get_output_tensor_by_name(responses[3], "audio").as_numpy().shape == (1, meta(rt)["input_samples"])


# ------------------------------------------------------------------------------ postprocess, ensemble
def test_postprocess_labels_equal_the_runtime(postprocess, pb, predictor):  # noqa: F811
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, len(predictor.labels))).astype(np.float32) for n in (1, 5, 16)]
    responses = postprocess.execute([pb.InferenceRequest([pb.Tensor("log_probs", rows)]) for rows in batches]
                                    + [pb.InferenceRequest([pb.Tensor("log_probs", np.zeros((2, 3), np.float32))])])
    for rows, response in zip(batches, responses):
        got = pb.get_output_tensor_by_name(response, "label").as_numpy()
        assert got.shape == (len(rows), 1) and got.dtype == np.object_
        assert [v.decode() for v in got[:, 0]] == [predictor.postprocess(row).label for row in rows]
    assert responses[-1].error().message() == "log_probs has shape [2, 3]: expected [batch, 4]"

    nan = batches[1].copy()
    nan[3, 2] = np.nan
    (response,) = postprocess.execute([pb.InferenceRequest([pb.Tensor("log_probs", nan)])])
    assert response.has_error() and response.error().message().startswith("items[3]: the model's scores")
    try:  # the runtime refuses such a row too (ResultError), with the same message
        predictor.postprocess(nan[3])
    except ValueError as exc:
        assert response.error().message() == f"items[3]: {exc}"


def run_ensemble(repo: Path, models: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Route one request through the ensemble config's steps, as Triton's ensemble scheduler does."""
    ensemble = parse(repo / "dmf")
    tensors = dict(inputs)
    for step in ensemble.ensemble_scheduling.step:
        outputs = models[step.model_name]({key: tensors[value] for key, value in step.input_map.items()})
        tensors.update({value: outputs[key] for key, value in step.output_map.items()})
    return {t.name: tensors[t.name] for t in ensemble.output}


def test_ensemble_end_to_end_equals_predictor(repo, preprocess, postprocess, pb, predictor, rt):  # noqa: F811
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(repo / "dmf_model" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    def python_step(model):
        def run(feed):
            (response,) = model.execute([pb.InferenceRequest([pb.Tensor(k, v) for k, v in feed.items()])])
            assert not response.has_error(), response.error().message()
            return {t.name(): t.as_numpy() for t in response.output_tensors()}
        return run

    models = {"dmf_preprocess": python_step(preprocess), "dmf_postprocess": python_step(postprocess),
              "dmf_model": lambda feed: dict(zip(["log_probs"], session.run(None, feed)))}
    clips = [rt.clips[f"good{i}.wav"].read_bytes() for i in range(3)]
    out = run_ensemble(repo, models, {"AUDIO": strings(*clips), "TEXT": strings(*TEXTS[:3])})
    want = predictor.predict_batch(list(zip(clips, TEXTS[:3])))
    np.testing.assert_allclose(out["log_probs"], [p.log_probs for p in want], atol=1e-5)
    assert [v.decode() for v in out["label"][:, 0]] == [predictor.postprocess(r).label for r in out["log_probs"]]


# ------------------------------------------------------------------------- shipped code, no dmf install
def _dmf_imports(path: Path) -> set[str]:
    """The dmf modules a source file imports (dmf.x and `from dmf import x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dmf.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dmf"):
            found |= {node.module} if node.module != "dmf" else {f"dmf.{a.name}" for a in node.names}
    return found


def test_shipped_modules_are_all_that_preprocess_imports():
    """The entry ships dmf/contract.py and dmf/preprocess.py; if dmf.preprocess ever imports more of
    dmf, SHIPPED_MODULES must grow (or the server would need a dmf install)."""
    shipped = {f"dmf.{Path(m).stem}" for m in T.SHIPPED_MODULES["preprocess"]}
    for module in shipped:
        assert _dmf_imports(REPO_ROOT / "dmf" / f"{module.split('.')[1]}.py") <= shipped, module
    assert _dmf_imports(REPO_ROOT / "export" / "triton_model.py") == set()  # model.py loads the copies by path
    assert T.SHIPPED_MODULES["postprocess"] == ("contract.py",)


def test_preprocess_entry_runs_without_dmf_or_torch(repo, rt, predictor, tmp_path):  # noqa: F811
    """model.py in a fresh Python where dmf cannot be imported: the shipped copies do the work,
    torch is never imported, and the numbers equal dmf.runtime's."""
    from google.protobuf import json_format

    entry = repo / "dmf_preprocess"
    (tmp_path / "config.json").write_text(json_format.MessageToJson(parse(entry), preserving_proto_field_name=True))
    good, bad = rt.clips["good2.wav"], rt.clips["notaudio.wav"]
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        import numpy as np
        # no dmf: drop the editable-install finder and any path holding a dmf package
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]
        sys.path[:] = [p for p in sys.path if p and not __import__("os").path.isdir(p + "/dmf")]
        if importlib.util.find_spec("dmf") is not None:
            print(json.dumps({{"skip": "dmf is still importable"}})); sys.exit(0)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import triton_backend_stub
        pb = sys.modules["triton_python_backend_utils"] = triton_backend_stub.module()
        spec = importlib.util.spec_from_file_location("model", {str(entry / "1" / "model.py")!r})
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize({{"model_config": open("config.json").read(), "model_version": "1"}})
        clips = [open({str(good)!r}, "rb").read(), open({str(bad)!r}, "rb").read()]
        request = lambda a, t: pb.InferenceRequest([pb.Tensor("AUDIO", np.array([[a]], dtype=object)),
                                                    pb.Tensor("TEXT", np.array([[t]], dtype=object))])
        ok, err = model.execute([request(clips[0], b"hello there"), request(clips[1], b"hello")])
        np.savez("out.npz", **{{t.name(): t.as_numpy() for t in ok.output_tensors()}})
        print(json.dumps({{"error": err.error().message(), "torch": "torch" in sys.modules,
                          "dmf": sorted(k for k in sys.modules if k.split(".")[0] == "dmf"),
                          "from": sys.modules["dmf.preprocess"].__file__}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    assert report["dmf"] == ["dmf", "dmf.contract", "dmf.preprocess"] and not report["torch"]
    assert report["from"] == str(entry / "1" / "dmf" / "preprocess.py")
    with pytest.raises(INPUT_ERRORS) as info:
        predictor.preprocess(bad.read_bytes(), "hello")
    assert report["error"] == str(info.value)
    got, want = np.load(tmp_path / "out.npz"), predictor.preprocess(good.read_bytes(), "hello there")
    for name in C.INPUT_NAMES:
        assert np.array_equal(got[name], want[name][None]), name


def test_the_onnx_model_is_stamped_for_older_triton_releases(repo, rt):  # noqa: F811
    """IR 9 (ONNX 1.15) and only the default opset 20: Triton's ONNX Runtime backend before 24.06
    (onnxruntime < 1.18) refuses IR 10, which torch and onnxruntime write; the stamped graph still
    answers as the runtime's."""
    onnx = pytest.importorskip("onnx")
    from dmf.export.onnx_export import IR_VERSION, OPSET

    for path in (rt.artifact / "model.onnx", repo / "dmf_model" / "1" / "model.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        assert model.ir_version == IR_VERSION == 9, path
        assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)], path
        onnx.checker.check_model(model)
