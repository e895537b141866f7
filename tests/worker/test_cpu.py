"""worker.cpu: decoding and result building in pool processes give what the calling thread gives,
and a pool process that dies fails only its own call."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from pydicom import dcmread

from tests.support import REAL_CR
from worker.cpu import CpuPool, decode_file


@pytest.fixture(scope="module")
def pool() -> Iterator[CpuPool]:
    p = CpuPool(1)
    p.start()
    assert p.wait_ready(120), "the pool's first process did not answer"
    yield p
    p.close()


def test_a_pool_process_decodes_as_the_calling_thread_does(pool: CpuPool) -> None:
    if not REAL_CR.exists():
        pytest.skip(f"shared data {REAL_CR} is absent (see ../shared/data/README.md)")
    here = decode_file(str(REAL_CR))
    there = pool.decode(dcmread(REAL_CR), str(REAL_CR))
    assert there.dtype == np.float32 and there.shape == (1955, 1841) and np.array_equal(here, there)
    assert CpuPool(0).decode(dcmread(REAL_CR), str(REAL_CR)).tobytes() == here.tobytes()


def test_undecodable_input_raises_its_error_from_the_pool(pool: CpuPool, tmp_path) -> None:
    bad = tmp_path / "not-dicom.dcm"
    bad.write_bytes(b"not a DICOM file at all")
    with pytest.raises(Exception) as raised:
        pool.call(decode_file, str(bad))
    assert not isinstance(raised.value, BrokenProcessPool)


def test_a_process_that_dies_fails_its_call_and_the_next_call_gets_a_new_pool(pool: CpuPool) -> None:
    with pytest.raises(BrokenProcessPool):
        pool.call(os._exit, 9)  # as a decoder crash or the OOM killer would end it
    assert pool.call(abs, -3) == 3


def test_calls_run_in_the_calling_thread_until_the_first_pool_is_up_and_wait_for_a_replaced_one() -> None:
    p = CpuPool(1)
    try:
        p.start()  # the fork server imports the worker's modules: far longer than the next line
        assert p.call(os.getpid) == os.getpid()
        assert p.wait_ready(120) and p.call(os.getpid) != os.getpid()
        with pytest.raises(BrokenProcessPool):
            p.call(os._exit, 9)
        assert p.call(os.getpid) != os.getpid()  # a new pool, not this process (a retried crash stays out)
    finally:
        p.close()
    assert CpuPool(0).call(os.getpid) == os.getpid() and not CpuPool(0).wait_ready(0)
