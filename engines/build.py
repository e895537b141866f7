"""Prebuild an engine before it serves: ``pleura models build NAME``.

For TensorRT this compiles and caches the plan (minutes, once per GPU and bundle); for every
backend it loads the bundle, runs the parity gate and warms up at a few batch sizes, so that
the first study does not pay for any of it and a bad backend is found now rather than then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engines import parity
from engines.bundle import Bundle, load_bundle
from engines.runtime import load

Progress = Callable[[str], None]

WARMUP_BATCHES = (1, 8)


@dataclass(frozen=True)
class BuildReport:
    """What was built, where it is cached, and how the engine did on the parity gate and warm-up."""

    bundle: str
    version: str
    bundle_sha256: str
    backend: str
    precision: str
    selection_reason: str
    parity: parity.ParityReport
    artifact: Path | None  # the cached TensorRT plan, when the backend has one
    load_seconds: float
    warmup_ms: dict[int, float]  # batch size -> latency of the last warm-up run

    def describe(self) -> str:
        warm = ", ".join(f"batch {n}: {ms:.1f} ms" for n, ms in self.warmup_ms.items())
        lines = [
            f"{self.bundle} {self.version} (sha256 {self.bundle_sha256[:12]}) "
            f"ready on {self.backend} ({self.precision})",
            f"  chosen because: {self.selection_reason}",
            f"  parity PASSED: {self.parity.describe()}",
            f"  loaded in {self.load_seconds:.1f} s; warm-up {warm}",
        ]
        if self.artifact is not None:
            lines.append(f"  cached plan: {self.artifact}")
        return "\n".join(lines)


def build(
    bundle: Bundle | str | Path,
    backend: str = "auto",
    progress: Progress | None = None,
    warmup_batches: Sequence[int] = WARMUP_BATCHES,
) -> BuildReport:
    """Load ``bundle`` on ``backend`` through the parity gate (building any plan) and warm it up."""
    say = progress or (lambda message: None)
    if not isinstance(bundle, Bundle):
        say(f"reading bundle {bundle}")
        bundle = load_bundle(bundle)
    say(f"loading {bundle.name} {bundle.version} on backend {backend} and running the parity gate")
    started = time.perf_counter()
    with _forwarded(say):
        engine = load(bundle, backend=backend)
    load_seconds = time.perf_counter() - started
    assert engine.parity is not None
    say(f"{engine.backend} passed the parity gate in {load_seconds:.1f} s")
    inputs, _ = parity.golden(bundle)
    warmup = {}
    for i, size in enumerate(warmup_batches, 1):
        images = [inputs[k % len(inputs)] for k in range(size)]
        engine.infer(images)  # first run at a size may allocate or autotune
        started = time.perf_counter()
        engine.infer(images)
        warmup[size] = (time.perf_counter() - started) * 1000.0
        say(f"warm-up {i}/{len(warmup_batches)}: batch {size} in {warmup[size]:.1f} ms")
    return BuildReport(
        bundle=bundle.name,
        version=bundle.version,
        bundle_sha256=bundle.sha256,
        backend=engine.backend,
        precision=engine.precision,
        selection_reason=engine.selection_reason,
        parity=engine.parity,
        artifact=engine.artifact,
        load_seconds=load_seconds,
        warmup_ms=warmup,
    )


class _Forward(logging.Handler):
    def __init__(self, say: Progress) -> None:
        super().__init__(logging.INFO)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        self.say(record.getMessage())


@contextmanager
def _forwarded(say: Progress) -> Iterator[None]:
    """Pass the TensorRT backend's progress (plan build, cache) to ``say`` while loading."""
    logger = logging.getLogger("engines.backends.tensorrt")
    handler, level = _Forward(say), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
