"""Bulk predictions and conversations on a Ray cluster (`dmf predict ... --ray`), with Ray Data.

A manifest (or a list of recording + transcript pairs) becomes a Ray Dataset; `map_batches` runs
a callable class on a fixed pool of actors, each of which opens the artifact once (its engine gets
as many threads as the actor has CPUs) and scores a batch of rows with the single-process code
(`bulk._predict_chunk`, `Predictor.predict_conversation`), so a bad row gets the same empty label
and one-line message as in one process. Ray Data streams the batches, restarts a dead actor and
retries its batch (`max_restarts` / `max_task_retries`, Ray Data's defaults for actor pools); the
driver keeps the input order (`preserve_order`) and writes the rows itself, through the writers
the single-process path uses, so the output has the same columns and order, and a row seen twice
or missing stops the run instead of being written.

Readers: a local manifest is read and checked by dmf's own reader (every row before anything
runs, same messages); a Parquet manifest or one on another filesystem Ray reads (s3://, gs://,
...) by `ray.data.read_csv / read_json / read_parquet`, its rows checked one by one as they are
scored (a bad row comes out as an error row). Audio paths must open on every node.

Torch-free; `ray` is imported inside functions (an optional extra: `dmf-ser[ray]`). The module is
named `dmf.runtime.ray`: with absolute imports, `import ray` here is the real package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from dmf.contract import MAX_CLIP_SECONDS
from dmf.data.manifest import (MANIFEST_KINDS, PREDICT_REQUIRED, ManifestError, PredictionRow, audio_path,
                               field_problem, load_prediction_rows, missing_audio, read_rows)

PAIR_REQUIRED = ("audio", "transcript")  # a conversation list's columns (plus an optional id)
RAY_KINDS = {**MANIFEST_KINDS, ".parquet": "parquet"}  # inputs Ray reads: suffix -> reader


@dataclass(frozen=True)
class LoadOptions:
    """How each actor opens the artifact (as `Predictor.load`)."""

    artifact: str  # artifact folder: a path every node can read
    engine: str = "auto"  # auto, onnx, openvino or trt
    providers: str | None = None  # onnxruntime providers, e.g. "cuda,cpu"
    threads: int | None = None  # engine threads; None: the CPUs Ray gave the actor
    max_clip_seconds: float = MAX_CLIP_SECONDS  # longest accepted clip, s


@dataclass(frozen=True)
class PoolOptions:
    """The actor pool: how many actors and what each reserves."""

    actors: int | None = None  # None: the cluster's CPUs // cpus_per_actor (at least 1)
    cpus_per_actor: float = 1.0  # CPUs Ray reserves per actor (its engine threads)
    gpus_per_actor: float = 0.0  # GPUs per actor: onnxruntime-gpu or --engine trt artifacts
    batch_size: int = 16  # rows (or conversations) per actor call


@dataclass(frozen=True)
class ConversationOptions:
    """What `dmf predict --transcript` takes for each recording."""

    policy: str = "first"  # segments longer than the window: first or windows
    max_recording_seconds: float | None = 4 * 3600.0  # longest accepted recording, s
    batch_size: int = 16  # segments per inference batch


# ----------------------------------------------------------------------------------- connecting

def connect(address: str | None = None, progress: bool = True) -> None:
    """Join the Ray cluster at `address` ("auto", "HOST:6379", "ray://HOST:10001"), or start a
    local instance with this machine's cores; nothing if Ray is already initialised. Ray Data
    keeps the input order and shows its own progress bars (unless `progress` is False)."""
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress


def _pool_size(pool: PoolOptions) -> int:
    """Actors to start: as asked, or as many as the cluster's CPUs hold (GPUs when they are asked)."""
    import ray

    if pool.actors is not None:
        return pool.actors
    res = ray.cluster_resources()
    if pool.gpus_per_actor:
        return max(1, int(res.get("GPU", 0) // pool.gpus_per_actor))
    return max(1, int(res.get("CPU", 1) // max(pool.cpus_per_actor, 1e-3)))


def _actor_threads(threads: int | None) -> int | None:
    """Engine threads for this actor: as asked, else the CPUs Ray assigned it (None outside Ray)."""
    if threads is not None:
        return threads
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker
        return None
    return max(1, int(round(cpus))) if cpus else None


# -------------------------------------------------------------------------------------- readers

def _is_local(path: str | Path) -> bool:
    return "://" not in str(path)


def _kind(path: str | Path) -> str:
    kind = RAY_KINDS.get(PurePosixPath(str(path)).suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown manifest type: expected {', '.join(RAY_KINDS)}")
    return kind


def _read_any(path: str, columns: Sequence[str]):
    """A manifest anywhere Ray reads -> Dataset, the named columns as strings where the format
    has no types (an id like 007 stays "007")."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray

    kind = _kind(path)
    if kind == "parquet":
        return ray.data.read_parquet(path)
    if kind == "json":
        return ray.data.read_json(path, lines=True)
    types = {c: pa.string() for c in columns}
    return ray.data.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types),
                             parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ","))


def _base(path: str) -> str:
    """The folder relative audio paths are read against: the manifest's."""
    return str(Path(path).parent) if _is_local(path) else path.rsplit("/", 1)[0]


def manifest_dataset(path: str | Path):
    """A `dmf predict` manifest -> (Dataset of where, id, audio, text, error; rows expected or
    None). Local CSV/TSV/JSONL: dmf's reader checks every row first (ManifestError, DataError);
    Parquet or a remote path: Ray's readers, each row checked as `_normalise` runs."""
    import ray

    path = str(path)
    if _is_local(path) and _kind(path) != "parquet":
        rows = load_prediction_rows(path)
        items = [{"where": r.where, "id": r.id, "audio": str(r.audio), "text": r.text, "error": ""} for r in rows]
        return ray.data.from_items(items), len(items)
    ds = _read_any(path, ("id", *PREDICT_REQUIRED))
    return ds.map_batches(_normalise, fn_kwargs={"base": _base(path)}, batch_format="pandas"), None


def _normalise(frame, base: str):
    """Rows read by Ray -> where, id, audio, text, error, as dmf's reader would build them; a row
    whose fields are wrong keeps its message in `error` (and is not scored)."""
    out = {k: [] for k in ("where", "id", "audio", "text", "error")}
    for rec in frame.to_dict("records"):
        rec = {k: (None if _missing(v) else v) for k, v in rec.items()}
        problem = field_problem(rec, PREDICT_REQUIRED)
        rid = rec.get("id")
        rid = str(rid).strip() if rid not in (None, "") else str(rec.get("audio") or "").strip()
        audio = "" if problem else str(audio_path(rec["audio"], Path(base)) if _is_local(base)
                                       else f"{base}/{rec['audio'].strip()}")
        for key, value in (("where", f"id {rid!r}"), ("id", rid), ("audio", audio),
                           ("text", rec.get("text") if isinstance(rec.get("text"), str) else ""),
                           ("error", problem or "")):
            out[key].append(value)
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def pairs_dataset(rows: Sequence[dict]):
    """Checked conversation rows (`pair_rows`) -> a Ray Dataset."""
    import ray

    return ray.data.from_items(list(rows))


def pair_rows(pairs: Iterable[tuple[str | Path, str | Path]] | str | Path) -> list[dict]:
    """(recording, transcript) pairs, or a list file (CSV/TSV/JSONL with audio, transcript and an
    optional id; relative paths against its folder) -> rows of where, id, audio, transcript, error.
    Every pair is checked first (fields, files present, ids unique): ManifestError lists them all."""
    items = _list_pairs(Path(pairs)) if isinstance(pairs, (str, Path)) else [
        {"where": f"pair {i}", "id": str(a), "audio": str(a), "transcript": str(t), "error": ""}
        for i, (a, t) in enumerate(pairs, start=1)]
    problems = [f"{it['where']}: {p}" for it in items for p in [missing_audio(Path(it["audio"])) or
                                                                missing_audio(Path(it["transcript"]))] if p]
    seen: dict[str, str] = {}
    for it in items:
        if it["id"] in seen:
            problems.append(f"{it['where']}: duplicate id {it['id']!r} (first at {seen[it['id']]})")
        seen.setdefault(it["id"], it["where"])
    if problems or not items:
        raise ManifestError(Path(str(pairs)) if isinstance(pairs, (str, Path)) else Path("pairs"),
                            problems or ["no conversations"])
    return items


def _list_pairs(path: Path) -> list[dict]:
    """A conversation list's rows, with paths resolved (ManifestError for a row missing fields)."""
    parsed, problems = read_rows(path, PAIR_REQUIRED)
    items = []
    for where, row in parsed:
        problem = field_problem(row, PAIR_REQUIRED)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        rid = row.get("id")
        items.append({"where": where, "id": str(rid).strip() if rid not in (None, "") else row["audio"].strip(),
                      "audio": str(audio_path(row["audio"], path.parent)),
                      "transcript": str(audio_path(row["transcript"], path.parent)), "error": ""})
    if problems:
        raise ManifestError(path, problems)
    return items


# -------------------------------------------------------------------------------------- scorers

class ManifestScorer:
    """Ray Data callable class: opens the artifact once per actor; a batch of manifest rows
    (where, id, audio, text, error) -> where, id, label ("" when the row failed), prob_<label>
    (NaN when it failed), error (the single-process message, "" when it did not)."""

    def __init__(self, load: LoadOptions) -> None:
        from .predictor import Predictor

        self.predictor = Predictor.load(load.artifact, engine=load.engine, providers=load.providers,
                                        threads=_actor_threads(load.threads), max_clip_seconds=load.max_clip_seconds)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, labels = len(batch["id"]), self.predictor.labels
        errors = [str(e) for e in batch["error"]]
        todo = [PredictionRow(str(batch["where"][i]), str(batch["id"][i]), Path(str(batch["audio"][i])),
                              str(batch["text"][i])) for i in range(n) if not errors[i]]
        results = iter(_scored(self.predictor, todo))
        out = {"where": batch["where"], "id": batch["id"], "label": [], "error": errors}
        probs = np.full((n, len(labels)), np.nan)
        for i in range(n):
            if errors[i]:
                out["label"].append("")
                continue
            _, pred, error = next(results)
            out["label"].append(pred.label if pred else "")
            errors[i] = error or ""
            if pred:
                probs[i] = [pred.probabilities[lab] for lab in labels]
        out.update({f"prob_{lab}": probs[:, j] for j, lab in enumerate(labels)})
        return {k: np.asarray(v, dtype=object) if not k.startswith("prob_") else v for k, v in out.items()}


def _scored(predictor, rows: Sequence[PredictionRow]) -> Iterator[tuple]:
    """`bulk._predict_chunk` over rows, at most max_batch at a time (memory follows the batch)."""
    from .bulk import _predict_chunk

    for start in range(0, len(rows), predictor.max_batch):
        yield from _predict_chunk(predictor, rows[start:start + predictor.max_batch])


class ConversationScorer:
    """Ray Data callable class: a batch of (where, id, audio, transcript, error) pairs -> where,
    id, turns (the turns' `to_dict()` as one JSON list; "" when the pair failed), error (the
    message `dmf predict --transcript` would exit with)."""

    def __init__(self, load: LoadOptions, conv: ConversationOptions) -> None:
        from .predictor import Predictor

        self.conv = conv
        self.predictor = Predictor.load(load.artifact, engine=load.engine, providers=load.providers,
                                        threads=_actor_threads(load.threads), max_clip_seconds=load.max_clip_seconds)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        turns, errors = [], []
        for audio, transcript, error in zip(batch["audio"], batch["transcript"], batch["error"]):
            text, error = ("", str(error)) if error else self._one(str(audio), str(transcript))
            turns.append(text)
            errors.append(error)
        return {"where": batch["where"], "id": batch["id"], "turns": np.asarray(turns, dtype=object),
                "error": np.asarray(errors, dtype=object)}

    def _one(self, audio: str, transcript: str) -> tuple[str, str]:
        from .conversation import TranscriptError, read_transcript
        from .predictor import INPUT_ERRORS

        try:
            result = self.predictor.predict_conversation(
                audio, read_transcript(transcript), policy=self.conv.policy, name=transcript,
                max_recording_seconds=self.conv.max_recording_seconds, batch_size=self.conv.batch_size)
        except INPUT_ERRORS + (TranscriptError,) as exc:
            return "", str(exc)
        return json.dumps([t.to_dict() for t in result.turns], allow_nan=False), ""


# ---------------------------------------------------------------------------------- running

def scored(ds, scorer: type, args: tuple, pool: PoolOptions):
    """`ds` through `scorer(*args)` on a fixed pool of actors (Ray restarts a killed actor and
    retries its batch: Ray Data's defaults for actor pools, `max_restarts` / `max_task_retries` -1)."""
    import ray

    return ds.map_batches(scorer, fn_constructor_args=args, batch_size=pool.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=_pool_size(pool)),
                          num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None)


class ClusterError(RuntimeError):
    """The Ray job failed as a whole (an actor that cannot start, a lost cluster); one line."""


def scored_batches(ds, scorer: type, args: tuple, pool: PoolOptions) -> Iterator[dict[str, np.ndarray]]:
    """`scored(...)`'s batches, in input order, as the driver receives them."""
    return _batches(scored(ds, scorer, args, pool))


def _batches(ds) -> Iterator[dict[str, np.ndarray]]:
    """The scored batches in input order; Ray's own (multi-line) failures as one-line ClusterErrors."""
    from ray.exceptions import RayError

    from dmf.errors import first_line

    try:
        yield from ds.iter_batches(batch_format="numpy", prefetch_batches=1)
    except RayError as exc:
        raise ClusterError(f"the Ray job failed: {first_line(exc)}") from None


class OnceEach:
    """Checks rows as the driver writes them: no id twice (a retried batch written again), and
    at the end, none missing."""

    def __init__(self, expected: int | None) -> None:
        self.expected, self.seen = expected, set()

    def add(self, row_id: str) -> None:
        if row_id in self.seen:
            raise RuntimeError(f"id {row_id!r} came back twice from the cluster; the output is incomplete")
        self.seen.add(row_id)

    def close(self) -> None:
        if self.expected is not None and len(self.seen) != self.expected:
            raise RuntimeError(f"{self.expected - len(self.seen)} of {self.expected} rows never came back "
                               f"from the cluster; the output is incomplete")


def write_manifest(results: Iterable[dict[str, np.ndarray]], writer, expected: int | None,
                   advance: Callable[[int], None] = lambda n: None) -> list[str]:
    """Scored batches -> `writer` (an `outputs.RowWriter`), in order; returns the row errors as
    'where: message'. Raises RuntimeError if a row comes twice or not at all (the writer is left
    for the caller to commit or abort)."""
    from .prediction import Prediction

    check, row_errors = OnceEach(expected), []
    for batch in results:
        labels = [c[len("prob_"):] for c in batch if c.startswith("prob_")]
        for i, row_id in enumerate(batch["id"]):
            check.add(str(row_id))
            error = str(batch["error"][i]) or None
            pred = None if error else Prediction(str(batch["label"][i]), {
                lab: float(batch[f"prob_{lab}"][i]) for lab in labels})
            writer.write(str(row_id), pred, error)
            if error:
                row_errors.append(f"{batch['where'][i]}: {error}")
        writer.flush()
        advance(len(batch["id"]))
    check.close()
    return row_errors


def predict_manifest(manifest: str | Path, writer, load: LoadOptions, pool: PoolOptions,
                     scorer: type = ManifestScorer) -> list[str]:
    """Every row of `manifest` scored on the Ray cluster (`connect` first) and written to
    `writer` in manifest order. Returns the row errors ('where: message')."""
    ds, expected = manifest_dataset(manifest)
    return write_manifest(scored_batches(ds, scorer, (load,), pool), writer, expected)


# ---------------------------------------------------------------------------- conversations out

def turn_columns(labels: Sequence[str]) -> list[str]:
    """A conversation table's columns: the conversation's id, `--transcript`'s turn columns, error."""
    return ["conversation", "start", "end", "speaker", "text", "label", "truncated", "windows",
            *(f"p_{x}" for x in labels), "error"]


def _turn_lines(kind: str, conv_id: str, turns: list[dict], error: str, labels: Sequence[str]) -> list[list]:
    """One conversation's rows: CSV cells as `outputs.write_turns` writes them, or JSON objects."""
    from .outputs import safe_cell

    if kind == "jsonl":
        return [[{"conversation": conv_id, "label": None, "error": error}]] if error else \
            [[{"conversation": conv_id, **t}] for t in turns]
    if error:
        return [[safe_cell(conv_id), "", "", "", "", "", "", "", *([""] * len(labels)), safe_cell(error)]]
    return [[safe_cell(conv_id), t["start"], t["end"], safe_cell(t["speaker"] or ""), safe_cell(t["text"]),
             t["label"], t["truncated"], t["windows"], *(f"{t['probabilities'][x]:.6f}" for x in labels), ""]
            for t in turns]


def write_conversations(results: Iterable[dict[str, np.ndarray]], out: Path, kind: str, labels: Sequence[str],
                        expected: int | None) -> list[str]:
    """Scored conversations -> `out` (written atomically), one row per turn in transcript order,
    conversations in list order; a failed conversation is one row with its message. Returns the
    failures as 'where: message'."""
    import csv

    from dmf.fileio import atomic_write

    failures: list[str] = []

    def write(tmp: Path) -> None:
        check = OnceEach(expected)
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            table = csv.writer(fh, lineterminator="\r\n") if kind == "csv" else None
            if table:
                table.writerow(turn_columns(labels))
            for batch in results:
                for where, conv_id, turns, error in zip(batch["where"], batch["id"], batch["turns"], batch["error"]):
                    check.add(str(conv_id))
                    if error:
                        failures.append(f"{where}: {error}")
                    for line in _turn_lines(kind, str(conv_id), json.loads(turns) if turns else [], str(error), labels):
                        table.writerow(line) if table else fh.write(json.dumps(line[0], ensure_ascii=False) + "\n")
        check.close()

    atomic_write(out, write)
    return failures


def predict_conversations(pairs, out: Path, kind: str, labels: Sequence[str], load: LoadOptions,
                          pool: PoolOptions, conv: ConversationOptions = ConversationOptions()) -> list[str]:
    """Every (recording, transcript) pair scored on the Ray cluster and written to `out`."""
    rows = pair_rows(pairs)
    return write_conversations(scored_batches(pairs_dataset(rows), ConversationScorer, (load, conv), pool), out,
                               kind, labels, len(rows))


def run_here(rows: Sequence[dict], scorer: Callable, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The same callable class without Ray, in this process (the `--conversations` run without
    `--ray`): rows -> scored batches."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield scorer({k: np.asarray([r[k] for r in chunk], dtype=object) for k in chunk[0]})
