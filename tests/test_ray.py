"""`dmf predict --ray`: bulk predictions and conversations on ONE local Ray instance (2 CPUs, no
dashboard, no network) shared by the module. Output must equal the single-process output byte for
byte, a killed actor must lose and duplicate nothing, and a bad row must stay alone."""

from __future__ import annotations

import csv
import io
import json
import time

import numpy as np
import pytest
import soundfile as sf
from conftest_runtime import SR, rt  # noqa: F401 (fixture)
from conftest_runtime import run_cli as _invoke

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install -e \".[ray]\" in the clone)")

from dmf.runtime import ray as dray  # noqa: E402
from dmf.runtime.outputs import RowWriter  # noqa: E402

GOOD = [f"good{i}.wav" for i in range(8)] + ["long6s.wav", "stereo.wav", "rate8k.wav"]
BAD = ["nan.wav", "empty.wav", "short.wav"]  # fail only when decoded: an error row each


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    dray.connect(progress=False)  # already initialised: only the Data context (order kept, no bars)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def manifest(rt, tmp_path_factory):
    """40 rows: good clips with bad ones among them (one per 8), ids that look like numbers."""
    root = tmp_path_factory.mktemp("raym")
    names = [BAD[i // 8 % len(BAD)] if i % 8 == 5 else GOOD[i % len(GOOD)] for i in range(40)]
    rows = [{"id": f"{i:03d}", "audio": str(rt.clips[n]), "text": f"row {i} i am so happy today"}
            for i, n in enumerate(names)]
    path = root / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["id", "audio", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


@pytest.fixture(scope="module")
def single(rt, manifest, tmp_path_factory):
    """The single-process `dmf predict --manifest` output and messages, for CSV and JSONL."""
    root = tmp_path_factory.mktemp("single")
    return {kind: _invoke("predict", rt.artifact, "--manifest", manifest[0], "--out", root / f"single.{kind}",
                          "--no-progress") + ((root / f"single.{kind}").read_bytes(),) for kind in ("csv", "jsonl")}


def test_cli_ray_manifest_identical_to_one_process(cluster, rt, manifest, single, tmp_path):
    out = tmp_path / "ray.csv"
    code, output = _invoke("predict", rt.artifact, "--manifest", manifest[0], "--out", out, "--ray",
                           "--actors", 2, "--batch-size", 4, "--no-progress")
    one_code, one_output, one_bytes = single["csv"]
    assert (code, one_code) == (2, 2)  # the bad rows: exit 2 both ways
    assert out.read_bytes() == one_bytes  # same columns, order, numbers and messages
    bad = [line for line in one_output.splitlines() if line.strip().startswith("line ")]
    assert len(bad) == 5 and all(line in output for line in bad)  # listed with the same line numbers
    rows = list(csv.DictReader(out.open(encoding="utf-8", newline="")))
    assert [r["id"] for r in rows] == [r["id"] for r in manifest[1]]  # "007" stays "007", in order
    assert not (tmp_path / "ray.csv.partial").exists()


def test_bad_row_isolated_with_its_message(cluster, rt, manifest, single, tmp_path):
    """JSONL through the library: each bad clip is one error row (the single-process message),
    its neighbours in the same batch are scored."""
    out = tmp_path / "ray.jsonl"
    writer = RowWriter(out, "jsonl", ("neu", "hap", "sad", "ang"))
    errors = dray.predict_manifest(manifest[0], writer, dray.LoadOptions(str(rt.artifact)),
                                   dray.PoolOptions(actors=1, batch_size=8))
    writer.commit()
    assert out.read_bytes() == single["jsonl"][2]
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    failed = [i for i, r in enumerate(recs) if r["label"] is None]
    assert failed == [5, 13, 21, 29, 37] and len(errors) == 5
    assert "NaN" in recs[5]["error"] and "empty" in recs[13]["error"]
    assert all(recs[i]["label"] for i in (4, 6, 12, 14))  # the same batches' other rows


def test_killed_actor_every_row_written_once(cluster, rt, manifest, single, tmp_path):
    """An actor killed with ray.kill in the middle of a batch: Ray restarts it and retries the
    batch; every row is written exactly once, as in one process."""
    marker = tmp_path / "killed"

    class KillOnce(dray.ManifestScorer):  # local class: Ray pickles it by value for the workers
        def __call__(self, batch):
            if not marker.exists():
                marker.write_text(str(len(batch["id"])))
                ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
                time.sleep(60)  # killed here, mid-batch
            return super().__call__(batch)

    out = tmp_path / "kill.csv"
    writer = RowWriter(out, "csv", ("neu", "hap", "sad", "ang"))
    dray.predict_manifest(manifest[0], writer, dray.LoadOptions(str(rt.artifact)),
                          dray.PoolOptions(actors=2, batch_size=8), scorer=KillOnce)
    writer.commit()
    assert marker.exists()  # the kill did happen
    assert out.read_bytes() == single["csv"][2]


def test_parquet_manifest_read_by_ray(cluster, rt, manifest, single, tmp_path):
    """A Parquet manifest (Ray's reader) with a relative audio path, an integer id and a row
    without text: the same table, the row without text an error row of its own."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = manifest[1][:8]
    (tmp_path / "clips").mkdir()
    local = tmp_path / "clips" / "a.wav"
    local.write_bytes(rt.clips["good1.wav"].read_bytes())
    table = pa.table({"audio": [r["audio"] for r in rows] + ["clips/a.wav", str(rt.clips["good2.wav"])],
                      "text": [r["text"] for r in rows] + ["hello there", None],
                      "id": [r["id"] for r in rows] + ["8", None]})
    pq.write_table(table, tmp_path / "m.parquet")
    out = tmp_path / "p.csv"
    writer = RowWriter(out, "csv", ("neu", "hap", "sad", "ang"))
    errors = dray.predict_manifest(tmp_path / "m.parquet", writer, dray.LoadOptions(str(rt.artifact)),
                                   dray.PoolOptions(actors=1, batch_size=4))
    writer.commit()
    got = out.read_text(encoding="utf-8").splitlines()
    assert got[:9] == single["csv"][2].decode("utf-8").splitlines()[:9]  # header + the 8 rows
    assert got[9].startswith("8,") and got[9].split(",")[1]  # relative to the manifest's folder
    assert got[10].endswith(",missing text") and got[10].split(",")[1] == ""
    assert errors[-1] == f"id {str(rt.clips['good2.wav'])!r}: missing text" and len(errors) == 2  # + row 5's NaN


def _recording(path, clips, rt, gap=0.4):
    """clips joined with gaps -> (wav written at path, JSON transcript segments)."""
    pieces, segs, t = [], [], 0.0
    for i, name in enumerate(clips):
        data, _ = sf.read(rt.clips[name], dtype="float32")
        pieces += [np.zeros(int(gap * SR), np.float32), data]
        segs.append({"start": round(t + gap, 3), "end": round(t + gap + len(data) / SR, 3),
                     "text": f"turn {i} what a day", "speaker": "AB"[i % 2]})
        t += gap + len(data) / SR
    sf.write(path, np.concatenate(pieces + [np.zeros(int(gap * SR), np.float32)]), SR, subtype="PCM_16")
    return segs


def test_conversations_on_ray_equal_each_transcript_run(cluster, rt, tmp_path):
    """--conversations LIST --ray: each recording's turns are what `--transcript` writes for it
    alone; a recording whose transcript runs past its end is one error row, the others complete."""
    lines = ["audio,transcript,id"]
    for k in range(3):
        segs = _recording(tmp_path / f"c{k}.wav", [GOOD[(k + j) % len(GOOD)] for j in range(3)], rt)
        if k == 1:
            segs[-1]["end"] += 30  # past the end of the audio
        (tmp_path / f"c{k}.json").write_text(json.dumps(segs), encoding="utf-8")
        lines.append(f"c{k}.wav,c{k}.json,call{k}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, output = _invoke("predict", rt.artifact, "--conversations", tmp_path / "list.csv",
                           "--out", tmp_path / "all.csv", "--ray", "--actors", 2, "--no-progress")
    assert code == 2 and "line 3:" in output  # the bad recording, named by its list line
    table = list(csv.reader((tmp_path / "all.csv").open(encoding="utf-8", newline="")))
    assert table[0][0] == "conversation" and table[0][-1] == "error"
    for k in (0, 2):
        code, _ = _invoke("predict", rt.artifact, "--audio", tmp_path / f"c{k}.wav", "--transcript",
                          tmp_path / f"c{k}.json", "--out", tmp_path / f"one{k}.csv", "--no-progress")
        alone = list(csv.reader((tmp_path / f"one{k}.csv").open(encoding="utf-8", newline="")))
        assert code == 0 and alone[0] == table[0][1:-1]
        assert [r[1:-1] for r in table[1:] if r[0] == f"call{k}"] == alone[1:]
    failed = [r for r in table[1:] if r[0] == "call1"]
    assert len(failed) == 1 and failed[0][5] == "" and "outside the audio" in failed[0][-1]
    assert [r[0] for r in table[1:]] == ["call0"] * 3 + ["call1"] + ["call2"] * 3  # list order


def test_ray_refused_before_anything_runs(rt, tmp_path):
    """Argument problems exit 2 with one line, before Ray starts or the model loads."""
    code, output = _invoke("predict", rt.artifact, "--audio", rt.clips["good0.wav"], "--text", "hi", "--ray")
    assert code == 2 and "--ray goes with --manifest" in output
    code, output = _invoke("predict", rt.artifact, "--manifest", "m.csv", "--out", tmp_path / "o.csv",
                           "--ray", "--actors", 0)
    assert code == 2 and "--actors 0 is invalid" in output


def test_parquet_output_holds_the_csv_rows_one_process_and_on_ray(cluster, rt, manifest, single, tmp_path):
    """--out .parquet: the CSV's columns, typed (probabilities float64, a bad row's label and
    probabilities null, its message in error), the same rows through one process and through Ray."""
    import pyarrow.parquet as pq

    one, on_ray = tmp_path / "one.parquet", tmp_path / "ray.parquet"
    assert _invoke("predict", rt.artifact, "--manifest", manifest[0], "--out", one, "--no-progress")[0] == 2
    assert _invoke("predict", rt.artifact, "--manifest", manifest[0], "--out", on_ray, "--ray", "--actors", 2,
                   "--batch-size", 4, "--no-progress")[0] == 2
    expected = list(csv.DictReader(io.StringIO(single["csv"][2].decode("utf-8"), newline="")))
    for path in (one, on_ray):
        table = pq.read_table(path)
        assert table.column_names == list(expected[0]) and str(table.schema.field("prob_neu").type) == "double"
        got = table.to_pylist()
        assert [r["id"] for r in got] == [r["id"] for r in expected]
        for row, want in zip(got, expected):
            assert (row["label"] or "") == want["label"] and (row["error"] or "") == want["error"]
            assert row["prob_hap"] is None if not want["label"] else abs(row["prob_hap"] - float(want["prob_hap"])) < 1e-6
    assert pq.read_table(one).equals(pq.read_table(on_ray))
