"""The completion rules (worker.assemble.completion) and the recovery of a dead predecessor's work
(worker.assemble.recovery), on the ledger itself, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from dicom_node.filing import Peer, StoredInstance
from tests.support import wait_for
from worker import leases
from worker.assemble import recovery
from worker.assemble.sweeper import Sweeper, sweep
from worker.ledger import Delivery, Event, Job, OutputObject, Study, StudyArrival
from worker.ledger.db import Ledger, upgrade, utcnow
from worker.ledger.models import DeliveryState, JobState, StudyState
from worker.listen.receiver import LedgerReceiver
from worker.process import jobs
from worker.queue import DELIVER_TASK, PROCESS_TASK

STUDY = "1.2.826.0.1.3680043.10.543.77"
QUIET, SETTLE, MAX_WAIT = 30.0, 1.0, 600.0


@pytest.fixture
def ledger(db_url: str) -> Ledger:
    upgrade(db_url)
    return Ledger(db_url)


class Published(list):
    def __call__(self, task: str, row_id: int) -> bool:
        self.append((task, row_id))
        return True


def _open(receiver: LedgerReceiver) -> int:
    return receiver.association_opened(Peer("MODALITY", "PLEURA", "127.0.0.1", 5000))


def _store(receiver: LedgerReceiver, association: int, n: int, study: str = STUDY) -> None:
    receiver.instance_stored(StoredInstance(
        association=association, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", sop_instance_uid=f"{study}.{n}",
        study_instance_uid=study, series_instance_uid=f"{study}.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR", path=f"/spool/{n}", size=10, sha256=f"{n:064x}"))


def _age(ledger: Ledger, seconds: float) -> None:
    """Move every receipt ``seconds`` into the past, as if that much time had gone by."""
    back = timedelta(seconds=seconds)
    with ledger.session() as s:
        for study in s.scalars(select(Study)):
            study.last_received_at -= back
            study.receiving_since = study.receiving_since and study.receiving_since - back
        for arrival in s.scalars(select(StudyArrival)):
            arrival.last_received_at -= back


def _sweep(ledger: Ledger) -> list[str | None]:
    """The rule of each job a sweep queued."""
    queued = sweep(ledger, QUIET, 60, Published(), SETTLE, MAX_WAIT).queued
    with ledger.session() as s:
        return [s.get(Job, job_id).completed_by for job_id in queued]  # type: ignore[union-attr]


def test_a_released_association_completes_its_study_after_the_settle_time(ledger: Ledger) -> None:
    receiver = LedgerReceiver(ledger)
    woken: list[int] = []
    receiver.on_released = lambda: woken.append(1)
    a = _open(receiver)
    _store(receiver, a, 1)
    _store(receiver, a, 2)
    assert _sweep(ledger) == []  # still open
    _age(ledger, 2 * SETTLE)
    assert _sweep(ledger) == []  # settled, but the association is open: the quiet period decides
    receiver.association_closed(a, "released")
    assert woken == [1]
    assert _sweep(ledger) == ["association"]
    with ledger.session() as s:
        event = s.scalars(select(Event).where(Event.kind == "study_queued")).one()
        assert '"completed_by": "association"' in (event.detail or "")


def test_not_before_the_settle_time_and_not_while_another_association_carries_it(ledger: Ledger) -> None:
    receiver = LedgerReceiver(ledger)
    a, b = _open(receiver), _open(receiver)
    _store(receiver, a, 1)
    receiver.association_closed(a, "released")
    assert _sweep(ledger) == []  # released just now: the settle time has not passed
    _store(receiver, b, 2)  # the same study over a second association, still open
    _age(ledger, 2 * SETTLE)
    assert _sweep(ledger) == []
    receiver.association_closed(b, "released")
    assert _sweep(ledger) == ["association"]
    with ledger.session() as s:
        assert s.scalars(select(Study)).one().revision == 1  # one revision holds both images


def test_an_aborted_association_falls_back_to_the_quiet_period(ledger: Ledger) -> None:
    receiver = LedgerReceiver(ledger)
    a = _open(receiver)
    _store(receiver, a, 1)
    receiver.association_closed(a, "aborted")
    _age(ledger, 2 * SETTLE)
    assert _sweep(ledger) == []
    _age(ledger, QUIET)
    assert _sweep(ledger) == ["quiet"]


def test_a_study_that_never_stops_growing_is_completed_at_the_max_wait(ledger: Ledger) -> None:
    receiver = LedgerReceiver(ledger)
    a = _open(receiver)
    _store(receiver, a, 1)
    _age(ledger, MAX_WAIT)
    _store(receiver, a, 2)  # still arriving: neither settled nor quiet
    assert _sweep(ledger) == ["max_wait"]


def test_a_late_instance_opens_a_revision_that_completes_by_its_own_association(ledger: Ledger) -> None:
    receiver = LedgerReceiver(ledger)
    a = _open(receiver)
    _store(receiver, a, 1)
    receiver.association_closed(a, "aborted")  # revision 1 is decided by the quiet period
    _age(ledger, QUIET + 1)
    assert _sweep(ledger) == ["quiet"]
    b = _open(receiver)
    _store(receiver, b, 2)
    receiver.association_closed(b, "released")
    _age(ledger, 2 * SETTLE)
    assert _sweep(ledger) == ["association"]  # revision 1's aborted association does not count
    with ledger.session() as s:
        assert [j.revision for j in s.scalars(select(Job).order_by(Job.id))] == [1, 2]
        assert s.scalars(select(Study)).one().state == StudyState.QUEUED


def _running(ledger: Ledger, owner: str, n: int) -> tuple[int, int]:
    """Study ``n`` with a RUNNING job and a SENDING delivery both leased to ``owner`` for another hour."""
    receiver = LedgerReceiver(ledger)
    a = _open(receiver)
    _store(receiver, a, 1, study=f"{STUDY}.{n}")
    _age(ledger, QUIET + 1)
    (job_id,) = sweep(ledger, QUIET, 60, Published()).queued
    later = utcnow() + timedelta(hours=1)
    with ledger.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.lease_owner, job.lease_expires_at = JobState.RUNNING, owner, later
        output = OutputObject(job_id=job_id, kind="SR", sop_instance_uid=f"2.25.{job_id}", sop_class_uid="1.2",
                              series_instance_uid="2.25.1", path="/outbox/x", created_at=utcnow())
        s.add(output)
        s.flush()
        delivery = Delivery(output_object_id=output.id, destination="DEST@127.0.0.1:104",
                            state=DeliveryState.SENDING, attempts=1, next_attempt_at=utcnow(), lease_owner=owner,
                            lease_expires_at=later, published_at=utcnow())
        s.add(delivery)
        s.flush()
        return job_id, delivery.id


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_restart_takes_back_its_dead_predecessors_leases_at_once(ledger: Ledger) -> None:
    host = socket.gethostname()
    me = leases.set_identity("worker-a", explicit=True)
    try:
        dead = _running(ledger, f"{host}:worker-b:{_dead_pid()}", 1)  # this host, process gone
        alive = _running(ledger, f"{host}:worker-b:{os.getppid()}", 2)  # this host, process running
        renamed = _running(ledger, f"elsewhere:worker-a:{os.getpid()}", 3)  # this worker's name, another host
        other = _running(ledger, "elsewhere:worker-b:1", 4)  # someone else's, alive as far as we can know
        published = Published()
        found = recovery.recover(ledger, published, requeue_all=False)
        assert sorted(found.jobs) == sorted([dead[0], renamed[0]])
        assert sorted(found.deliveries) == sorted([dead[1], renamed[1]])
        assert sorted(published) == sorted([(PROCESS_TASK, dead[0]), (PROCESS_TASK, renamed[0]),
                                            (DELIVER_TASK, dead[1]), (DELIVER_TASK, renamed[1])])
        # released work is claimable now, by the claim rules as they are; the rest keeps its lease
        assert jobs.claim(ledger, dead[0], 60) is not None
        assert jobs.claim(ledger, alive[0], 60) is None and jobs.claim(ledger, other[0], 60) is None
        with ledger.session() as s:
            assert s.get(Job, dead[0]).lease_owner == str(me)  # type: ignore[union-attr]
            assert s.get(Job, dead[0]).attempts == 1  # type: ignore[union-attr]
            assert s.scalars(select(Event).where(Event.kind == "work_recovered")).one()
        assert dead[0] not in recovery.recover(ledger, Published(), requeue_all=False).jobs  # ours now
    finally:
        leases.set_identity("pleura")


def test_serve_requeues_every_queued_job_and_due_delivery_of_its_predecessor(ledger: Ledger) -> None:
    receiver = LedgerReceiver(ledger)
    a = _open(receiver)
    _store(receiver, a, 1)
    _age(ledger, QUIET + 1)
    (job_id,) = sweep(ledger, QUIET, 60, Published()).queued  # published into a broker that died with it
    published = Published()
    assert recovery.recover(ledger, published, requeue_all=False).jobs == []
    assert recovery.recover(ledger, published, requeue_all=True).jobs == [job_id]
    assert published == [(PROCESS_TASK, job_id)]
    with ledger.session() as s:
        assert s.get(Job, job_id).state == JobState.QUEUED  # type: ignore[union-attr]


def test_the_sweeper_runs_at_every_wake_up_asked_for() -> None:
    runs: list[float] = []
    sweeper = Sweeper(None, lambda: runs.append(time.monotonic()))
    sweeper.start()
    try:
        wait_for(lambda: runs, 5, "the first sweep at start")
        asked = time.monotonic()
        sweeper.wake_in(0.3)
        sweeper.wake_in(0.6)  # a later wake-up is kept, not swallowed by the earlier one
        wait_for(lambda: len(runs) == 3, 5, "two more sweeps")
    finally:
        sweeper.stop()
        sweeper.join(5)
    assert [round(t - asked, 1) for t in runs[1:]] == [0.3, 0.6]
