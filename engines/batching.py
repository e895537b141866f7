"""Dynamic batching: one inference thread per engine merges concurrent requests into batches.

Many threads (studies processed at the same time) call :meth:`DynamicBatcher.infer`. The
inference thread takes the first waiting request, then keeps collecting until it holds
``max_batch`` images or ``max_wait_ms`` have passed since it took that first one, runs the
engine once on all of them and hands each caller its own rows. A lone request therefore waits
at most ``max_wait_ms``; under load a GPU sees large batches. A request larger than
``max_batch`` runs as a batch of its own (the engine splits it as it always does).

An optional ``on_batch(size, seconds)`` observer hears of every engine call that succeeded (the
application counts them; this package knows no metrics system). It must not block.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engines.runtime import InferenceResult

log = logging.getLogger(__name__)

#: ``on_batch(images, seconds)``: one successful engine call of ``images`` images.
BatchObserver = Callable[[int, float], None]


class _Infers(Protocol):
    def infer(self, images: Sequence[np.ndarray]) -> InferenceResult: ...


@dataclass
class _Request:
    images: Sequence[np.ndarray]
    future: Future[InferenceResult] = field(default_factory=Future)


class BatcherClosed(RuntimeError):
    """:meth:`DynamicBatcher.infer` was called after :meth:`DynamicBatcher.close`."""


class DynamicBatcher:
    """Thread-safe front of an engine that batches concurrent :meth:`infer` calls."""

    def __init__(self, engine: _Infers, max_batch: int = 32, max_wait_ms: float = 5.0,
                 on_batch: BatchObserver | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        #: Engine calls made and images run so far (mean batch = images / batches).
        self.batches = 0
        self.images = 0
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._held: _Request | None = None  # taken from the queue but did not fit the last batch
        self._closed = False
        self._lock = threading.Lock()  # orders requests before the close sentinel
        self._thread = threading.Thread(target=self._loop, name="pleura-batcher", daemon=True)
        self._thread.start()

    def infer(self, images: Sequence[np.ndarray]) -> InferenceResult:
        """Outputs for ``images`` exactly as ``engine.infer(images)`` gives them; blocks until ready."""
        request = _Request(list(images))
        with self._lock:
            if self._closed:
                raise BatcherClosed("the dynamic batcher is closed; load the engine again")
            self._queue.put(request)
        return request.future.result()

    def close(self, timeout: float | None = 10.0) -> None:
        """Run the requests already queued, then stop the inference thread; later calls fail."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._held or self._queue.get()
            self._held = None
            if first is None:
                break
            batch, size = [first], len(first.images)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                if size + len(request.images) > self.max_batch:
                    self._held = request
                    break
                batch.append(request)
                size += len(request.images)
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        images = [image for request in batch for image in request.images]
        started = time.perf_counter()
        try:
            result = self.engine.infer(images)
        except BaseException as exc:  # every caller of this batch gets the engine's error
            for request in batch:
                request.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        self.batches += 1
        self.images += len(images)
        start = 0
        for request in batch:
            end = start + len(request.images)
            request.future.set_result(
                InferenceResult(
                    result.findings,
                    result.embeddings[start:end],
                    result.probabilities[start:end],
                    result.maps[start:end],
                )
            )
            start = end
        if self.on_batch is not None:
            try:
                self.on_batch(len(images), seconds)
            except Exception:  # an observer's fault must not stop the inference thread
                log.exception("batch observer failed")
