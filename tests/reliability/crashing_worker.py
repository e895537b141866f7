"""Test-only `pleura worker` that fails on marked instances, every time.

``PLEURA_TEST_KILL_SOPS`` (comma-separated SOP Instance UIDs): decoding one SIGKILLs the
worker process, as a decoder segfault or the kernel's OOM killer would.
``PLEURA_TEST_OOM_SOPS``: inference on a study holding one raises MemoryError.
Everything else runs unchanged, except that this worker ignores prepare-on-arrival hints (their
decoding would bypass the marked job's) and decodes in its own process (``PLEURA_CPU_PROCESSES=0``:
with the default pool the kill would end a pool process, which fails only its call, tests/worker/test_cpu.py).
Run as ``python -m tests.reliability.crashing_worker worker``.
"""

from __future__ import annotations

import os
import signal
import sys

from pydicom import Dataset

from worker import cli, cpu
from worker.process import pipeline

os.environ["PLEURA_PREPARE_ON_ARRIVAL"] = "false"
os.environ["PLEURA_CPU_PROCESSES"] = "0"
_KILL = set(filter(None, os.environ.get("PLEURA_TEST_KILL_SOPS", "").split(",")))
_OOM = set(filter(None, os.environ.get("PLEURA_TEST_OOM_SOPS", "").split(",")))
_decode, _infer = cpu.decode, pipeline._infer


def decode(ds: Dataset):  # type: ignore[no-untyped-def]
    if str(ds.SOPInstanceUID) in _KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode(ds)


def infer(batcher, engine, eligible):  # type: ignore[no-untyped-def]
    if any(source.sop_instance_uid in _OOM for source, _ds, _pixels in eligible):
        raise MemoryError("out of memory during inference (injected by the test)")
    return _infer(batcher, engine, eligible)


cpu.decode, pipeline._infer = decode, infer

if __name__ == "__main__":
    cli.main(sys.argv[1:])
