"""An attempt that a ledger outage ends is not charged against ``PLEURA_MAX_ATTEMPTS``.

In process, on a private PostgreSQL cluster: three attempts in a row, the cluster is stopped
(immediate mode: connections cut) inside the engine's inference and started again once the
job has met the outage; the sweeper re-publishes the job and it runs again, as a worker would.
With three attempts allowed the study still ends DONE. The control: an ordinary exception in
the inference is charged as before. Before this rule the same run ended FAILED, three attempts
charged (each by ``fail()``, or, when that could not be written either, by the lease expiring).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import event, select, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import OperationalError

from dicom_node.filing import StoredInstance
from engines import InferenceResult
from tests.figures import save
from tests.reliability.ingest import small_studies
from tests.reliability.services import PrivatePostgres
from worker.assemble.sweeper import sweep
from worker.ledger import Attempt, Event, Finding, Job, OutputObject, Study
from worker.ledger.db import Ledger, upgrade
from worker.ledger.models import JobState
from worker.listen.receiver import LedgerReceiver
from worker.process import jobs, pipeline
from worker.runtime import Runtime
from worker.settings import Settings

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 3
OUTAGES = 3
LEASE_SECONDS = 6.0  # the worker tries to record an outage's attempt for about this long
DOWN_SECONDS = 1.0  # how long PostgreSQL stays down after the job met the outage (then it starts)
Infer = Callable[[list], InferenceResult]


@dataclasses.dataclass
class _Cluster:
    pg: PrivatePostgres
    ledger: Ledger
    base: Runtime  # the demo engine and batcher, loaded once for the module


@pytest.fixture(scope="module")
def cluster() -> Iterator[_Cluster]:
    pg = PrivatePostgres()
    upgrade(pg.url)
    ledger = Ledger(pg.url)
    base = Runtime(settings=Settings(), ledger=ledger, publish=lambda task, row_id: True)
    try:
        yield _Cluster(pg, ledger, base)
    finally:
        if base.loaded_engine() is not None:
            base.batcher().close()
        ledger.close()
        pg.close()


def _runtime(cluster: _Cluster, data_dir: Path) -> Runtime:
    settings = Settings(data_dir=data_dir, database_url=cluster.pg.url, max_attempts=MAX_ATTEMPTS,
                        lease_seconds=LEASE_SECONDS, cpu_processes=0, prepare_on_arrival=False)
    return dataclasses.replace(cluster.base, settings=settings)


def _queue(rt: Runtime, ds: Dataset) -> int:
    """Spool and record ``ds`` as the listener does, queue its study at once; the job id."""
    path = rt.settings.spool_dir / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    LedgerReceiver(rt.ledger).instance_stored(StoredInstance(
        association=None, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        transfer_syntax_uid=ExplicitVRLittleEndian, modality="CR", path=str(path), size=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    (job_id,) = sweep(rt.ledger, 0, 60, lambda task, row_id: True).queued
    return job_id


def _drive(rt: Runtime, job_id: int, timeout: float) -> str:
    """Run the job here whenever the sweeper publishes it, until it is SUCCEEDED or FAILED."""
    deadline, published = time.monotonic() + timeout, True
    while True:
        if published:
            pipeline.run_job(rt, job_id)
        with rt.ledger.session() as s:
            state = s.get(Job, job_id).state  # type: ignore[union-attr]
        if state in (JobState.SUCCEEDED, JobState.FAILED) or time.monotonic() > deadline:
            return state
        time.sleep(0.25)
        published = job_id in sweep(rt.ledger, 0, 60, lambda task, row_id: True).republished_jobs


class _Outages:
    """Stops PostgreSQL inside each of the first ``count`` inferences; starts it again
    ``DOWN_SECONDS`` after the job's own thread met the outage (a lease renewal's error does not count)."""

    def __init__(self, pg: PrivatePostgres, ledger: Ledger, count: int) -> None:
        self.pg, self.left, self.restarts = pg, count, 0
        self._ledger, self._met = ledger, threading.Event()
        event.listen(ledger.engine, "handle_error", self._error)

    def _error(self, _context: ExceptionContext) -> None:
        if not threading.current_thread().name.startswith("lease-"):
            self._met.set()

    def wrap(self, infer: Infer) -> Infer:
        def infer_then_stop(images: list) -> InferenceResult:
            result = infer(images)
            if self.left:
                self.left -= 1
                self._met.clear()
                self.pg.stop()
                threading.Thread(target=self._restart, daemon=True).start()
            return result
        return infer_then_stop

    def _restart(self) -> None:
        self._met.wait(30)
        time.sleep(DOWN_SECONDS)
        self.pg.start()
        self.restarts += 1

    def close(self) -> None:
        event.remove(self._ledger.engine, "handle_error", self._error)


def _ledger_view(ledger: Ledger, job_id: int) -> dict:
    with ledger.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        study = s.get(Study, job.study_id)
        assert study is not None
        retries = [json.loads(e.detail) for e in s.scalars(
            select(Event).where(Event.job_id == job_id, Event.kind == "job_retry").order_by(Event.id))]
        return {
            "job_state": job.state, "study_state": study.state, "attempts": job.attempts, "error": job.error,
            "outcomes": list(s.scalars(select(Attempt.outcome).where(Attempt.job_id == job_id)
                                       .order_by(Attempt.id))),
            "retries": retries,
            "outputs": sorted(s.scalars(select(OutputObject.kind).where(OutputObject.job_id == job_id))),
            "findings": len(s.scalars(select(Finding.id).where(Finding.job_id == job_id)).all()),
        }


def test_attempts_ended_by_a_ledger_outage_are_not_charged(
    cluster: _Cluster, nih: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(cluster, tmp_path / "var")
    engine = rt.engine()
    outages = _Outages(cluster.pg, rt.ledger, OUTAGES)
    monkeypatch.setattr(engine, "infer", outages.wrap(engine.infer))
    job_id = _queue(rt, small_studies(nih, 1, 1)[0][0])
    started = time.monotonic()
    try:
        final = _drive(rt, job_id, 60)
    finally:
        outages.close()
    seconds = time.monotonic() - started
    seen = _ledger_view(rt.ledger, job_id)
    print(f"after {seconds:.1f} s: {final} {seen}")

    assert (outages.left, outages.restarts) == (0, OUTAGES)
    assert (seen["job_state"], seen["study_state"]) == ("SUCCEEDED", "DONE")
    assert seen["attempts"] == 1, "the three outage attempts were not charged"
    assert seen["outcomes"] == ["LEDGER_DOWN"] * OUTAGES + ["SUCCEEDED"]
    assert [(r["charged"], r["error"]) for r in seen["retries"]] == [(False, "OperationalError")] * OUTAGES
    assert seen["outputs"] == ["SC", "SR"] and seen["findings"] > 0
    save("ledger_outage_attempts", {
        "max_attempts": MAX_ATTEMPTS, "lease_seconds": LEASE_SECONDS, "outages": OUTAGES,
        "attempt_rows": len(seen["outcomes"]), "attempt_outcomes": seen["outcomes"],
        "charged_attempts": seen["attempts"], "final_job_state": seen["job_state"],
        "final_study_state": seen["study_state"], "outputs": seen["outputs"], "seconds": round(seconds, 1),
    })


def test_an_ordinary_exception_is_still_charged(
    cluster: _Cluster, nih: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(cluster, tmp_path / "var")
    engine, real = rt.engine(), rt.engine().infer
    failures = [RuntimeError("injected inference failure")]

    def infer_or_fail(images: list) -> InferenceResult:
        if failures:
            raise failures.pop()
        return real(images)

    monkeypatch.setattr(engine, "infer", infer_or_fail)
    job_id = _queue(rt, small_studies(nih, 1, 1)[0][0])
    assert _drive(rt, job_id, 30) == JobState.SUCCEEDED
    seen = _ledger_view(rt.ledger, job_id)
    assert seen["attempts"] == 2 and seen["outcomes"] == ["FAILED", "SUCCEEDED"]
    assert [r.get("charged", True) for r in seen["retries"]] == [True]
    assert seen["retries"][0]["error"].startswith("RuntimeError: injected inference failure")


def test_an_error_the_server_answers_with_is_no_outage(cluster: _Cluster) -> None:
    """A statement timeout is an OperationalError too, but the study may cause it again: charged."""
    with pytest.raises(OperationalError) as timeout, cluster.ledger.engine.connect() as conn:
        conn.execute(text("SET statement_timeout = 1"))
        conn.execute(text("SELECT pg_sleep(1)"))
    assert not jobs.ledger_unreachable(timeout.value)
