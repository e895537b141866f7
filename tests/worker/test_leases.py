"""Leases and retries (worker.leases): who holds a row, the claim that makes a duplicate harmless, backoff."""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from worker import leases
from worker.ledger import Delivery, Job, OutputObject, Study
from worker.ledger.db import Ledger, upgrade, utcnow
from worker.ledger.models import DeliveryState, JobState, StudyState
from worker.settings import Settings


@pytest.fixture
def ledger(db_url: str) -> Ledger:
    upgrade(db_url)
    return Ledger(db_url)


def _delivery(ledger: Ledger, state: str, next_attempt_at: datetime, lease_expires_at: datetime | None = None) -> int:
    now = utcnow()
    with ledger.session() as s:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", state=StudyState.DONE,
                      first_received_at=now, last_received_at=now)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, revision=1, state=JobState.SUCCEEDED, created_at=now)
        s.add(job)
        s.flush()
        output = OutputObject(job_id=job.id, kind="SR", sop_instance_uid=f"2.25.{uuid.uuid4().int}",
                              sop_class_uid="1.2", series_instance_uid="2.25.1", path="/outbox/x", created_at=now)
        s.add(output)
        s.flush()
        row = Delivery(output_object_id=output.id, destination="DEST@127.0.0.1:104", state=state, attempts=0,
                       next_attempt_at=next_attempt_at, lease_owner="elsewhere:worker-1:1",
                       lease_expires_at=lease_expires_at)
        s.add(row)
        s.flush()
        return row.id


def _claim(ledger: Ledger, row_id: int) -> bool:
    with ledger.session() as s:
        return leases.claim(s, Delivery, row_id, 60)


def test_a_due_row_is_claimed_once_and_counts_the_try(ledger: Ledger) -> None:
    row_id = _delivery(ledger, DeliveryState.PENDING, utcnow() - timedelta(seconds=1))
    assert _claim(ledger, row_id)
    assert not _claim(ledger, row_id), "a second message for the same row must not win it"
    with ledger.session() as s:
        row = s.get(Delivery, row_id)
        assert row is not None
        assert (row.state, row.attempts, row.lease_owner) == (DeliveryState.SENDING, 1, leases.owner())


def test_a_row_not_yet_due_or_under_a_live_lease_is_not_claimed_and_an_expired_lease_is(ledger: Ledger) -> None:
    later, earlier = utcnow() + timedelta(hours=1), utcnow() - timedelta(seconds=1)
    assert not _claim(ledger, _delivery(ledger, DeliveryState.PENDING, later))
    assert not _claim(ledger, _delivery(ledger, DeliveryState.SENDING, earlier, lease_expires_at=later))
    assert _claim(ledger, _delivery(ledger, DeliveryState.SENDING, earlier, lease_expires_at=earlier))
    assert not _claim(ledger, _delivery(ledger, DeliveryState.DELIVERED, earlier))


@dataclass
class _Row:
    state: str = DeliveryState.SENDING
    attempts: int = 1
    next_attempt_at: datetime | None = None
    published_at: datetime | None = None


def test_a_failed_try_backs_off_doubling_to_the_cap_and_the_last_try_falls_on_the_horizon() -> None:
    settings = Settings(delivery_backoff_seconds=2, delivery_backoff_max_seconds=10, delivery_horizon_seconds=3600)
    assert [leases.backoff_seconds(settings, n) for n in (1, 2, 3, 4, 100)] == [2, 4, 8, 10, 10]
    row = _Row(attempts=2, published_at=utcnow())
    before = utcnow()
    assert leases.retry_or_fail(row, settings, before, refused=False) == 4
    assert row.state == DeliveryState.PENDING and row.published_at is None
    assert row.next_attempt_at is not None and 3.9 <= (row.next_attempt_at - before).total_seconds() <= 5
    near_horizon = _Row(attempts=4)
    started = utcnow() - timedelta(seconds=3595)
    assert leases.retry_or_fail(near_horizon, settings, started, refused=False) == 10
    assert near_horizon.next_attempt_at == started + timedelta(seconds=3600)


def test_a_refusal_or_a_passed_horizon_ends_the_row_failed() -> None:
    settings = Settings(delivery_horizon_seconds=60)
    refused = _Row()
    assert leases.retry_or_fail(refused, settings, utcnow(), refused=True) is None
    assert refused.state == DeliveryState.FAILED
    late = _Row()
    assert leases.retry_or_fail(late, settings, utcnow() - timedelta(seconds=61), refused=False) is None
    assert late.state == DeliveryState.FAILED


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_lease_owner_names_host_process_and_pid() -> None:
    me = leases.Identity("host1", "worker-7", 4242, explicit_name=True)
    assert str(me) == "host1:worker-7:4242"
    assert not me.is_predecessor("host1:worker-7:4242")  # itself
    assert me.is_predecessor("host1:serve:4242")  # same host and pid: a restarted container
    assert me.is_predecessor(f"host1:worker-1:{_dead_pid()}") and me.is_predecessor(f"host1:{_dead_pid()}")
    assert not me.is_predecessor(f"host1:worker-1:{os.getpid()}")  # alive here
    assert me.is_predecessor("host2:worker-7:99") and not me.is_predecessor("host2:worker-8:99")
    assert not leases.Identity("host1", "worker-1", 4242).is_predecessor("host2:worker-1:99")  # default name
    assert not me.is_predecessor("garbage")
