"""Issue 17 must-show 2: retention. `pleura serve` with ``PLEURA_RETENTION_HOURS`` of 1.8 s: once
a study is delivered and that time has passed, its spool and outbox bytes are gone, every ledger
row stays, and search still answers from the archived embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.harness import embedded_env, pleura, pleura_run, running, storescp, wait_port
from tests.reliability.ingest import Ledger
from tests.reliability.services import synth_studies
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

STUDIES = 3
RETENTION_HOURS = 0.0005  # 1.8 s


def test_bytes_go_after_the_retention_time_and_the_ledger_stays(nih: Path, tmp_path: Path) -> None:
    synth_studies(nih, tmp_path / "studies", STUDIES)
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = {**embedded_env(tmp_path, port, dest_port, quiet=3), "PLEURA_RETENTION_HOURS": str(RETENTION_HOURS)}
    serve = pleura("serve", env, tmp_path / "serve.log")
    ledger = Ledger(f"sqlite:///{(tmp_path / 'var' / 'pleura.db').resolve()}")
    with running(serve, dest):
        wait_port(port, serve, timeout=120)
        pleura_run({}, "send", "127.0.0.1", str(port), str(tmp_path / "studies"), "--calling-ae", "MODALITY")
        wait_for(lambda: ledger.scalar("SELECT count(*) FROM deliveries WHERE state = 'DELIVERED'") == 2 * STUDIES,
                 60, "every result delivered")
        spool, outbox = ledger.rows("SELECT spool_path FROM instances"), ledger.rows("SELECT path FROM output_objects")
        delivered_at = ledger.scalar("SELECT max(delivered_at) FROM deliveries")
        wait_for(lambda: ledger.scalar("SELECT count(*) FROM studies WHERE purged_at IS NOT NULL") == STUDIES,
                 60, "retention to remove every study's bytes")
        study = ledger.scalar("SELECT study_instance_uid FROM studies ORDER BY id LIMIT 1")
        found = json.loads(pleura_run(env, "search", "--like", study, "--json"))
        status = json.loads(pleura_run(env, "status", "--json"))

    assert len(spool) == STUDIES and len(outbox) == 2 * STUDIES
    assert not any(Path(r["spool_path"]).exists() for r in spool), "instance bytes removed"
    assert not any(Path(r["path"]).exists() for r in outbox), "result bytes removed"
    assert [p for p in (tmp_path / "var" / "spool").rglob("*") if p.is_file()] == []
    purged = ledger.rows("SELECT purged_at FROM studies")
    assert all(str(r["purged_at"]) > str(delivered_at) for r in purged)  # after the last delivery, not before
    for table, count in (("instances", STUDIES), ("output_objects", 2 * STUDIES), ("deliveries", 2 * STUDIES),
                         ("jobs", STUDIES), ("embeddings", STUDIES)):
        assert ledger.scalar(f"SELECT count(*) FROM {table}") == count, table  # the ledger keeps everything
    assert ledger.scalar("SELECT count(*) FROM findings") > 0
    assert ledger.scalar("SELECT count(*) FROM events WHERE kind = 'study_purged'") == STUDIES
    assert len(found["hits"]) == STUDIES - 1  # search answers from the archived embeddings
    assert {r["state"] for r in status} == {"DONE"} and all(r["deliveries"] == {"DELIVERED": 2} for r in status)
