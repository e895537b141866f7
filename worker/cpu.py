"""CPU work off the worker's interpreter lock: a small pool of processes for decoding and building.

A worker's jobs, prepare hints and deliveries are threads of one process, and the heaviest of
their work holds the GIL: pydicom's JPEG 2000 decoder (openjpeg) for the whole image (0.26 s for
the real CR; two threads take as long as one after the other), highdicom and pydicom building
and encoding the SR and SC. On a 2-core host at one study a second that kept every other thread
waiting. In a process of this pool each runs on a core of its own.

``PLEURA_CPU_PROCESSES=0`` runs everything in the calling thread. The pool starts on first use
(or :meth:`CpuPool.start`) from a ``forkserver`` (a clean single-threaded process: the worker's
threads are never forked). Until a process of the first pool has answered, calls run in the
calling thread: starting the fork server imports the worker's modules again (seconds on a loaded
host), and a restarted process's backlog must not wait for that. A process that dies (a decoder
crash, the OOM killer) fails the call it ran with ``BrokenProcessPool``, and the next call gets
a new pool, and waits for it: a retried crash must not run in the worker itself.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np
from pydicom import Dataset, dcmread

from dicom_node.pixels import decode

T = TypeVar("T")
#: Imported once by the fork server, which forks every pool process ready to work; with ``spawn``
#: each process imported the main script itself (``pleura``: worker.cli, 838 modules, 2.8 s).
#: Calls run in-thread until the first pool answers (the class docstring), so no start waits on it.
_PRELOAD = ["__main__", "worker.cpu", "worker.process.result_objects"]


def decode_file(path: str) -> np.ndarray:
    """:func:`dicom_node.pixels.decode` of the file at ``path``."""
    return decode(dcmread(path))


class CpuPool:
    """Runs picklable calls in ``processes`` processes (none: in the caller's thread)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._first: Future[int] | None = None  # the first pool's first call: done, calls go to pools
        self._lock = threading.Lock()

    def decode(self, ds: Dataset, path: str) -> np.ndarray:
        """The image of ``ds``, read from ``path``, as float32 MONOCHROME2 in [0, 1]; raises what
        ``decode`` raises. A pool process reads the file itself: only the path crosses over."""
        if not self._ready():
            return decode(ds)
        return self.call(decode_file, path)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a pool process (in this thread while none is up yet); its exception, or
        ``BrokenProcessPool`` if the process died."""
        if not self._ready():
            return fn(*args)
        pool = self._started()
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            self._replace(pool)
            raise

    def start(self) -> None:
        """Start the processes now (without waiting for them), so that the first study need not."""
        if self.processes > 0:
            pool = self._started()
            for _ in range(self.processes):  # a process per task submitted while none is idle
                pool.submit(abs, 0)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Start the pool if need be; whether calls go to it within ``timeout`` seconds."""
        if self.processes <= 0:
            return False
        self._started()
        assert self._first is not None
        wait([self._first], timeout)
        return self._first.done()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _ready(self) -> bool:
        """Whether calls go to a pool: processes are configured and the first pool has answered (or died)."""
        if self.processes <= 0:
            return False
        self._started()
        assert self._first is not None
        return self._first.done()

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(_PRELOAD)
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
                if self._first is None:
                    self._first = self._pool.submit(abs, 0)
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)
