"""`MicroBatcher`: concurrent single requests -> batched inference.

Callers `submit(audio, text)` and get a `concurrent.futures.Future` (or `await predict_async(...)`
from asyncio code). One worker thread takes up to `max_batch` queued requests, waiting at most
`max_wait_ms` after the first, preprocesses each request on its own (a bad request fails alone,
with its own error, and never joins the batch), runs the rest as one batch and resolves every
future. Inputs are fixed-length, so a result is the same alone or batched (to float rounding).
`close()` stops intake and drains what is queued (graceful). A future cancelled while queued
(its client gave up) is skipped. Errors reach futures without their traceback: a traceback pins
the frames of the decoder, and with them a rejected request's decoded audio, until the garbage
collector finds the cycle (engine failures are logged with theirs first).

`workers` > 1 runs that many batches at once (one collector at a time, so batches still fill):
on a CPU whose time goes into compute that is linear in the batch (the conv feature encoder over
80 000 samples), batching alone gains little, and two workers with one onnxruntime thread each
use two cores where sequential calls cannot. On a GPU, one worker is the usual choice.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .predictor import INPUT_ERRORS, InputError, Predictor, ResultError

log = logging.getLogger("dmf.runtime")


class BatcherClosed(RuntimeError):
    """submit() after close()."""


class Overloaded(RuntimeError):
    """The queue is full (max_queue requests waiting); retry later."""


_STOP = object()
MAX_WAIT_MS = 60_000  # a batch that waits a minute for company is a misconfiguration, not a latency budget


def _identity(item: Any) -> Any:
    return item


def _shown(args: tuple) -> str:
    """submit's arguments as a short call form for a message: types, not (large) values."""
    return "(" + ", ".join(type(a).__name__ for a in args) + ")"


def _call_form(signature: inspect.Signature) -> str:
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return "(" + ", ".join(p.name if p.default is p.empty else f"[{p.name}]" for p in positional) + ")"


def _detached(error: BaseException) -> BaseException:
    """`error` without its traceback and chained exceptions (what pins a request's frames)."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def _score(predictor: Predictor, prepared: list) -> list:
    """One batch through the predictor: a Prediction per item, or the ResultError of an item whose
    scores are not finite (it fails alone; the rest of the batch is answered)."""
    results: list[Any] = []
    for row in predictor.infer(prepared):
        try:
            results.append(predictor.postprocess(row))
        except ResultError as exc:
            results.append(exc)
    return results


@dataclass
class _Request:
    args: tuple
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


class _Stats:
    """Counters and a bounded latency window for metrics; guarded by one lock."""

    def __init__(self, window: int = 10000) -> None:
        self.lock = threading.Lock()
        self.submitted = self.succeeded = self.rejected = self.failed = self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=window)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = np.array(self.latency_ms, dtype=np.float64)
            sizes = dict(sorted(self.batch_sizes.items()))
            items = sum(k * v for k, v in sizes.items())
            return {
                "submitted": self.submitted,
                "succeeded": self.succeeded,
                "rejected": self.rejected,  # bad input: failed alone, never batched
                "failed": self.failed,  # engine errors
                "batches": self.batches,
                "batch_size_histogram": sizes,
                "mean_batch_size": (items / self.batches) if self.batches else 0.0,
                "max_batch_size_seen": max(sizes) if sizes else 0,
                "latency_ms": {
                    "count": int(lat.size),
                    "p50": float(np.percentile(lat, 50)) if lat.size else None,
                    "p99": float(np.percentile(lat, 99)) if lat.size else None,
                    "mean": float(lat.mean()) if lat.size else None,
                },
            }


class MicroBatcher:
    """MicroBatcher(predictor, max_batch=8, max_wait_ms=5).

    `target` is a `Predictor` (requests are `(audio, text[, sample_rate])`, results are
    `Prediction`s), or a plain function `infer_fn(list_of_prepared) -> list_of_results` together
    with `preprocess_fn(*args) -> prepared` (default: identity on the single argument); a
    preprocess exception fails that request only, and so does a result that is an exception. `workers`: batches run concurrently (the
    target must be thread-safe; Predictor is). Thread-safe."""

    def __init__(self, target: Predictor | Callable[[list], Sequence[Any]], max_batch: int = 8,
                 max_wait_ms: float = 5.0, *, workers: int = 1, preprocess_fn: Callable[..., Any] | None = None,
                 max_queue: int = 1024, latency_window: int = 10000, name: str = "dmf-batcher") -> None:
        for option, value in (("max_batch", max_batch), ("workers", workers), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} = {value!r} is invalid: expected an integer >= 1")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) \
                or not 0 <= max_wait_ms <= MAX_WAIT_MS:
            # inf (or 1e300) overflows the worker's queue timeout: it dies and no future resolves;
            # NaN fails every comparison, so "not 0 <= x" refuses it too
            raise ValueError(f"max_wait_ms = {max_wait_ms!r} is invalid: expected a number of ms from 0 to {MAX_WAIT_MS}")
        if isinstance(target, Predictor):
            predictor = target
            self._preprocess = preprocess_fn or predictor.preprocess
            self._infer = lambda prepared: _score(predictor, prepared)
            self._input_errors: tuple[type[BaseException], ...] = INPUT_ERRORS
            max_batch = min(max_batch, predictor.max_batch)
        elif callable(target):
            self._preprocess = preprocess_fn or _identity
            self._infer = target
            self._input_errors = (Exception,)
        else:
            raise TypeError(f"MicroBatcher needs a Predictor or a callable, got {type(target).__name__}")
        self.max_batch = int(max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # makes "check closed + enqueue" atomic against close()
        self.stats = _Stats(latency_window)
        self._collect_lock = threading.Lock()  # one collector at a time: batches fill before the next
        self.workers = int(workers)
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------------------ callers
    def submit(self, *args: Any) -> Future:
        """Queue one request; returns a Future of its result (or of its own error). Arguments that
        do not fit the preprocessing function (for a Predictor: audio, text[, sample_rate]) raise
        InputError here, before anything is queued."""
        self._check_arguments(args)
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self._queue.qsize() >= self.max_queue:
                raise Overloaded(f"too many queued requests ({self.max_queue}); retry later")
            with self.stats.lock:
                self.stats.submitted += 1
            self._queue.put(_Request(args, future))
        return future

    def _check_arguments(self, args: tuple) -> None:
        try:
            signature = inspect.signature(self._preprocess)
        except (TypeError, ValueError):  # a builtin without a signature: its call will tell
            return
        try:
            signature.bind(*args)
        except TypeError as exc:
            raise InputError(f"submit{_shown(args)}: {exc}; expected {_call_form(signature)}") from None

    def predict(self, *args: Any, timeout: float | None = None) -> Any:
        """Blocking convenience: submit and wait."""
        return self.submit(*args).result(timeout)

    async def predict_async(self, *args: Any) -> Any:
        """asyncio helper: submit and await without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(*args))

    @property
    def closed(self) -> bool:
        return self._closed

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = None) -> None:
        """Stop intake, finish every queued request, stop the worker. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                for _ in self._threads:
                    self._queue.put(_STOP)  # behind every accepted request (FIFO)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def __enter__(self) -> "MicroBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ worker
    def _collect(self) -> tuple[list[_Request], bool]:
        with self._collect_lock:
            return self._collect_locked()

    def _collect_locked(self) -> tuple[list[_Request], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, stop = [first], False
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        while True:
            batch, stop = self._collect()
            if batch:
                self._process(batch)
            if stop:
                # Drain: anything queued before close() still gets an answer.
                # (Requests are FIFO-ahead of the sentinels, so this finds none in practice.)
                rest, stops = [], 0
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stops += 1
                    else:
                        rest.append(item)
                for _ in range(stops):
                    self._queue.put(_STOP)  # other workers' sentinels
                for start in range(0, len(rest), self.max_batch):
                    self._process(rest[start:start + self.max_batch])
                return

    def _finish(self, req: _Request, *, result: Any = None, error: BaseException | None = None,
                kind: str) -> None:
        latency = (time.perf_counter() - req.enqueued) * 1000.0
        with self.stats.lock:
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)
            if kind == "succeeded":
                self.stats.latency_ms.append(latency)
        if error is not None:
            req.future.set_exception(_detached(error))
        else:
            req.future.set_result(result)

    def _process(self, batch: list[_Request]) -> None:
        live, prepared = [], []
        for req in batch:
            if not req.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                prepared.append(self._preprocess(*req.args))
                live.append(req)
            except self._input_errors as exc:
                self._finish(req, error=exc, kind="rejected")
            except Exception as exc:  # a bug in preprocessing: still only this request fails
                self._finish(req, error=exc, kind="failed")
        if not live:
            return
        with self.stats.lock:
            self.stats.batches += 1
            self.stats.batch_sizes[len(live)] += 1
        try:
            results = list(self._infer(prepared))
            if len(results) != len(live):
                raise RuntimeError(f"infer_fn returned {len(results)} results for {len(live)} requests")
        except Exception as exc:
            log.error("a batch of %d request(s) failed", len(live), exc_info=exc)
            for req in live:
                self._finish(req, error=exc, kind="failed")
            return
        for req, result in zip(live, results):
            if isinstance(result, BaseException):
                self._finish(req, error=result, kind="rejected")
            else:
                self._finish(req, result=result, kind="succeeded")
