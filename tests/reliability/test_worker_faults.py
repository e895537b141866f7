"""Issue 5 item 2: a worker killed mid-inference, a broker restart and a PostgreSQL restart
while studies flow; every study ends delivered exactly once.

Production mode (`pleura listen` + `pleura worker`) on a private PostgreSQL cluster and a
private RabbitMQ node (the production broker; a private node starts in about 6 s here), both
restarted by the test; the machine's shared services are never touched. Four waves of
one-image studies, one fault each:

1. ``kill -9`` of the worker while the ledger shows a job RUNNING with an open attempt;
2. the broker stopped while the sweeper queues a wave (publishing fails), then restarted;
3. PostgreSQL stopped (immediate mode: connections cut) while an association is open: the
   C-STORE gets 0xA700 and a new association is refused, both not Success; the peer's
   resend after the restart is stored.

The DCMTK storescp destination keeps every received object in its own file, so a duplicate
delivery would show as a second copy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import create_engine, text

from tests.e2e.harness import PLEURA, pleura, pleura_run, storescp, wait_port
from tests.figures import save
from tests.reliability.services import (
    PrivatePostgres,
    PrivateRabbitMQ,
    pleura_env,
    received_by_study,
    sr_count,
    synth_studies,
)
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

WAVE = 3
OUT_OF_RESOURCES = 0xA700


def test_kill_broker_and_database_restarts_deliver_each_study_once(
    nih: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    waves = [synth_studies(nih, tmp_path / f"wave{i}", WAVE, skip=i * WAVE) for i in range(3)]
    late = synth_studies(nih, tmp_path / "late", 1, skip=3 * WAVE)[0]  # C-STOREd while the database is down
    studies = 3 * WAVE + 1
    cleanup = request.addfinalizer  # run last-in first-out, each even if another fails
    pg = PrivatePostgres()
    cleanup(pg.close)
    rmq = PrivateRabbitMQ()
    cleanup(rmq.close)
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    cleanup(dest.stop)
    port = free_port()
    env = pleura_env(tmp_path, pg.url, rmq.url, port, f"DEST@127.0.0.1:{dest_port}")
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    cleanup(listen.stop)
    workers = [pleura("worker", env, tmp_path / "worker1.log", "--name", "first")]
    cleanup(lambda: [w.stop() for w in workers])
    engine = create_engine(pg.url, pool_pre_ping=True)
    cleanup(engine.dispose)

    def scalar(sql: str) -> int:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar() or 0

    def send(folder: Path) -> None:
        pleura_run({}, "send", "127.0.0.1", str(port), str(folder), "--calling-ae", "MODALITY")

    try:
        wait_port(port, listen)

        # 1. kill -9 of the worker while a job is RUNNING
        send(tmp_path / "wave0")
        wait_for(lambda: scalar("SELECT count(*) FROM jobs j JOIN attempts a ON a.job_id = j.id "
                                "WHERE j.state = 'RUNNING' AND a.finished_at IS NULL"),
                 90, "a job running", interval=0.05)
        workers[0].kill9()
        killed_attempts = scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL")
        assert killed_attempts >= 1
        workers.append(pleura("worker", env, tmp_path / "worker2.log", "--name", "second"))

        # 2. the broker goes away while the sweeper queues the next wave (gone before that wave is sent, so
        # that the sweeper cannot have published it first)
        rmq.stop()
        send(tmp_path / "wave1")
        wait_for(lambda: scalar("SELECT count(*) FROM jobs") == 2 * WAVE, 60, "the second wave queued")
        wait_for(lambda: any("publish failed" in line and "process_job" in line
                             for line in listen.log.read_text().splitlines()), 30, "the sweeper's publish to fail")
        rmq.start()

        # 3. PostgreSQL restarts while an association is open and another is attempted
        send(tmp_path / "wave2")
        ae = AE(ae_title="MODALITY")
        late_ds = dcmread(late)
        ae.add_requested_context(late_ds.SOPClassUID, late_ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
        assert assoc.is_established
        pg.stop()
        refused = assoc.send_c_store(late_ds).Status
        assoc.release()
        while_down = subprocess.run([PLEURA, "send", "127.0.0.1", str(port), str(late), "--calling-ae", "MODALITY"],
                                    capture_output=True, text=True, timeout=120)
        pg.start()
        assert refused == OUT_OF_RESOURCES
        assert while_down.returncode != 0 and "0x0000" not in while_down.stdout
        wait_for(lambda: subprocess.run([PLEURA, "send", "127.0.0.1", str(port), str(late), "--calling-ae",
                                         "MODALITY"], capture_output=True, timeout=120).returncode == 0,
                 60, "the peer's resend to be stored", interval=1)

        wait_for(lambda: scalar("SELECT count(*) FROM studies WHERE state = 'DONE'") == studies
                 and scalar("SELECT count(*) FROM deliveries WHERE state = 'DELIVERED'") == 2 * studies,
                 240, "every study processed and delivered", interval=0.5)

        held = received_by_study(tmp_path / "received")
        sent = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in [*sum(waves, []), late]}
        assert set(held) == sent
        assert all(sr_count(tmp_path / "received", uid) == 1 for uid in sent)
        duplicates = sum(c - 1 for copies in held.values() for c in copies.values())
        assert duplicates == 0 and all(len(c) == 2 for c in held.values()), "one SR and one SC per study, once"
        assert scalar("SELECT count(*) FROM deliveries") == 2 * studies
        assert scalar("SELECT count(*) FROM events WHERE kind = 'delivered'") == 2 * studies
        assert scalar("SELECT count(*) FROM jobs WHERE state <> 'SUCCEEDED'") == 0
        save("worker_faults", {
            "studies_sent": studies, "studies_delivered": len(held), "studies_lost": len(sent - set(held)),
            "worker_kills": 1, "attempts_killed_mid_job": killed_attempts, "broker_restarts": 1,
            "database_restarts": 1, "c_store_while_database_down": f"0x{refused:04X}",
            "association_while_database_down": "refused (pleura send exit "
                                               f"{while_down.returncode})",
            "duplicates_delivered": duplicates,
            "attempts": scalar("SELECT count(*) FROM attempts"), "jobs": scalar("SELECT count(*) FROM jobs"),
            "publish_failures_logged": listen.log.read_text().count("publish failed"),
        })
    except BaseException:
        print(f"--- listen\n{listen.tail()}\n--- worker\n{workers[-1].tail()}")
        raise
