"""The soak (issue 5 item 13), for the test (a short one) and for ``python -m bench.soak`` (the long one).

`pleura listen` + two `pleura worker` processes on PostgreSQL and RabbitMQ; studies arrive from
several senders at once, one association per study, as modalities send them; one worker is
SIGKILLed mid-inference while instances still arrive, then restarted. Every study must be
delivered exactly once: one SR and one SC per image at the DCMTK destination, every delivery
row DELIVERED, no study lost and no second result for any study.

Each study completes at its association's A-RELEASE (the settle rule), so no quiet period
decides where a study ends: a loaded host that pauses the sender inside a study cannot split it.
The quiet period decides only for a study whose association died (pynetdicom lost a C-STORE
response, see :func:`tests.reliability.ingest.send`) and was sent again over a new one: it is
longer than any such pause plus the sender's wait on the lost response.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import Comprehensive3DSRStorage

from tests.e2e.harness import Proc, pleura, pleura_run, storescp, wait_port
from tests.reliability.ingest import SUCCESS, Ledger, SendLog, production_env, send, small_studies
from tests.support import free_port, wait_for


@dataclass(frozen=True)
class Soak:
    """How much to send, and the timings of the stack it goes to."""

    studies: int
    per_study: int
    #: senders at once, each sending its share of the studies one association after another
    senders: int = 4
    #: see the module's docstring; far longer than SENDER_TIMEOUT and a loaded host's pauses
    quiet: float = 30
    #: the sender's wait on a C-STORE response pynetdicom lost, before it sends the rest again
    sender_timeout: float = 5
    #: how long the killed worker's job waits before the sweeper hands it to another worker
    lease: float = 10

    @property
    def instances(self) -> int:
        return self.studies * self.per_study


def _send_studies(port: int, studies: Sequence[Sequence[Dataset]], log: SendLog, timeout: float) -> None:
    for study in studies:
        send(port, study, log, resend_after_abort=2, timeout=timeout)


def run(soak: Soak, pg_url: str, broker_url: str, nih: Path, workdir: Path,
        record: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """Run the soak on a fresh database and broker; its figures, given to ``record`` before they are
    checked. Fails (AssertionError) on any loss or duplicate."""
    studies = small_studies(nih, soak.studies, soak.per_study)
    shares = [studies[s::soak.senders] for s in range(soak.senders)]
    received = workdir / "received"
    dest, dest_port = storescp(received, workdir / "storescp.log")
    port = free_port()
    env = production_env(pg_url, broker_url, workdir / "var", port, dest_port, soak.quiet, lease=soak.lease)
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, workdir / "listen.log")
    workers: dict[str, Proc] = {name: pleura("worker", env, workdir / f"worker-{name}.log", "--name", name)
                                for name in ("a", "b")}
    restarted: Proc | None = None
    ledger = Ledger(pg_url)
    log = SendLog()
    try:
        wait_port(port, listen)
        started = time.monotonic()
        senders = [threading.Thread(target=_send_studies, args=(port, share, log, soak.sender_timeout), daemon=True)
                   for share in shares]
        for sender in senders:
            sender.start()
        victim = workers["a"]
        wait_for(lambda: ledger.scalar("SELECT count(*) FROM jobs WHERE state = 'SUCCEEDED'") >= soak.studies // 10,
                 300, "a tenth of the studies processed")
        wait_for(lambda: ledger.scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL AND worker LIKE :w",
                                       w=f"%:{victim.popen.pid}"), 300,
                 "the victim worker mid-inference", interval=0.02)
        victim.kill9()
        killed_at = time.monotonic() - started
        done_at_kill = ledger.scalar("SELECT count(*) FROM jobs WHERE state = 'SUCCEEDED'")
        restarted = pleura("worker", env, workdir / "worker-a2.log", "--name", "a2")
        for sender in senders:
            sender.join(900)
        sent_at = time.monotonic() - started
        acked = log.with_status(SUCCESS)

        def all_delivered() -> bool:
            return (ledger.scalar("SELECT count(*) FROM studies WHERE state = 'DONE'") == soak.studies
                    and ledger.scalar("SELECT count(*) FROM deliveries WHERE state = 'DELIVERED'")
                    == soak.studies * (soak.per_study + 1))

        wait_for(all_delivered, 900, "every study delivered", interval=1)
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
            max(0, n - (soak.per_study + 1)) for n in objects_per_study.values())
        resent = {uid for uid, n in copies.items() if n > 1}
        retried = ledger.scalar("SELECT count(*) FROM deliveries WHERE attempts > 1")
        figures = {
            "instances_sent": len(log.statuses), "instances_acked": len(acked),
            "instances_in_ledger": ledger.scalar("SELECT count(*) FROM instances"),
            "studies": soak.studies, "instances_per_study": soak.per_study, "senders": soak.senders,
            "associations_per_study": 1, "image_matrix": "128x128", "workers": 2, "quiet_seconds": soak.quiet,
            "lease_seconds": soak.lease, "worker_kills": 1, "worker_restarts": 1,
            "killed_after_s": round(killed_at, 1), "jobs_done_at_kill": done_at_kill,
            "jobs": ledger.scalar("SELECT count(*) FROM jobs"),
            "completed_by": {r["completed_by"]: r["n"] for r in ledger.rows(
                "SELECT completed_by, count(*) AS n FROM jobs GROUP BY completed_by")},
            "attempts": ledger.scalar("SELECT count(*) FROM attempts"),
            "attempts_killed": ledger.scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL"),
            "studies_lost": len(lost), "duplicate_results_delivered": duplicate_results,
            "objects_delivered": len(distinct), "same_uid_resends_after_kill": sum(copies[u] - 1 for u in resent),
            "deliveries_retried": retried,
            "instances_resent_after_a_lost_response": len(log.resent),
            "send_seconds": round(sent_at, 1), "all_delivered_seconds": round(delivered_at, 1),
            "ingest_instances_per_s": round(len(acked) / sent_at, 1),
            "end_to_end_instances_per_s": round(len(acked) / delivered_at, 1),
        }
        record(figures)
        assert not log.errors, log.errors[:5]
        assert len(acked) == len(log.statuses) == soak.instances
        assert ledger.scalar("SELECT count(*) FROM instances") == soak.instances
        # received twice only where the sender sent it again after pynetdicom lost the response
        twice = {r["sop_instance_uid"]
                 for r in ledger.rows("SELECT sop_instance_uid FROM instances WHERE times_received <> 1")}
        assert twice <= set(log.resent), (twice, log.resent)
        assert lost == [] and duplicate_results == 0
        assert all(n == 1 for n in srs_per_study.values()) and len(srs_per_study) == soak.studies
        assert all(n == soak.per_study + 1 for n in objects_per_study.values())
        reopened = [dict(r) for r in ledger.rows("SELECT study_id, revision, state, completed_by FROM jobs"
                                                 " WHERE revision > 1")]
        assert ledger.scalar("SELECT count(*) FROM jobs") == soak.studies, reopened  # one job (revision 1) a study
        assert ledger.scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL") >= 1  # the killed one
        # a second copy of the same object only where the ledger shows a retried delivery (the killed worker's)
        assert len(resent) <= retried
        return figures
    except BaseException:
        print(f"--- listen\n{listen.tail()}\n--- worker b\n{workers['b'].tail()}"
              + (f"\n--- restarted\n{restarted.tail()}" if restarted else ""))
        raise
    finally:
        ledger.close()
        for proc in (restarted, *workers.values(), listen, dest):
            if proc is not None:
                proc.stop()
