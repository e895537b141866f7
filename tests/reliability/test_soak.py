"""Bounded soak (issue 5 item 13): 1,000 instances over 4 associations into production mode.

`pleura listen` + two `pleura worker` processes on PostgreSQL and RabbitMQ; one worker is
SIGKILLed mid-inference while instances still arrive, then restarted. Every study must be
delivered exactly once: one SR and one SC per image at the DCMTK destination, every delivery
row DELIVERED, no study lost and no second result for any study.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from tests.e2e.harness import Proc, pleura, pleura_run, storescp, wait_port
from tests.figures import save
from tests.reliability.ingest import SUCCESS, Ledger, SendLog, production_env, send_concurrently, small_studies
from tests.reliability.services import PrivateRabbitMQ
from tests.support import free_port, wait_for

STUDIES, PER_STUDY, ASSOCIATIONS = 40, 25, 4
#: Longer than any pause inside one study's run of C-STOREs on a loaded 2-core host, and than the
#: sender's wait on a response pynetdicom lost (SENDER_TIMEOUT) before it resends the rest: a
#: study that paused longer would be split into two revisions. The last studies of each
#: association complete by its A-RELEASE.
QUIET = 10
SENDER_TIMEOUT = 5
#: How long the killed worker's job waits before the sweeper hands it to the other worker.
LEASE = 10

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_soak_with_a_worker_killed(pg_url: str, broker: PrivateRabbitMQ, nih: Path, tmp_path: Path) -> None:
    studies = small_studies(nih, STUDIES, PER_STUDY)
    batches = [[ds for study in studies[a::ASSOCIATIONS] for ds in study] for a in range(ASSOCIATIONS)]
    received = tmp_path / "received"
    dest, dest_port = storescp(received, tmp_path / "storescp.log")
    port = free_port()
    env = production_env(pg_url, broker.url, tmp_path / "var", port, dest_port, QUIET, lease=LEASE)
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    workers: dict[str, Proc] = {name: pleura("worker", env, tmp_path / f"worker-{name}.log", "--name", name)
                                for name in ("a", "b")}
    restarted: Proc | None = None
    ledger = Ledger(pg_url)
    log = SendLog()
    try:
        wait_port(port, listen)
        started = time.monotonic()
        sender = threading.Thread(target=send_concurrently, args=(port, batches, log),
                                  kwargs={"resend_after_abort": 2, "timeout": SENDER_TIMEOUT}, daemon=True)
        sender.start()
        victim = workers["a"]
        wait_for(lambda: ledger.scalar("SELECT count(*) FROM jobs WHERE state = 'SUCCEEDED'") >= STUDIES // 10,
                 180, "a tenth of the studies processed")
        wait_for(lambda: ledger.scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL AND worker LIKE :w",
                                       w=f"%:{victim.popen.pid}"), 120,
                 "the victim worker mid-inference", interval=0.02)
        victim.kill9()
        killed_at = time.monotonic() - started
        done_at_kill = ledger.scalar("SELECT count(*) FROM jobs WHERE state = 'SUCCEEDED'")
        restarted = pleura("worker", env, tmp_path / "worker-a2.log", "--name", "a2")
        sender.join(300)
        sent_at = time.monotonic() - started
        acked = log.with_status(SUCCESS)

        def all_delivered() -> bool:
            return (ledger.scalar("SELECT count(*) FROM studies WHERE state = 'DONE'") == STUDIES
                    and ledger.scalar("SELECT count(*) FROM deliveries WHERE state = 'DELIVERED'")
                    == STUDIES * (PER_STUDY + 1))

        wait_for(all_delivered, 420, "every study delivered", interval=1)
        delivered_at = time.monotonic() - started

        objects = [dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID",
                                                                     "StudyInstanceUID"])
                   for p in received.iterdir()]
        copies = Counter(str(o.SOPInstanceUID) for o in objects)
        distinct = {str(o.SOPInstanceUID): o for o in objects}.values()
        srs_per_study = Counter(str(o.StudyInstanceUID) for o in distinct if o.SOPClassUID == Comprehensive3DSRStorage)
        objects_per_study = Counter(str(o.StudyInstanceUID) for o in distinct)
        sent_studies = {str(study[0].StudyInstanceUID) for study in studies}
        lost = sorted(sent_studies - set(srs_per_study))
        duplicate_results = sum(n - 1 for n in srs_per_study.values()) + sum(
            max(0, n - (PER_STUDY + 1)) for n in objects_per_study.values())
        resent = {uid for uid, n in copies.items() if n > 1}
        retried = ledger.scalar("SELECT count(*) FROM deliveries WHERE attempts > 1")
        save("soak", {
            "instances_sent": len(log.statuses), "instances_acked": len(acked),
            "instances_in_ledger": ledger.scalar("SELECT count(*) FROM instances"),
            "studies": STUDIES, "instances_per_study": PER_STUDY, "associations": ASSOCIATIONS,
            "image_matrix": "128x128", "workers": 2, "lease_seconds": LEASE, "worker_kills": 1, "worker_restarts": 1,
            "killed_after_s": round(killed_at, 1), "jobs_done_at_kill": done_at_kill,
            "jobs": ledger.scalar("SELECT count(*) FROM jobs"),
            "attempts": ledger.scalar("SELECT count(*) FROM attempts"),
            "attempts_killed": ledger.scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL"),
            "studies_lost": len(lost), "duplicate_results_delivered": duplicate_results,
            "objects_delivered": len(distinct), "same_uid_resends_after_kill": sum(copies[u] - 1 for u in resent),
            "deliveries_retried": retried,
            "instances_resent_after_a_lost_response": len(log.resent),
            "send_seconds": round(sent_at, 1), "all_delivered_seconds": round(delivered_at, 1),
            "ingest_instances_per_s": round(len(acked) / sent_at, 1),
            "end_to_end_instances_per_s": round(len(acked) / delivered_at, 1),
        })
        assert not log.errors, log.errors[:5]
        assert len(acked) == len(log.statuses) == STUDIES * PER_STUDY
        assert ledger.scalar("SELECT count(*) FROM instances") == STUDIES * PER_STUDY
        # received twice only where the sender sent it again after pynetdicom lost the response
        twice = {r["sop_instance_uid"]
                 for r in ledger.rows("SELECT sop_instance_uid FROM instances WHERE times_received <> 1")}
        assert twice <= set(log.resent), (twice, log.resent)
        assert lost == [] and duplicate_results == 0
        assert all(n == 1 for n in srs_per_study.values()) and len(srs_per_study) == STUDIES
        assert all(n == PER_STUDY + 1 for n in objects_per_study.values())
        reopened = [dict(r) for r in ledger.rows("SELECT study_id, revision, state, completed_by FROM jobs"
                                                 " WHERE revision > 1")]
        assert ledger.scalar("SELECT count(*) FROM jobs") == STUDIES, reopened  # one job (revision 1) per study
        assert ledger.scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL") >= 1  # the killed one
        # a second copy of the same object only where the ledger shows a retried delivery (the killed worker's)
        assert len(resent) <= retried
    except BaseException:
        print(f"--- listen\n{listen.tail()}\n--- worker b\n{workers['b'].tail()}"
              + (f"\n--- restarted\n{restarted.tail()}" if restarted else ""))
        raise
    finally:
        ledger.close()
        for proc in (restarted, *workers.values(), listen, dest):
            if proc is not None:
                proc.stop()
