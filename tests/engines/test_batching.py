"""Dynamic batching: same outputs as the engine, merged concurrent requests, bounded wait, errors."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from engines import Engine, InferenceResult, batching
from engines.batching import BatcherClosed, DynamicBatcher
from engines.parity import golden

POISON = -1.0


class FakeEngine:
    """Outputs derived from each image's first pixel; records the size of every call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[int] = []

    def infer(self, images: Sequence[np.ndarray]) -> InferenceResult:
        self.calls.append(len(images))
        time.sleep(self.delay)
        values = np.array([float(image.flat[0]) for image in images], np.float32)
        if (values == POISON).any():
            raise ValueError("poisoned image")
        return InferenceResult(
            ("A",), values[:, None].repeat(3, 1), values[:, None], values[:, None, None, None].repeat(2, 2)
        )


def _image(value: float) -> np.ndarray:
    return np.full((4, 4), value, np.float32)


def _concurrently(batcher: DynamicBatcher, requests: list[list[np.ndarray]]) -> list[InferenceResult]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(batcher.infer, requests))


def test_outputs_equal_direct_engine_calls(ort_engine: Engine) -> None:
    inputs, _ = golden(ort_engine.bundle)
    requests = [inputs[:1], inputs[1:], inputs[::-1], inputs[2:3]]
    with DynamicBatcher(ort_engine, max_batch=32, max_wait_ms=20) as batcher:
        results = _concurrently(batcher, requests)
    for request, got in zip(requests, results, strict=True):
        want = ort_engine.infer(request)
        assert got.findings == want.findings
        for key in ("embeddings", "probabilities", "maps"):
            np.testing.assert_allclose(getattr(got, key), getattr(want, key), atol=1e-5)


def test_concurrent_requests_are_merged_within_max_batch() -> None:
    engine = FakeEngine(delay=0.01)
    requests = [[_image(i)] * (1 + i % 3) for i in range(24)]
    # a long wait: the 24 callers' threads start within it even on a loaded machine (full batches go at once)
    with DynamicBatcher(engine, max_batch=8, max_wait_ms=1000) as batcher:
        results = _concurrently(batcher, requests)
    assert len(engine.calls) < len(requests) / 2  # merged, not one call per request
    assert max(engine.calls) <= 8 and sum(engine.calls) == sum(map(len, requests))
    assert (batcher.batches, batcher.images) == (len(engine.calls), sum(engine.calls))
    for i, result in enumerate(results):  # each caller gets its own rows back
        assert result.probabilities[:, 0].tolist() == [float(i)] * (1 + i % 3)


def test_a_request_larger_than_max_batch_runs_alone() -> None:
    engine = FakeEngine()
    with DynamicBatcher(engine, max_batch=4, max_wait_ms=1) as batcher:
        result = batcher.infer([_image(7)] * 10)
    assert engine.calls == [10] and result.embeddings.shape == (10, 3)


class _RecordedQueue(queue.SimpleQueue):
    """The batcher's request queue, recording how long each take from it may block (None: no limit)."""

    def __init__(self) -> None:
        self.waits: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.waits.append(timeout if block else 0.0)
        return super().get(block, timeout)

    def get_nowait(self) -> Any:
        self.waits.append(0.0)
        return super().get_nowait()


@pytest.mark.parametrize("max_wait_ms", [0.0, 30.0])
def test_a_lone_request_waits_at_most_max_wait(max_wait_ms: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a request is in, the batcher waits for company at most ``max_wait_ms`` (asked of its queue, so
    that no clock on a loaded machine decides), then runs the request alone."""
    monkeypatch.setattr(batching, "queue", SimpleNamespace(SimpleQueue=_RecordedQueue, Empty=queue.Empty))
    engine = FakeEngine()
    with DynamicBatcher(engine, max_batch=32, max_wait_ms=max_wait_ms) as batcher:
        for value in (1, 2):
            assert batcher.infer([_image(value)]).probabilities[0, 0] == value
    waits = batcher._queue.waits  # type: ignore[attr-defined]
    assert engine.calls == [1, 1]  # each alone, neither held for a full batch
    bounded = [w for w in waits if w is not None]  # the waits for company (None: idle, waiting for a request)
    assert len(bounded) >= 2 and max(bounded) <= max_wait_ms / 1000


def test_errors_reach_only_the_callers_of_the_failing_batch() -> None:
    engine = FakeEngine(delay=0.005)
    requests = [[_image(POISON if i == 3 else i)] for i in range(8)]
    outcomes: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            outcomes[i] = batcher.infer(requests[i])
        except ValueError as exc:
            outcomes[i] = exc

    with DynamicBatcher(engine, max_batch=1, max_wait_ms=5) as batcher:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(batcher.infer([_image(9)]), InferenceResult)  # still serving
    assert isinstance(outcomes[3], ValueError) and "poisoned" in str(outcomes[3])
    assert all(isinstance(outcomes[i], InferenceResult) for i in range(8) if i != 3)


def test_close_runs_queued_requests_then_refuses() -> None:
    engine = FakeEngine(delay=0.05)
    batcher = DynamicBatcher(engine, max_batch=1, max_wait_ms=1)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher.infer, [_image(i)]) for i in range(4)]
        deadline = time.monotonic() + 5
        while batcher._queue.qsize() < 3 and time.monotonic() < deadline:  # one running, three queued
            time.sleep(0.001)
        batcher.close()
        assert [f.result().probabilities[0, 0] for f in futures] == [0, 1, 2, 3]
    with pytest.raises(BatcherClosed, match="closed"):
        batcher.infer([_image(1)])
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(engine, max_batch=0)
