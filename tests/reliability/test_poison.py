"""Issue 5 item 4: poison studies are quarantined after the configured attempts; others flow.

One study's decoder SIGKILLs the worker on every try (a supervisor restarts the worker, as
systemd or compose would), another's inference raises MemoryError on every try. Both end FAILED with
their reason in the ledger, the event trail and ``pleura status``, while four ordinary
studies sent at the same time are delivered exactly once.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.filing import StoredInstance
from tests.e2e.harness import Proc, pleura, pleura_run, storescp, wait_port
from tests.figures import save
from tests.reliability.ingest import Ledger as SQL
from tests.reliability.services import PrivateRedis, pleura_env, received_by_study, synth_studies
from tests.support import ROOT, free_port, wait_for
from worker.assemble.sweeper import sweep
from worker.ledger import Event, Job, Study
from worker.ledger.db import Ledger, upgrade
from worker.listen.receiver import LedgerReceiver
from worker.process import jobs

MAX_ATTEMPTS = 3


def test_a_job_whose_worker_dies_every_time_is_quarantined_at_claim(db_url: str) -> None:
    """Without a `fail()` call (the process died), the claim after the last attempt quarantines."""
    upgrade(db_url)
    ledger = Ledger(db_url)
    LedgerReceiver(ledger).instance_stored(StoredInstance(
        association=None, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", sop_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3", series_instance_uid="1.2.3.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR", path="/spool/1.2.3.4", size=10, sha256="a" * 64))
    job_id = sweep(ledger, 0, 60, lambda task, row: True).queued[0]
    assert not jobs.previous_attempt_died(ledger, job_id)
    for _ in range(MAX_ATTEMPTS):  # each attempt's worker dies: its lease just runs out
        assert jobs.claim(ledger, job_id, 0.05, MAX_ATTEMPTS) is not None
        time.sleep(0.1)
        assert jobs.previous_attempt_died(ledger, job_id)
    assert jobs.claim(ledger, job_id, 0.05, MAX_ATTEMPTS) is None
    assert jobs.claim(ledger, job_id, 0.05, MAX_ATTEMPTS) is None  # a second message changes nothing
    with ledger.session() as s:
        job, study = s.get(Job, job_id), s.scalars(select(Study)).one()
        assert (job.state, job.attempts, job.error) == ("FAILED", MAX_ATTEMPTS, "worker died 3 times (lease expired)")
        assert (study.state, study.note) == ("FAILED", "processing failed: worker died 3 times (lease expired)")
        assert len(s.scalars(select(Event).where(Event.kind == "job_failed")).all()) == 1
    ledger.close()


def test_isolation_runs_a_suspect_job_alone() -> None:
    """Exclusive holders wait for shared ones to leave and keep new shared ones out until done."""
    isolation, order, inside, release_a = jobs.Isolation(), [], threading.Event(), threading.Event()

    def job(name: str, exclusive: bool, until: threading.Event | None = None) -> None:
        with isolation.hold(exclusive):
            order.append(f"{name}+")
            inside.set()
            if until is None:
                time.sleep(0.05)
            else:
                until.wait(30)
            order.append(f"{name}-")

    first = threading.Thread(target=job, args=("a", False, release_a))  # holds its share until released
    first.start()
    assert inside.wait(30)
    suspect = threading.Thread(target=job, args=("suspect", True))
    suspect.start()
    wait_for(lambda: isolation._waiting_exclusive == 1, 30, "the suspect waiting for the lock", interval=0.01)
    later = threading.Thread(target=job, args=("b", False))  # must queue behind the waiting suspect
    later.start()
    later.join(0.2)  # time for it to (wrongly) join "a"
    release_a.set()
    for t in (first, suspect, later):
        t.join(30)
    assert order == ["a+", "a-", "suspect+", "suspect-", "b+", "b-"]


@pytest.mark.integration


class Supervisor(threading.Thread):
    """Restarts the worker whenever it dies (like ``Restart=always``) and counts the deaths."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.tmp_path, self.env, self.deaths = tmp_path, env, 0
        self.proc = self._start()
        self._halt = threading.Event()

    def _start(self) -> Proc:
        return Proc([sys.executable, "-m", "tests.reliability.crashing_worker", "worker", "--name",
                     f"w{self.deaths}"], self.tmp_path / f"worker{self.deaths}.log", self.env)

    def run(self) -> None:
        while not self._halt.wait(0.2):
            if not self.proc.alive():
                self.deaths += 1
                self.proc = self._start()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.proc.stop()


def test_poison_studies_are_quarantined_while_others_flow(
    pg_url: str, nih: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    kill, oom, *ordinary = synth_studies(nih, tmp_path / "studies", 6)
    uid = {p: dcmread(p, stop_before_pixels=True) for p in (kill, oom, *ordinary)}
    cleanup = request.addfinalizer  # run last-in first-out, each even if another fails
    redis = PrivateRedis(tmp_path / "redis")  # private: the shared brokers' queues carry other tests' ids
    cleanup(redis.close)
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    cleanup(dest.stop)
    port = free_port()
    env = pleura_env(tmp_path, pg_url, redis.url, port, f"DEST@127.0.0.1:{dest_port}",
                     max_attempts=MAX_ATTEMPTS)
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    cleanup(listen.stop)
    supervisor = Supervisor(tmp_path, {**env, "PYTHONPATH": str(ROOT),
                                       "PLEURA_TEST_KILL_SOPS": str(uid[kill].SOPInstanceUID),
                                       "PLEURA_TEST_OOM_SOPS": str(uid[oom].SOPInstanceUID)})
    supervisor.start()
    cleanup(supervisor.stop)
    ledger_sql = SQL(pg_url)
    cleanup(ledger_sql.close)
    rows = ledger_sql.rows

    def study(path: Path) -> dict:  # type: ignore[type-arg]
        found = rows("SELECT s.id, s.state, s.note, j.state AS job_state, j.attempts, j.error FROM studies s "
                     "LEFT JOIN jobs j ON j.study_id = s.id WHERE s.study_instance_uid = :u",
                     u=str(uid[path].StudyInstanceUID))
        return found[0] if found else {}

    try:
        wait_port(port, listen)
        pleura_run({}, "send", "127.0.0.1", str(port), str(tmp_path / "studies"), "--calling-ae", "MODALITY")

        def settled() -> bool:
            return (all(study(p).get("state") == "FAILED" for p in (kill, oom))
                    and all(study(p).get("state") == "DONE" for p in ordinary)
                    and not rows("SELECT id FROM deliveries WHERE state <> 'DELIVERED'")
                    and len(rows("SELECT id FROM deliveries")) == 2 * len(ordinary))

        wait_for(settled, 300, "poison studies quarantined and the others delivered", interval=0.5)

        killed, starved = study(kill), study(oom)
        assert killed["job_state"] == "FAILED" and killed["attempts"] == MAX_ATTEMPTS
        assert killed["error"] == f"worker died {MAX_ATTEMPTS} times (lease expired)"
        assert killed["note"] == f"processing failed: {killed['error']}"
        assert starved["job_state"] == "FAILED" and starved["attempts"] == MAX_ATTEMPTS
        assert starved["error"].startswith("MemoryError: out of memory during inference")
        assert starved["note"] == f"processing failed: {starved['error']}"
        assert supervisor.deaths == MAX_ATTEMPTS  # the killer study, and nothing else, killed the worker
        for path, reason in ((kill, "worker died"), (oom, "MemoryError")):
            events = rows("SELECT detail FROM events WHERE kind = 'job_failed' AND study_id = :s",
                          s=study(path)["id"])
            assert len(events) == 1 and reason in events[0]["detail"]

        held = received_by_study(tmp_path / "received")
        for path in ordinary:
            copies = held[str(uid[path].StudyInstanceUID)]
            assert len(copies) == 2 and set(copies.values()) == {1}, "one SR and one SC, each once"
        assert str(uid[kill].StudyInstanceUID) not in held and str(uid[oom].StudyInstanceUID) not in held
        ordinary_attempts = [study(p)["attempts"] for p in ordinary]
        # at most one attempt lost to the killer's first try (before it was known to kill); after that it runs alone
        assert max(ordinary_attempts) <= 2

        status = pleura_run(env, "status", "--limit", "50")
        for path, reason in ((kill, f"worker died {MAX_ATTEMPTS} times"), (oom, "MemoryError")):
            line = next(i for i, text_ in enumerate(status.splitlines())
                        if text_.startswith(str(uid[path].StudyInstanceUID)))
            block = "\n".join(status.splitlines()[line:line + 3])
            assert "FAILED" in block and reason in block
        save("poison", {
            "studies_sent": 6, "poison_studies": 2, "ordinary_studies": len(ordinary),
            "max_attempts": MAX_ATTEMPTS, "worker_processes_killed_by_poison": supervisor.deaths,
            "poison_quarantined": 2, "ordinary_delivered": len(ordinary), "studies_lost": 0,
            "duplicates_delivered": sum(c - 1 for copies in held.values() for c in copies.values()),
            "ordinary_attempts": ordinary_attempts,
        })
    except BaseException:
        print(f"--- listen\n{listen.tail()}\n--- worker\n{supervisor.proc.tail()}")
        print(rows("SELECT s.state, s.note, j.state AS job, j.attempts, j.error FROM studies s "
                   "LEFT JOIN jobs j ON j.study_id = s.id"), rows("SELECT state, count(*) FROM deliveries GROUP BY 1"))
        raise
