"""`kill -9` of the listener mid-association (issue 5 item 1), in production mode.

Production mode (`pleura listen` on PostgreSQL + RabbitMQ, a separate `pleura worker`) because
that is what a hospital runs and there the listener dies alone: the worker, the ledger and the
broker live on, as they would when a listener container is killed. (In `pleura serve` the same
kill would take the worker down too and prove less about the listener.)

A sender records the status of every C-STORE of a 30-image study while the listener is
SIGKILLed. Then: every instance answered Success is in the spool with the bytes that were sent
and in the ledger; no ``.dcm`` file is partial; a temporary file of a write cut short is never
an instance and is removed when the listener starts again. The peer resends the whole study,
which completes and is delivered once; the resent duplicates count in ``times_received``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from tests.e2e.harness import pleura, pleura_run, storescp, wait_port
from tests.figures import save
from tests.reliability.ingest import (
    SUCCESS,
    Ledger,
    SendLog,
    dataset_bytes_of_file,
    production_env,
    send,
    sha256,
    small_studies,
    spool_files,
    wire_bytes,
)
from tests.reliability.services import PrivateRabbitMQ
from tests.support import free_port, wait_for

IMAGES = 30
KILL_AFTER_ACKS = 10
#: Longer, with a wide margin, than the sender's wait on the answer the kill lost (10 s) plus a listener
#: restart on a loaded host: the resend must join the same study revision, which (its first association
#: aborted) completes only by the quiet period.
QUIET = 60

pytestmark = pytest.mark.integration


def test_listener_killed_mid_association(pg_url: str, broker: PrivateRabbitMQ, nih: Path, tmp_path: Path) -> None:
    study = small_studies(nih, 1, IMAGES, size=256)[0]
    sent = {str(ds.SOPInstanceUID): wire_bytes(ds) for ds in study}
    received = tmp_path / "received"
    dest, dest_port = storescp(received, tmp_path / "storescp.log")
    port = free_port()
    env = production_env(pg_url, broker.url, tmp_path / "var", port, dest_port, QUIET)
    spool = tmp_path / "var" / "spool"
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    work = pleura("worker", env, tmp_path / "worker.log")
    restarted = None
    ledger = Ledger(pg_url)
    log = SendLog()
    try:
        wait_port(port, listen)

        def kill_when_enough_acked() -> None:
            wait_for(lambda: len(log.with_status(SUCCESS)) >= KILL_AFTER_ACKS, 120, "acknowledged instances",
                     interval=0.002)
            listen.kill9()  # while the sender keeps sending: lands mid-PDU, mid-write or between stores

        killer = threading.Thread(target=kill_when_enough_acked, daemon=True)
        killer.start()
        send(port, study, log, timeout=10)  # pynetdicom waits this long for the answer that never comes
        killer.join(130)
        assert not listen.alive()
        acked = log.with_status(SUCCESS)
        assert KILL_AFTER_ACKS <= len(acked) < IMAGES, "the kill must land mid-association"
        assert log.answers[-1][1] is None, "the association died with the listener"

        # Every acknowledged instance: in the ledger, in the spool, byte for byte what was sent.
        rows = {r["sop_instance_uid"]: r for r in ledger.rows("SELECT * FROM instances")}
        for uid in acked:
            row = rows[uid]
            path = Path(row["spool_path"])
            assert path.parent.parent == spool and path.name == f"{uid}.dcm"
            assert sha256(path.read_bytes()) == row["sha256"]
            assert dataset_bytes_of_file(path) == sent[uid]
        # Nothing unacknowledged was recorded, except possibly the one the kill interrupted
        # after its commit and before its answer left (the peer resends it anyway).
        assert len(set(rows) - set(acked)) <= 1
        # No partial instance file: every .dcm in the spool holds exactly the bytes sent.
        files, temps_after_kill = spool_files(spool)
        assert {p.name[:-4] for p in files} >= set(acked)
        for p in files:
            assert p.suffix == ".dcm" and dataset_bytes_of_file(p) == sent[p.name[:-4]], p.name
        assert not any(r["spool_path"].endswith(".tmp") for r in rows.values())

        # A data set the kill cut short leaves a temporary file in .incoming/ (one of an older version
        # beside its study's files); make sure there is one of each to clean up.
        unacked = next(uid for uid in sent if uid not in rows)
        planted = [spool / ".incoming" / "999999-cut.tmp",
                   spool / str(study[0].StudyInstanceUID) / f".{unacked}.dcm.999999.tmp"]
        for path in planted:
            path.write_bytes(sent[unacked][: len(sent[unacked]) // 2])
        restarted = pleura("listen", env, tmp_path / "listen2.log")
        wait_port(port, restarted)
        assert spool_files(spool)[1] == [] and not any(p.exists() for p in planted), "stale temporary files removed"

        resend = SendLog()
        resent_at = time.monotonic()
        send(port, study, resend, resend_after_abort=2)  # the PACS resends the whole study
        assert [s for _, s in resend.answers] == [SUCCESS] * IMAGES

        def delivered() -> bool:
            return (ledger.scalar("SELECT state FROM studies") == "DONE"
                    and ledger.scalar("SELECT count(*) FROM deliveries WHERE state = 'DELIVERED'") == IMAGES + 1)

        wait_for(delivered, QUIET + 120, "the study delivered after the resend", interval=0.5)
        delivered_s = time.monotonic() - resent_at
        objects = [dcmread(p, stop_before_pixels=True) for p in received.iterdir()]
        copies = Counter(str(o.SOPInstanceUID) for o in objects)
        srs = [o for o in objects if o.SOPClassUID == Comprehensive3DSRStorage]
        times = {r["sop_instance_uid"]: r["times_received"] for r in ledger.rows("SELECT * FROM instances")}
        files, temps = spool_files(spool)
        save("listener_kill", {
            "instances_in_study": IMAGES, "instances_sent_before_kill": len(log.answers),
            "instances_acked_before_kill": len(acked),
            "recorded_but_unacked_at_kill": len(set(rows) - set(acked)),
            "temp_files_left_by_kill": len(temps_after_kill), "cut_short_writes_simulated": len(planted),
            "temp_files_after_restart": len(temps),
            "listener_kills": 1, "listener_restarts": 1, "instances_resent": IMAGES,
            "instances_in_ledger": len(times), "spool_files": len(files),
            "srs_delivered": len(srs), "objects_delivered": len(objects),
            "duplicates_delivered": sum(n - 1 for n in copies.values()),
            "studies_lost": 0 if len(srs) == 1 else 1, "jobs": ledger.scalar("SELECT count(*) FROM jobs"),
            "resend_to_delivered_seconds": round(delivered_s, 1),
        })
        assert len(srs) == 1 and len(objects) == IMAGES + 1 and max(copies.values()) == 1
        assert len(times) == IMAGES and len(files) == IMAGES and temps == []
        assert all(times[uid] == 2 for uid in acked)  # the resend of an acknowledged instance is a duplicate
        assert sum(times.values()) == IMAGES + len(rows)
        assert ledger.scalar("SELECT count(*) FROM jobs") == 1
        assert ledger.scalar("SELECT revision FROM studies") == 1
    except BaseException:
        print(f"--- listen\n{listen.tail()}\n--- worker\n{work.tail()}"
              + (f"\n--- restarted\n{restarted.tail()}" if restarted else ""))
        raise
    finally:
        ledger.close()
        for proc in (restarted, work, listen, dest):
            if proc is not None:
                proc.stop()
