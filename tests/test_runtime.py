"""dmf.runtime: artifact validation, Predictor, engines, MicroBatcher, `dmf predict`, the docs' example.

One tiny exported artifact per session (conftest_runtime)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest_runtime import ACCEPTED, BAD_AUDIO, BAD_TEXT, TEXTS, predictor, rt, tone  # noqa: F401
from conftest_runtime import run_cli as _invoke

from dmf.preprocess import AudioError, TextEncoder, TextError, preprocess_audio
from dmf.runtime import (ArtifactError, EngineError, InputError, MicroBatcher, Prediction, Predictor,
                         load_artifact)
from dmf.runtime.batcher import BatcherClosed
from dmf.runtime.ort import select_providers

REPO = Path(__file__).resolve().parents[1]


def _probs(pred: Prediction) -> np.ndarray:
    return np.array(list(pred.probabilities.values()))


# ------------------------------------------------------------------------------------- artifact

def _mutate_json(key, value):
    def mutate(art: Path) -> None:
        meta = json.loads((art / "dmf.json").read_text())
        if value is KeyError:
            del meta[key]
        else:
            meta[key] = value
        (art / "dmf.json").write_text(json.dumps(meta))
    return mutate


ARTIFACT_CASES = {
    "missing_dir": (lambda art: shutil.rmtree(art), "does not exist"),
    "missing_dmf_json": (lambda art: (art / "dmf.json").unlink(), "dmf.json: missing"),
    "bad_json": (lambda art: (art / "dmf.json").write_text("{not json"), "dmf.json: invalid JSON"),
    "wrong_format": (_mutate_json("format", "something-else"), "'format'"),
    "future_schema": (_mutate_json("schema_version", 99), "schema_version 99 is not supported"),
    "missing_labels": (_mutate_json("labels", KeyError), "missing field 'labels'"),
    "missing_model": (lambda art: next(art.glob("model.*")).unlink(), "model file missing"),
    "missing_tokenizer": (lambda art: (art / "tokenizer.json").unlink(), "tokenizer.json: tokenizer file missing"),
    "model_sha_mismatch": (lambda art: next(art.glob("model.*")).open("ab").write(b"\0"),
                           "sha256 does not match"),
    "tokenizer_sha_mismatch": (lambda art: (art / "tokenizer.json").write_text(
        (art / "tokenizer.json").read_text() + " "), "tokenizer.json: sha256 does not match"),
}


@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
def test_bad_artifact_is_a_one_line_error_naming_the_file(rt, tmp_path, case):
    art = tmp_path / "art"
    shutil.copytree(rt.artifact, art)
    mutate, expected = ARTIFACT_CASES[case]
    mutate(art)
    with pytest.raises(ArtifactError) as info:
        Predictor.load(art)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert str(art) in message


def test_artifact_contract_is_read_from_dmf_json(rt):
    art = load_artifact(rt.artifact)
    meta = json.loads((rt.artifact / "dmf.json").read_text())
    assert art.labels == tuple(meta["labels"]) and art.input_samples == meta["input_samples"]
    assert art.max_tokens == meta["max_tokens"] and art.max_batch == meta["max_batch"]
    assert art.label_names == tuple(meta["label_names"]) == ("neutral", "happy", "sad", "angry")


def test_label_names_are_optional_but_checked(rt, tmp_path):
    """An artifact exported before label_names shows its codes; a broken list is refused by name."""
    from dmf import contract as C
    from dmf.fileio import atomic_write_json

    meta = json.loads((rt.artifact / "dmf.json").read_text())
    for name, names, expected in (("old", None, meta["labels"]), ("short", ["neutral"], None),
                                  ("blank", ["a", "b", " ", "d"], None)):
        folder = tmp_path / name
        shutil.copytree(rt.artifact, folder)
        edited = {k: v for k, v in meta.items() if k not in ("label_names", C.CONTENT_DIGEST)}
        atomic_write_json(folder / "dmf.json", C.seal(edited if names is None else {**edited, "label_names": names}))
        if expected is not None:
            assert load_artifact(folder).label_names == tuple(expected)
            continue
        with pytest.raises(ArtifactError, match="field 'label_names' = .* expected 4 non-empty names"):
            load_artifact(folder)


def test_engine_and_provider_selection(rt):
    assert select_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert select_providers("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers(["tensorrt", "cuda"], ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                    "CPUExecutionProvider"]) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(EngineError, match="not available"):
        select_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="cannot run it"):
        Predictor.load(rt.artifact, engine="trt")
    with pytest.raises(EngineError, match="invalid"):
        Predictor.load(rt.artifact, engine="tflite")


# ------------------------------------------------------------------------------------ predictor

def test_parity_with_the_torch_checkpoint(rt, predictor):
    """Same files -> same arrays (dmf.preprocess with the checkpoint's settings) -> the torch eval
    model and the runtime agree: argmax equal, probabilities within 1e-4."""
    if rt.checkpoint is None:
        pytest.skip("no checkpoint for the prebuilt artifact (DMF_TEST_CHECKPOINT unset)")
    torch = pytest.importorskip("torch")
    from dmf.model import DMFModel

    model = DMFModel.from_pretrained(rt.checkpoint)
    cfg = model.model_config
    names = [f"good{i}.wav" for i in range(8)] + ["stereo.wav", "rate44k.wav", "long6s.wav"]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(names))]
    audio = np.stack([preprocess_audio(rt.clips[n], target_rate=cfg.sample_rate, num_samples=cfg.max_audio_samples,
                                       normalize=cfg.do_normalize, normalize_over=cfg.normalize_over)
                      for n in names])
    ids, mask = TextEncoder.from_file(rt.checkpoint / "tokenizer.json", cfg.max_tokens).encode(texts)
    # The runtime's preprocessing (parameters from dmf.json) gives the very same arrays.
    for i, n in enumerate(names):
        arrays = predictor.preprocess(str(rt.clips[n]), texts[i])
        np.testing.assert_array_equal(arrays["audio"], audio[i])
        np.testing.assert_array_equal(arrays["input_ids"], ids[i])
        np.testing.assert_array_equal(arrays["attention_mask"], mask[i])
    with torch.no_grad():
        ref = model(torch.from_numpy(audio), torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    ref_probs = np.exp(ref) / np.exp(ref).sum(axis=1, keepdims=True)
    preds = predictor.predict_batch([(str(rt.clips[n]), t) for n, t in zip(names, texts)])
    for i, pred in enumerate(preds):
        assert pred.label == cfg.labels[int(np.argmax(ref[i]))]
        np.testing.assert_allclose(_probs(pred), ref_probs[i], atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.array(pred.log_probs), ref[i], atol=1e-4, rtol=0)


def test_audio_as_path_bytes_and_array_agree(rt, predictor):
    path = rt.clips["good2.wav"]
    by_path = predictor.predict(path, "hello there")
    by_str = predictor.predict(str(path), "hello there")
    by_bytes = predictor.predict(path.read_bytes(), "hello there")
    with open(path, "rb") as fh:
        by_file = predictor.predict(fh, "hello there")
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32")
    by_array = predictor.predict(data, "hello there", sample_rate=rate)
    by_text_bytes = predictor.predict(path, "hello there".encode())
    for other in (by_str, by_bytes, by_file, by_array, by_text_bytes):
        assert other.label == by_path.label
        np.testing.assert_allclose(_probs(other), _probs(by_path), atol=1e-6)
    assert set(by_path.probabilities) == set(predictor.labels)
    assert abs(sum(by_path.probabilities.values()) - 1) < 1e-6
    assert by_path.to_dict() == {"label": by_path.label, "label_name": by_path.label_name,
                                 "probabilities": by_path.probabilities, "truncated": False}


@pytest.mark.parametrize("case", sorted({**BAD_AUDIO, **BAD_TEXT}))
def test_bad_input_raises_a_clear_error(rt, predictor, case):
    clip, text, (kind, fragment) = {**BAD_AUDIO, **BAD_TEXT}[case]
    with pytest.raises((AudioError, TextError)) as info:
        predictor.predict(rt.clips[clip], text)
    assert kind in [c.__name__ for c in type(info.value).__mro__]  # NaN / Inf: AudioRangeError
    assert fragment in str(info.value) and "\n" not in str(info.value)
    # ... and the predictor still works afterwards.
    assert predictor.predict(rt.clips["good0.wav"], "fine").label in predictor.labels


def test_bad_arrays_and_missing_fields(predictor):
    good = tone(1.0)
    with pytest.raises(AudioError, match="sample_rate is required"):
        predictor.predict(good, "x")
    bad = good.copy()
    bad[5] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        predictor.predict(bad, "x", sample_rate=16000)
    with pytest.raises(AudioError, match="missing"):
        predictor.predict(None, "x")
    with pytest.raises(TextError, match="missing"):
        predictor.predict(good, None, sample_rate=16000)
    with pytest.raises(AudioError, match="empty"):
        predictor.predict(b"", "x")
    with pytest.raises(AudioError, match="empty"):
        predictor.predict(np.zeros(0, np.float32), "x", sample_rate=16000)
    with pytest.raises(AudioError, match="not found|No such file|cannot open"):
        predictor.predict("/nonexistent/clip.wav", "x")
    with pytest.raises(InputError, match=r"items\[1\]"):
        predictor.predict_batch([(good, "x", 16000), "just a string"])
    with pytest.raises(TextError, match=r"items\[1\]: text"):
        predictor.predict_batch([(good, "x", 16000), {"audio": good, "text": "", "sample_rate": 16000}])


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_accepted_inputs_give_finite_predictions(rt, predictor, case):
    clip, text = ACCEPTED[case]
    pred = predictor.predict(rt.clips[clip], text)
    probs = _probs(pred)
    assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-6


def test_batches_larger_than_max_batch_are_split(rt, predictor, monkeypatch):
    items = [(rt.clips[f"good{i}.wav"], TEXTS[i]) for i in range(8)]
    singles = [predictor.predict(a, t) for a, t in items]
    sizes = []
    real_infer = predictor.engine.infer

    def spy(batch):
        sizes.append(len(batch["audio"]))
        return real_infer(batch)

    monkeypatch.setattr(predictor.engine, "infer", spy)
    monkeypatch.setattr(predictor, "max_batch", 3)
    batched = predictor.predict_batch(items)
    assert sizes == [3, 3, 2]
    for one, many in zip(singles, batched):
        assert one.label == many.label
        np.testing.assert_allclose(_probs(one), _probs(many), atol=1e-5)


# -------------------------------------------------------------------------------------- batcher

def test_microbatcher_same_result_alone_or_batched_and_bad_requests_fail_alone(rt, predictor):
    items = [(rt.clips[f"good{i}.wav"].read_bytes(), TEXTS[i]) for i in range(8)]
    singles = [predictor.predict(a, t) for a, t in items]
    with MicroBatcher(predictor, max_batch=8, max_wait_ms=200) as mb:
        futures = []
        for i, (a, t) in enumerate(items):
            futures.append(mb.submit(a, t))
            if i == 3:  # bad requests in the middle of a batch
                futures.append(mb.submit(rt.clips["notaudio.wav"].read_bytes(), "x"))
                futures.append(mb.submit(a, ""))
        results = [f.exception(timeout=30) or f.result() for f in futures]
        stats = mb.stats.snapshot()
    assert isinstance(results[4], AudioError) and "not readable audio" in str(results[4])
    assert isinstance(results[5], TextError)
    good = results[:4] + results[6:]
    for one, many in zip(singles, good):
        assert one.label == many.label
        np.testing.assert_allclose(_probs(one), _probs(many), atol=1e-5)
    assert stats["succeeded"] == 8 and stats["rejected"] == 2 and stats["failed"] == 0
    assert max(int(k) for k in stats["batch_size_histogram"]) > 1
    assert sum(k * v for k, v in stats["batch_size_histogram"].items()) == 8  # bad ones never batched
    assert stats["latency_ms"]["p50"] is not None


def test_microbatcher_concurrent_callers_and_graceful_close(predictor):
    clips = [tone(1.0 + i * 0.25, freq=200 + 30 * i, seed=i) for i in range(6)]
    expected = [predictor.predict(c, "same text", sample_rate=16000) for c in clips]
    mb = MicroBatcher(predictor, max_batch=4, max_wait_ms=20, workers=2)
    results: dict[tuple[int, int], Prediction] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(5):
            idx = (k + j) % len(clips)
            out = mb.predict(clips[idx], "same text", 16000, timeout=60)
            with lock:
                results[(k, j)] = (idx, out)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40
    for idx, out in results.values():
        np.testing.assert_allclose(_probs(out), _probs(expected[idx]), atol=1e-5)
    # close() finishes what is queued, then refuses new work.
    pending = [mb.submit(clips[0], "late", 16000) for _ in range(6)]
    mb.close()
    assert all(f.done() and f.exception() is None for f in pending)
    with pytest.raises(BatcherClosed):
        mb.submit(clips[0], "after close", 16000)
    mb.close()  # idempotent


def test_microbatcher_asyncio_helper(rt, predictor):
    import asyncio

    expected = predictor.predict(rt.clips["good4.wav"], "async")

    async def main():
        with MicroBatcher(predictor, max_batch=4, max_wait_ms=20) as mb:
            ok = await asyncio.gather(*[mb.predict_async(rt.clips["good4.wav"], "async") for _ in range(4)])
            with pytest.raises(TextError):
                await mb.predict_async(rt.clips["good4.wav"], "")
            return ok

    for got in asyncio.run(main()):
        np.testing.assert_allclose(_probs(got), _probs(expected), atol=1e-5)


def test_microbatcher_with_a_plain_function():
    seen = []

    def infer(batch):
        seen.append(len(batch))
        return [x * 2 for x in batch]

    def prep(x):
        if x < 0:
            raise ValueError("negative")
        return x

    with MicroBatcher(infer, max_batch=4, max_wait_ms=50, preprocess_fn=prep) as mb:
        futures = [mb.submit(i) for i in (1, 2, -1, 3, 4)]
        assert [f.exception(10) is None and f.result() for f in futures[:2]] == [2, 4]
        assert isinstance(futures[2].exception(10), ValueError)
        assert [f.result(10) for f in futures[3:]] == [6, 8]
    assert sum(seen) == 4 and max(seen) > 1


def test_microbatcher_engine_failure_fails_that_batch_only():
    calls = []

    def infer(batch):
        calls.append(batch)
        if "boom" in batch:
            raise RuntimeError("engine exploded")
        return batch

    with MicroBatcher(infer, max_batch=2, max_wait_ms=100) as mb:
        bad = [mb.submit("boom"), mb.submit("x")]
        for f in bad:
            with pytest.raises(RuntimeError, match="exploded"):
                f.result(10)
        assert mb.submit("y").result(10) == "y"
        assert mb.stats.snapshot()["failed"] == 2


# ------------------------------------------------------------------------------------------ CLI

def test_cli_predict_single(rt, predictor):
    clip = rt.clips["good3.wav"]
    expected = predictor.predict(clip, "hello world")
    code, out = _invoke("predict", rt.artifact, "--audio", clip, "--text", "hello world")
    assert code == 0, out
    assert out.splitlines()[0] == f"{expected.label_name} ({expected.label})"
    code, out = _invoke("predict", rt.artifact, "--audio", clip, "--text", "hello world", "--json", "--top-k", "2")
    assert code == 0, out
    got = json.loads(out.strip().splitlines()[-1])
    assert got["label"] == expected.label
    assert got["running_engine"] == predictor.engine.name  # what engine="auto" picked is said
    assert np.allclose(list(got["probabilities"].values()), _probs(expected), atol=1e-6)
    assert got["label_name"] == expected.label_name and [t["label"] for t in got["top_k"]] == [
        t["label"] for t in expected.top(2)] and got["top_k"][0]["label"] == expected.label
    code, out = _invoke("predict", rt.artifact, "--audio", clip, "--text", "hello world", "--top-k", "1")
    assert code == 0 and len(out.splitlines()) == 2, out  # the label line, then the one most probable
    code, out = _invoke("predict", rt.artifact, "--audio", clip, "--text", "hello world", "--top-k", "0")
    assert code == 2 and "--top-k 0 is invalid" in out


@pytest.mark.parametrize("args, fragment", [
    (("--audio", "{clips}/notaudio.wav", "--text", "x"), "not readable audio"),
    (("--audio", "{clips}/good0.wav", "--text", ""), "text is empty"),
    (("--audio", "{clips}/good0.wav"), "--audio and --text go together"),
    ((), "nothing to predict"),
    (("--manifest", "{clips}/m.csv"), "--manifest needs --out"),
])
def test_cli_predict_errors_exit_2_with_one_red_line(rt, args, fragment):
    args = [a.format(clips=rt.clips["good0.wav"].parent) for a in args]
    code, out = _invoke("predict", rt.artifact, *args)
    assert code == 2, out
    assert "error:" in out and fragment in out


def test_cli_predict_bad_artifact_exits_2(rt, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(rt.artifact, art)
    (art / "tokenizer.json").write_text("{}")
    code, out = _invoke("predict", art, "--audio", rt.clips["good0.wav"], "--text", "x")
    assert code == 2 and "error:" in out and "sha256 does not match" in out


def _write_manifest(path: Path, rows: list[dict], kind: str) -> None:
    if kind == "csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["id", "audio", "text"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("kind, out_suffix", [("csv", ".csv"), ("jsonl", ".jsonl")])
def test_cli_manifest_bulk_prediction(rt, predictor, tmp_path, kind, out_suffix):
    clips = tmp_path / "clips"
    clips.mkdir()
    rows = []
    for i in range(5):
        shutil.copy(rt.clips[f"good{i}.wav"], clips / f"c{i}.wav")
        rows.append({"id": f"utt{i}", "audio": f"clips/c{i}.wav", "text": TEXTS[i]})  # relative paths
    manifest = tmp_path / f"manifest.{kind}"
    _write_manifest(manifest, rows, kind)
    out = tmp_path / f"pred{out_suffix}"
    code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", out, "--batch-size", 2)
    assert code == 0, text
    expected = [predictor.predict(clips / f"c{i}.wav", TEXTS[i]) for i in range(5)]
    if out_suffix == ".csv":
        got = list(csv.DictReader(out.open()))
        assert list(got[0]) == ["id", "label", *(f"prob_{lab}" for lab in predictor.labels), "error"]
        for row, exp in zip(got, expected):
            assert row["label"] == exp.label and row["error"] == ""
            assert np.allclose([float(row[f"prob_{lab}"]) for lab in predictor.labels], _probs(exp), atol=1e-5)
        assert [r["id"] for r in got] == [f"utt{i}" for i in range(5)]
    else:
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert [g["id"] for g in got] == [f"utt{i}" for i in range(5)]
        for g, exp in zip(got, expected):
            assert set(g) == {"id", "label", "probabilities"} and g["label"] == exp.label


def test_cli_manifest_bad_rows_reported_all_at_once_before_predicting(rt, tmp_path):
    shutil.copy(rt.clips["good0.wav"], tmp_path / "ok.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"audio": "ok.wav", "text": "fine"}),
        json.dumps({"audio": "missing.wav", "text": "x"}),
        "{not json",
        json.dumps({"audio": "ok.wav", "text": ""}),
        json.dumps({"text": "no audio"}),
        json.dumps({"id": "a", "audio": "ok.wav", "text": "x"}),
        json.dumps({"id": "a", "audio": "ok.wav", "text": "y"}),
    ]) + "\n")
    out = tmp_path / "out.csv"
    code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", out)
    assert code == 2, text
    for line, fragment in ((2, "audio file not found"), (3, "malformed JSON"), (4, "empty text"),
                           (5, "missing audio"), (7, "duplicate id 'a'")):
        assert re.search(rf"line {line}: .*{re.escape(fragment)}", text), (line, text)
    assert "line 1:" not in text and "5 bad row(s)" in text
    assert not out.exists()


def test_cli_manifest_undecodable_rows_get_an_error_column(rt, tmp_path):
    rows = [{"id": "good", "audio": str(rt.clips["good0.wav"]), "text": "fine"},
            {"id": "corrupt", "audio": str(rt.clips["truncated.wav"]), "text": "x"},
            {"id": "nan", "audio": str(rt.clips["nan.wav"]), "text": "x"}]
    manifest = tmp_path / "m.csv"
    _write_manifest(manifest, rows, "csv")
    out = tmp_path / "out.csv"
    code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", out, "--no-progress")
    assert code == 2 and "2 row(s) could not be predicted" in text
    assert "line 3:" in text and "line 4:" in text
    got = {r["id"]: r for r in csv.DictReader(out.open())}
    assert got["good"]["label"] and not got["good"]["error"]
    assert got["corrupt"]["label"] == "" and "truncated" in got["corrupt"]["error"]
    assert "NaN" in got["nan"]["error"]


def test_cli_manifest_unknown_output_suffix(rt, tmp_path):
    manifest = tmp_path / "m.csv"
    _write_manifest(manifest, [{"id": "x", "audio": str(rt.clips["good0.wav"]), "text": "x"}], "csv")
    code, text = _invoke("predict", rt.artifact, "--manifest", manifest, "--out", tmp_path / "out.xlsx")
    assert code == 2 and "unknown output type" in text


# ------------------------------------------------------------------------- docs/serving.md

def test_serving_doc_python_example_runs_as_written(rt, tmp_path):
    readme = (REPO / "docs" / "serving.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "DMF_ARTIFACT": str(rt.artifact)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()


# GPU / TensorRT paths: tests/test_trt.py


def test_training_pipeline_and_runtime_give_identical_arrays(rt, predictor):
    """The trainer's dataset code (dmf.train.dataset) and the runtime's Predictor turn the same
    files and transcripts into the very same arrays."""
    if rt.checkpoint is None:
        pytest.skip("no checkpoint for the prebuilt artifact (DMF_TEST_CHECKPOINT unset)")
    pytest.importorskip("torch")
    from dmf.data.corpus import Utterance
    from dmf.model import DMFModel
    from dmf.train.dataset import encode_utterances

    model = DMFModel.from_pretrained(rt.checkpoint)
    names = ["good0.wav", "stereo.wav", "rate44k.wav", "long6s.wav"]
    utts = [Utterance(n, Path(rt.clips[n]), TEXTS[i], model.model_config.labels[0], "S1", "S1F")
            for i, n in enumerate(names)]
    batch = encode_utterances(utts, model)
    for i, utt in enumerate(utts):
        arrays = predictor.preprocess(str(utt.audio_path), utt.text)
        np.testing.assert_array_equal(arrays["audio"], batch.audio[i].numpy())
        np.testing.assert_array_equal(arrays["input_ids"], batch.input_ids[i].numpy())
        np.testing.assert_array_equal(arrays["attention_mask"], batch.attention_mask[i].numpy())
