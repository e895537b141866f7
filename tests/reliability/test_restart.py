"""Instant recovery (issue 15): a process killed with SIGKILL mid-flow, restarted, delivers at once.

`pleura serve` (embedded: SQLite and the in-process broker) and a production `pleura worker`
(PostgreSQL + RabbitMQ, restarted under its ``--name``) are killed while jobs and deliveries
are queued and running. The restarted process takes back its predecessor's leases and queue at
start (a ``work_recovered`` event), so every study is delivered exactly once (a result object
arrives twice only where its delivery was being sent at the kill and the peer may have it
already). The lease is set far beyond the test's wait, so only that recovery can take back the
killed process's leases: no wall-clock bound decides the test. A message the kill cut off between
a row's commit and its publish is in no queue: the sweeper's republish backstop sends it (here
after 30 s, well inside the wait), as it would in production.
How soon after the restart the last delivery comes (about 2-5 s here; issue 15 asks for 10 s)
is a figure (build/figures/restart_*.json) and a benchmark (``bench.time_to_result``), not a check.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kombu import Connection
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from tests.e2e.harness import Proc, embedded_env, pleura, pleura_run, storescp, wait_port
from tests.figures import save
from tests.reliability.ingest import SUCCESS, Ledger, SendLog, send
from tests.reliability.ingest import small_studies as make_studies
from tests.support import free_port, wait_for

STUDIES, PER_STUDY = 6, 2
#: the killed process's leases would come back to the restarted one only after LEASE_SECONDS (default
#: 60 s): far longer than the wait below, so work taken back within it is the start-up recovery's. A
#: message lost in the kill (the row committed, the publish not made) is republished after
#: REPUBLISH_SECONDS (default 120 s), shortened to stay inside the wait
LEASE_SECONDS, REPUBLISH_SECONDS = 1800, 30
RECOVERY_WAIT = 300
#: a study arrives whole over one association and completes at its A-RELEASE (the settle rule);
#: the quiet period decides only for an association the kill left open, and a loaded host's pause
#: between two C-STOREs of a study must not split it
QUIET = 10
SLOW_TIMINGS = {"PLEURA_LEASE_SECONDS": str(LEASE_SECONDS), "PLEURA_REPUBLISH_SECONDS": str(REPUBLISH_SECONDS)}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _in_flight(ledger: Ledger) -> dict[str, int]:
    rows = ledger.rows("SELECT 'job ' || state AS what, count(*) AS n FROM jobs GROUP BY state UNION ALL "
                       "SELECT 'delivery ' || state, count(*) FROM deliveries GROUP BY state")
    return {r["what"]: r["n"] for r in rows}


def _kill_mid_flow_and_restart(name: str, start: Callable[[], Proc], ready: Callable[[Proc], object],
                               ledger: Ledger, port: int, received: Path, nih: Path) -> None:
    studies = make_studies(nih, STUDIES, PER_STUDY)
    log = SendLog()
    victim = start()
    restarted: Proc | None = None
    try:
        ready(victim)
        senders = [threading.Thread(target=send, args=(port, study, log), daemon=True) for study in studies]
        for sender in senders:
            sender.start()

        def mid_flow() -> dict[str, int] | None:
            now = _in_flight(ledger)
            busy = now.get("job RUNNING", 0) + now.get("job QUEUED", 0) >= 2
            return now if busy and now.get("delivery DELIVERED", 0) else None

        wait_for(mid_flow, 120, "jobs queued or running while deliveries are made", interval=0.02)
        victim.kill9()
        at_kill = _in_flight(ledger)
        for sender in senders:
            sender.join(60)
        assert len(log.with_status(SUCCESS)) == STUDIES * PER_STUDY  # every instance was accepted before the kill
        restarted_at = datetime.now(UTC)
        restarted = start()

        def done() -> bool:
            states = _in_flight(ledger)
            return (ledger.scalar("SELECT count(*) FROM studies WHERE state = 'DONE'") == STUDIES
                    and set(states) - {"job SUCCEEDED"} == {"delivery DELIVERED"})

        wait_for(done, RECOVERY_WAIT, "every study delivered after the restart", interval=0.1)
        last = max(r["delivered_at"] for r in ledger.rows("SELECT delivered_at FROM deliveries"))
        last = last if isinstance(last, datetime) else datetime.fromisoformat(str(last))
        seconds = ((last if last.tzinfo else last.replace(tzinfo=UTC)) - restarted_at).total_seconds()

        objects = [dcmread(p, stop_before_pixels=True) for p in received.iterdir()]
        copies = Counter(str(o.SOPInstanceUID) for o in objects)
        distinct = {str(o.SOPInstanceUID): o for o in objects}.values()
        srs = Counter(str(o.StudyInstanceUID) for o in distinct if o.SOPClassUID == Comprehensive3DSRStorage)
        per_study = Counter(str(o.StudyInstanceUID) for o in distinct)
        twice = sum(n - 1 for n in copies.values())
        save(f"restart_{name}", {"studies": STUDIES, "instances_per_study": PER_STUDY, "at_kill": at_kill,
                                 "last_delivery_after_restart_s": round(seconds, 2),
                                 "same_object_received_twice": twice,
                                 "recovered": ledger.rows("SELECT detail FROM events WHERE kind = 'work_recovered'")})
        print(f"\n{name}: at the kill {at_kill}; last delivery {seconds:.2f} s after the restart; "
              f"{twice} objects received twice")
        assert srs == Counter({str(study[0].StudyInstanceUID): 1 for study in studies})  # one SR per study
        assert all(n == 1 + PER_STUDY for n in per_study.values()) and len(per_study) == STUDIES
        assert twice <= at_kill.get("delivery SENDING", 0)  # resent only what was on the wire at the kill
        assert ledger.scalar("SELECT count(*) FROM jobs") == STUDIES
        # leases the kill left: the restarted process took them at start (nothing else could within the wait)
        if at_kill.get("job RUNNING", 0) + at_kill.get("delivery SENDING", 0):
            assert ledger.scalar("SELECT count(*) FROM events WHERE kind = 'work_recovered'"), "no work_recovered"
        assert seconds < LEASE_SECONDS
    except BaseException:
        print(f"--- killed\n{victim.tail()}" + (f"\n--- restarted\n{restarted.tail()}" if restarted else ""))
        raise
    finally:
        for proc in (restarted, victim):
            if proc is not None:
                proc.stop()


def test_serve_killed_mid_flow_delivers_everything_at_once_after_restart(nih: Path, tmp_path: Path) -> None:
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = {**embedded_env(tmp_path, port, dest_port, quiet=QUIET), **SLOW_TIMINGS}
    ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'pleura.db'}")
    logs = iter(range(1, 10))
    try:
        _kill_mid_flow_and_restart("serve", lambda: pleura("serve", env, tmp_path / f"serve{next(logs)}.log"),
                                   lambda proc: wait_port(port, proc, timeout=120),
                                   ledger, port, tmp_path / "received", nih)
    finally:
        ledger.close()
        dest.stop()


def test_production_worker_restarted_under_its_name_delivers_at_once(pg_url: str, amqp_url: str, nih: Path,
                                                                     tmp_path: Path) -> None:
    with Connection(amqp_url) as conn:  # messages left by an earlier run name rows of another database
        conn.SimpleQueue("pleura").clear()
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = {**embedded_env(tmp_path, port, dest_port, quiet=QUIET), **SLOW_TIMINGS, "PLEURA_DATABASE_URL": pg_url,
           "PLEURA_BROKER_URL": amqp_url, "PLEURA_SWEEP_INTERVAL_SECONDS": "0.5"}
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    ledger = Ledger(pg_url)
    logs = iter(range(1, 10))
    try:
        wait_port(port, listen)
        _kill_mid_flow_and_restart(
            "worker", lambda: pleura("worker", env, tmp_path / f"worker{next(logs)}.log", "--name", "gpu-a"),
            lambda proc: wait_for(lambda: " ready" in proc.log.read_text(errors="replace"), 120, "the worker"),
            ledger, port, tmp_path / "received", nih)
    except BaseException:
        print(f"--- listen\n{listen.tail()}")
        raise
    finally:
        ledger.close()
        listen.stop()
        dest.stop()
