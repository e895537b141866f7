"""``pleura listen`` with PLEURA_LISTEN_PROCESSES=2: both processes serve the one port, and the group
goes down together (a dead process stops the listener, non-zero, for its supervisor to restart)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from sqlalchemy import create_engine, text

from tests.e2e.harness import pleura, pleura_run, running, wait_port
from tests.reliability.ingest import SendLog, send, send_concurrently, small_studies
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration


def test_two_processes_share_the_port_and_fall_together(pg_url: str, amqp_url: str, nih: Path,
                                                        tmp_path: Path) -> None:
    port = free_port()
    env = {"PLEURA_DATA_DIR": str(tmp_path / "var"), "PLEURA_DATABASE_URL": pg_url, "PLEURA_BROKER_URL": amqp_url,
           "PLEURA_DICOM_PORT": str(port), "PLEURA_LISTEN_PROCESSES": "2", "PLEURA_MIN_FREE_DISK_MB": "20",
           # nothing to publish: no study comes to the end of its quiet period, no image is hinted
           "PLEURA_STUDY_QUIET_SECONDS": "3600", "PLEURA_PREPARE_ON_ARRIVAL": "false"}
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    ledger = create_engine(pg_url)
    with running(listen):
        wait_port(port, listen)
        wait_for(lambda: listen.log.read_text().count('"event": "listening"') == 2, 60, "two listener processes")
        first = psutil.Process(listen.popen.pid)
        (forked,) = first.children()

        studies = small_studies(nih, 6, 2, size=64)
        log = SendLog()
        send_concurrently(port, studies[:4], log, resend_after_abort=2)
        first.suspend()  # a stopped process accepts nothing: the forked one must serve this association
        try:
            send(port, studies[4], log, timeout=60)
        finally:
            first.resume()
        forked.suspend()
        try:
            send(port, studies[5], log, timeout=60)
        finally:
            forked.resume()
        assert log.errors == [] and set(log.statuses.values()) == {0}, (log.errors, log.statuses)
        with ledger.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM instances")).scalar() == 12

        os.kill(forked.pid, signal.SIGKILL)
        assert listen.popen.wait(15) == 1
        assert '"event": "a listener process ended; stopping the others"' in listen.log.read_text()
    ledger.dispose()


def test_several_processes_need_postgresql(tmp_path: Path) -> None:
    env = {"PLEURA_DATA_DIR": str(tmp_path / "var"), "PLEURA_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
           "PLEURA_LISTEN_PROCESSES": "2", "PLEURA_DICOM_PORT": str(free_port())}
    done = pleura("listen", env, tmp_path / "listen.log")
    assert done.popen.wait(60) != 0
    done.stop()
    assert "PLEURA_LISTEN_PROCESSES > 1 needs PostgreSQL" in done.log.read_text()
