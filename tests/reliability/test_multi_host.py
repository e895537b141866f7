"""Issue 17 must-show 1: listeners and workers that share no filesystem (``PLEURA_STORAGE=database``).

Two `pleura listen` and two `pleura worker` processes, each with its own data dir, on one
PostgreSQL ledger and a RabbitMQ broker of the test's own. Ten studies: four split across both
listeners (their halves sent at once, one association each), three to each listener alone;
one listener is killed -9 mid-study and the sender resends that whole study to the other. Every
study must be assembled and delivered exactly once, and the bytes in the database must be the
bytes that were sent.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from tests.e2e.harness import pleura, pleura_run, running, storescp, wait_port
from tests.reliability.ingest import (
    SUCCESS,
    Ledger,
    SendLog,
    dataset_bytes_of_file,
    production_env,
    send,
    small_studies,
    wire_bytes,
)
from tests.reliability.services import PrivateRabbitMQ
from tests.support import free_port, wait_for
from worker.ledger.db import Ledger as LedgerDb
from worker.storage import DatabaseStorage, instance_key

STUDIES, IMAGES, SPLIT, KILLED = 10, 4, 4, 7  # studies 0-3 split, 4-6 to A, 7-9 to B; A dies during 7
#: The killed study's first association was aborted, so it completes by the quiet period once the
#: resend to B ends: far longer than the gap between the kill and the resend on a loaded host.
QUIET = 30
#: The halves of a split study go to both listeners at once: a half whose association ends first must
#: wait for the other (the settle time) even when a loaded host starts the second sender late.
SETTLE = 5
#: No worker is killed here: a lease far longer than a job on a loaded host, so that none is lost to a
#: starved renewal (a worker whose lease is lost drops its results and leaves their outbox copies).
LEASE = 300

pytestmark = pytest.mark.integration


def test_two_listeners_two_workers_no_shared_paths(pg_url: str, broker: PrivateRabbitMQ, nih: Path,
                                                   tmp_path: Path) -> None:
    studies = small_studies(nih, STUDIES, IMAGES, size=256)
    sent = {str(ds.SOPInstanceUID): wire_bytes(ds) for study in studies for ds in study}
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    ports = {"a": free_port(), "b": free_port()}

    def env(name: str, port: int) -> dict[str, str]:
        return {**production_env(pg_url, broker.url, tmp_path / name, port, dest_port, QUIET, lease=LEASE),
                "PLEURA_STORAGE": "database", "PLEURA_STUDY_SETTLE_SECONDS": str(SETTLE)}

    pleura_run(env("setup", 0), "db", "upgrade")
    listen = {n: pleura("listen", env(f"listen-{n}", p), tmp_path / f"listen-{n}.log") for n, p in ports.items()}
    workers = [pleura("worker", env(f"worker-{n}", 0), tmp_path / f"worker-{n}.log", "--name", n) for n in "xy"]
    ledger = Ledger(pg_url)
    with running(*listen.values(), *workers, dest):
        for n, p in ports.items():
            wait_port(p, listen[n])
        log = SendLog()
        for study in studies[:SPLIT]:  # the halves of one study at once, to both listeners
            halves = [threading.Thread(target=send, args=(ports[n], part, log))
                      for n, part in (("a", study[:IMAGES // 2]), ("b", study[IMAGES // 2:]))]
            for t in halves:
                t.start()
            for t in halves:
                t.join(60)
        for study in studies[SPLIT:KILLED]:
            send(ports["a"], study, log, resend_after_abort=2)
        for study in studies[KILLED + 1:]:
            send(ports["b"], study, log, resend_after_abort=2)
        assert all(s == SUCCESS for _, s in log.answers) and len(log.answers) == (STUDIES - 1) * IMAGES

        killed = studies[KILLED]
        dying = SendLog()
        send(ports["a"], killed, dying, after_each=lambda _uid, _s: listen["a"].kill9() if len(
            dying.with_status(SUCCESS)) >= IMAGES // 2 and listen["a"].alive() else None, timeout=10)
        assert not listen["a"].alive() and len(dying.with_status(SUCCESS)) < IMAGES
        resend = SendLog()
        send(ports["b"], killed, resend, resend_after_abort=2)  # the PACS fails over to the other listener
        assert [s for _, s in resend.answers] == [SUCCESS] * IMAGES

        def delivered() -> bool:
            return (ledger.scalar("SELECT count(*) FROM studies WHERE state = 'DONE'") == STUDIES
                    and ledger.scalar("SELECT count(*) FROM deliveries WHERE state <> 'DELIVERED'") == 0
                    and ledger.scalar("SELECT count(*) FROM deliveries") == STUDIES * (IMAGES + 1))

        wait_for(delivered, QUIET + 120, "every study delivered", interval=0.5)

        def kept_by_workers() -> list[Path]:  # a worker removes its copies once the database holds them
            return [p for name in ("worker-x", "worker-y") for p in (tmp_path / name).rglob("*.dcm") if p.is_file()]

        wait_for(lambda: not kept_by_workers(), 60, "the workers' outbox copies removed", interval=0.5)

    objects = [dcmread(p, stop_before_pixels=True) for p in (tmp_path / "received").iterdir()]
    copies = Counter(str(o.SOPInstanceUID) for o in objects)
    srs = Counter(str(o.StudyInstanceUID) for o in objects if o.SOPClassUID == Comprehensive3DSRStorage)
    assert max(copies.values()) == 1 and len(objects) == STUDIES * (IMAGES + 1)  # each object once
    assert srs == {str(s[0].StudyInstanceUID): 1 for s in studies}  # each study once, one SR
    assert ledger.scalar("SELECT count(*) FROM jobs") == STUDIES  # assembled once: one revision each
    split = [str(s[0].StudyInstanceUID) for s in studies[:SPLIT]]
    # which listener took each instance: its spool path is under that listener's own data dir
    took: dict[str, set[str]] = {}
    for r in ledger.rows("SELECT s.study_instance_uid, i.spool_path FROM instances i JOIN studies s "
                         "ON s.id = i.study_id"):
        took.setdefault(r["study_instance_uid"], set()).add(Path(r["spool_path"]).relative_to(tmp_path).parts[0])
    both = {uid for uid, where in took.items() if where == {"listen-a", "listen-b"}}
    assert both == {*split, str(studies[KILLED][0].StudyInstanceUID)}  # the killed one: A's part, then B's resend
    # the bytes in the database are the bytes that were sent (read back as another host would)
    storage = DatabaseStorage(LedgerDb(pg_url), tmp_path / "check")
    rows = ledger.rows("SELECT sop_instance_uid, sha256 FROM instances")
    assert {r["sop_instance_uid"] for r in rows} == set(sent)
    for r in rows:
        copy = storage.fetch(instance_key(r["sha256"]), "")
        assert dataset_bytes_of_file(copy) == sent[r["sop_instance_uid"]]
        storage.done(copy)
    # no host kept what the database holds
    for name in ("listen-a", "listen-b", "worker-x", "worker-y"):
        leftovers = [p for p in (tmp_path / name).rglob("*.dcm") if p.is_file()]
        assert leftovers == [] or name == "listen-a", (name, leftovers[:3])  # killed: a write may be cut short
    workers_used = {r["worker"].split(":")[1] for r in ledger.rows("SELECT worker FROM attempts")}
    assert workers_used <= {"worker-x", "worker-y"}
