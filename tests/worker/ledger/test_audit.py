"""Audit views (migration 0003), ``pleura audit`` filters and formats, and the auditor role.

A ledger with three studies at known times (one delivered, one quarantined, one reopened
after a failed delivery), a rejected association and a refused instance, on SQLite and
PostgreSQL; the views' durations are checked to the millisecond.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from dicom_node.filing import Peer
from worker.cli import main
from worker.ledger import Association, Delivery, Instance, Job, OutputObject, Study, audit
from worker.ledger.db import Ledger, _alembic_config, upgrade
from worker.ledger.models import Attempt
from worker.listen.receiver import LedgerReceiver

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=48)
A, B, C = "1.2.826.0.1.3680043.10.543.1", "1.2.826.0.1.3680043.10.543.2", "1.2.826.0.1.3680043.10.543.3"


def _t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _instance(s, study: Study, assoc: Association, n: int, at: float) -> None:  # type: ignore[no-untyped-def]
    s.add(Instance(study_id=study.id, association_id=assoc.id, sop_instance_uid=f"{study.study_instance_uid}.{n}",
                   sop_class_uid="1.2.840.10008.5.1.4.1.1.1", series_instance_uid=f"{study.study_instance_uid}.0",
                   transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CR", spool_path=f"/spool/{n}",
                   size_bytes=1000, sha256="0" * 64, received_at=_t(at)))


def _job(s, study: Study, revision: int, state: str, queued: float, started: float | None,  # type: ignore[no-untyped-def]
         finished: float | None, attempts: int, bundle: tuple[str, str] | None, error: str | None = None) -> Job:
    job = Job(study_id=study.id, revision=revision, state=state, created_at=_t(queued), published_at=_t(queued),
              attempts=attempts, bundle_name=bundle and bundle[0], bundle_version=bundle and bundle[1],
              backend="onnxruntime" if bundle else None, finished_at=finished and _t(finished), error=error,
              completed_by="association" if study.study_instance_uid == A else "quiet")
    s.add(job)
    s.flush()
    for n in range(attempts):
        s.add(Attempt(job_id=job.id, number=n + 1, worker="w:1", started_at=_t(started + n), outcome=state))
    return job


def _output(s, job: Job, kind: str, n: int, created: float, destination: str, state: str,  # type: ignore[no-untyped-def]
            delivered: float | None, attempts: int = 1, peer_status: int | None = 0, error: str | None = None) -> None:
    output = OutputObject(job_id=job.id, kind=kind, sop_instance_uid=f"2.25.{job.id}{n}", sop_class_uid="1.2.3",
                          series_instance_uid=f"2.25.{job.id}0", path=f"/outbox/{job.id}{n}", created_at=_t(created))
    s.add(output)
    s.flush()
    s.add(Delivery(output_object_id=output.id, destination=destination, state=state, attempts=attempts,
                   next_attempt_at=_t(created), last_attempt_at=_t(delivered or created + 60),
                   delivered_at=delivered and _t(delivered), peer_status=peer_status, last_error=error))


def _populate(url: str) -> None:
    upgrade(url)
    ledger = Ledger(url)
    with ledger.session() as s:
        modality = Association(calling_ae="MODALITY1", called_ae="PLEURA", peer_host="10.0.0.1", peer_port=4000,
                               started_at=_t(0))
        pacs = Association(calling_ae="PACS_B", called_ae="PLEURA", peer_host="10.0.0.2", peer_port=4001,
                           started_at=_t(3600))
        s.add_all([modality, pacs])
        a = Study(study_instance_uid=A, state="DONE", revision=1, first_received_at=_t(0), last_received_at=_t(2))
        b = Study(study_instance_uid=B, state="FAILED", revision=1, first_received_at=_t(3600),
                  last_received_at=_t(3600))
        c = Study(study_instance_uid=C, state="RECEIVING", revision=2, first_received_at=_t(7200),
                  last_received_at=_t(7300))
        s.add_all([a, b, c])
        s.flush()
        _instance(s, a, modality, 1, 0)
        _instance(s, a, modality, 2, 2)
        _instance(s, b, pacs, 1, 3600)
        _instance(s, c, modality, 1, 7200)
        _instance(s, c, modality, 2, 7300)  # after rev 1 was processed: rev 2, not queued yet
        job = _job(s, a, 1, "SUCCEEDED", 7, 8, 10.5, 1, ("demo", "0.1.0"))
        _output(s, job, "SR", 1, 10.5, "DEST@pacs:104", "DELIVERED", 11)
        _output(s, job, "SC", 2, 10.5, "DEST@pacs:104", "DELIVERED", 12)
        _job(s, b, 1, "FAILED", 3605, 3606, 3700, 3, None, "worker died 3 times (lease expired)")
        job = _job(s, c, 1, "SUCCEEDED", 7205, 7206, 7210, 1, ("demo", "0.2.0"))
        _output(s, job, "SR", 1, 7210, "ARCHIVE@10.0.0.9:104", "FAILED", None, 5, 0xA700,
                "peer answered status 0xA700")
    receiver = LedgerReceiver(ledger)
    receiver.association_rejected(Peer("EVIL", "PLEURA", "10.9.9.9", 5000), "calling AE title not allowed")
    receiver.instance_refused(modality.id, f"{A}.9", 0xA700, "spool below its free-space watermark")
    with ledger.session() as s:  # the receiver stamps them now; put them at known times
        s.execute(text("UPDATE events SET at = :at WHERE kind = 'association_rejected'"), {"at": _t(100)})
        s.execute(text("UPDATE events SET at = :at WHERE kind = 'instance_refused'"), {"at": _t(200)})
    ledger.close()


def _audit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, *args: str) -> str:
    monkeypatch.setenv("PLEURA_DATABASE_URL", url)
    capsys.readouterr()
    main(["audit", *args])
    return capsys.readouterr().out


def _json(monkeypatch, capsys, url: str, *args: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return json.loads(_audit(monkeypatch, capsys, url, *args, "--format", "json"))


def test_views_and_pleura_audit(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _populate(db_url)
    engine = create_engine(db_url)
    names = set(inspect(engine).get_view_names())
    assert {v.name for v in audit.VIEWS} <= names
    for view in audit.VIEWS:  # the queries' column lists are the views' columns, and hold no patient data
        assert [c["name"] for c in inspect(engine).get_columns(view.name)] == [c.name for c in view.columns]
        assert not any(word in c.name for c in view.columns for word in ("patient", "birth", "name_"))
    engine.dispose()

    rows = _json(monkeypatch, capsys, db_url, "timeline")
    assert [(r["study_instance_uid"], r["revision"], r["is_current"]) for r in rows] == [
        (C, 2, 1), (C, 1, 0), (B, 1, 1), (A, 1, 1)]
    c2, c1, b, a = rows
    assert (a["calling_aes"], a["instances"], a["study_state"], a["job_state"]) == ("MODALITY1", 2, "DONE", "SUCCEEDED")
    assert [a[k] for k in ("quiet_s", "wait_s", "processing_s", "delivery_s", "total_s")] == pytest.approx(
        [5.0, 1.0, 2.5, 1.5, 10.0], abs=2e-3)
    assert (a["deliveries"], a["deliveries_delivered"], a["destinations"]) == (2, 2, "DEST@pacs:104")
    assert datetime.fromisoformat(a["delivered_at"]) == _t(12)
    assert (b["job_state"], b["attempts"], b["delivered_at"], b["total_s"]) == ("FAILED", 3, None, None)
    assert b["error"] == "worker died 3 times (lease expired)"
    assert (c2["job_id"], c2["study_state"], c2["instances"]) == (None, "RECEIVING", 2)
    assert datetime.fromisoformat(c1["last_received_at"]) == _t(7200)  # what revision 1 was made of
    assert (c1["deliveries_failed"], c1["delivered_at"], c1["quiet_s"]) == (1, None, pytest.approx(5.0, abs=2e-3))

    deliveries = _json(monkeypatch, capsys, db_url, "deliveries")
    assert [(d["study_instance_uid"], d["object_kind"], d["state"]) for d in deliveries] == [
        (C, "SR", "FAILED"), (A, "SR", "DELIVERED"), (A, "SC", "DELIVERED")]
    assert (deliveries[0]["peer_status"], deliveries[0]["attempts"], deliveries[0]["delivery_s"]) == ("0xA700", 5, None)
    assert [d["delivery_s"] for d in deliveries[1:]] == pytest.approx([0.5, 1.5], abs=2e-3)

    failures = _json(monkeypatch, capsys, db_url, "failures")
    assert [(f["kind"], f["study_instance_uid"], f["calling_ae"]) for f in failures] == [
        ("delivery_failed", C, None), ("job_failed", B, None), ("instance_refused", None, "MODALITY1"),
        ("association_rejected", None, "EVIL")]
    assert (failures[0]["destination"], failures[0]["status"]) == ("ARCHIVE@10.0.0.9:104", "0xA700")
    assert (failures[2]["status"], failures[2]["sop_instance_uid"], failures[2]["peer_host"]) == (
        "0xA700", f"{A}.9", "10.0.0.1")
    assert failures[2]["reason"] == "spool below its free-space watermark"
    assert (failures[3]["reason"], failures[3]["peer_host"]) == ("calling AE title not allowed", "10.9.9.9")

    with Ledger(db_url).engine.connect() as conn:
        models = conn.execute(text("SELECT bundle_name, bundle_version, jobs, studies FROM v_models "
                                   "ORDER BY bundle_version")).all()
        kinds = conn.execute(text("SELECT kind FROM v_events WHERE study_instance_uid IS NULL ORDER BY at")).scalars()
        assert [tuple(m) for m in models] == [("demo", "0.1.0", 1, 1), ("demo", "0.2.0", 1, 1)]
        assert list(kinds) == ["association_rejected", "instance_refused"]

    def uids(*args: str) -> list[tuple[str, int]]:
        return [(r["study_instance_uid"], r["revision"]) for r in _json(monkeypatch, capsys, db_url, *args)]

    assert uids("timeline", "--calling-ae", "PACS_B") == [(B, 1)]
    assert uids("timeline", "--state", "done") == [(A, 1)]
    assert uids("timeline", "--state", "SUCCEEDED") == [(C, 1), (A, 1)]
    assert uids("timeline", "--model", "demo") == [(C, 1), (A, 1)]
    assert uids("timeline", "--model", "demo:0.2.0") == [(C, 1)]
    assert uids("timeline", "--since", _t(1800).isoformat(), "--until", _t(7200).isoformat()) == [(B, 1)]
    assert uids("timeline", "--since", "47.5h") == [(C, 2), (C, 1), (B, 1)]  # A came 48 h ago
    assert uids("timeline", "--until", (T0 + timedelta(minutes=30)).strftime("%Y-%m-%d %H:%M")) == [(A, 1)]
    assert uids("timeline", "--limit", "1") == [(C, 2)]
    assert uids("deliveries", "--state", "failed", "--calling-ae", "MODALITY1") == [(C, 1)]
    failed = _json(monkeypatch, capsys, db_url, "failures", "--calling-ae", "MODALITY1")
    assert [f["kind"] for f in failed] == ["delivery_failed", "instance_refused"]
    rejected = _json(monkeypatch, capsys, db_url, "failures", "--kind", "association_rejected")
    assert [f["calling_ae"] for f in rejected] == ["EVIL"]

    out = _audit(monkeypatch, capsys, db_url, "deliveries", "--format", "csv")
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed[0] == [c.name for c in audit.DELIVERIES.columns] and len(parsed) == 4
    assert dict(zip(parsed[0], parsed[1], strict=True))["peer_status"] == "0xA700"

    lines = _audit(monkeypatch, capsys, db_url).splitlines()  # bare `pleura audit`: the timeline as a table
    assert len(lines) == 5 and lines[0].startswith("RECEIVED (UTC)")
    column = lines[0].index("STUDY INSTANCE UID")
    assert [line[column:].split()[0] for line in lines[1:]] == [C, C, B, A]  # aligned under its header
    row_a = lines[4]
    assert f"{_t(2):%Y-%m-%d %H:%M:%S}" in row_a and "demo 0.1.0" in row_a and "MODALITY1" in row_a
    assert " association " in row_a and " quiet " in lines[3]
    assert "5.00 s" in row_a and "2.50 s" in row_a and "1.50 s" in row_a and "10.0 s" in row_a and "2/2" in row_a
    assert "0/1 (1 failed)" in lines[2]

    monkeypatch.setenv("PLEURA_DATABASE_URL", db_url)  # `pleura status` reads as well: aligned, details indented
    capsys.readouterr()
    main(["status"])
    status = capsys.readouterr().out.splitlines()
    assert status[0].split() == ["STUDY", "INSTANCE", "UID", "STATE", "REV", "IMG", "FROM", "COMPLETED", "BY",
                                 "MODEL", "POSITIVE", "SENT", "TIME", "TO", "RESULT", "RIS"]
    assert [line.split()[5] for line in status if line.startswith(A) or line.startswith(B)] == ["quiet", "association"]
    assert [line.split()[:2] for line in status if not line.startswith(" ")][1:] == [
        [C, "RECEIVING"], [B, "FAILED"], [A, "DONE"]]
    assert status[2:4] == ["    deliveries: FAILED 1", "    delivery of SR to ARCHIVE@10.0.0.9:104 FAILED after 5 "
                           "attempts: peer answered status 0xA700"]
    assert status[5] == "    error: worker died 3 times (lease expired)"
    assert status[6].endswith("2/2          10.0 s  -") and len(status[6]) == len(status[0]) - 2  # no RIS configured


@pytest.mark.parametrize(("args", "message"), [
    (["timeline", "--since", "yesterday"], "--since: 'yesterday' is neither an ISO date/time"),
    (["timeline", "--until", "2026-13-01"], "--until: '2026-13-01' is neither"),
    (["timeline", "--since", "1h", "--until", "2h"], "must be before --until"),
    (["timeline", "--state", "LOST"], "--state 'LOST' is not one of DONE, FAILED"),
    (["deliveries", "--state", "DONE"], "--state 'DONE' is not one of DELIVERED, FAILED, PENDING, SENDING"),
    (["failures", "--kind", "crash"], "--kind 'crash' is not one of association_rejected"),
    (["timeline", "--model", ":0.1.0"], "--model ':0.1.0' is not NAME or NAME:VERSION"),
    (["timeline", "--model", "demo:"], "is not NAME or NAME:VERSION"),
    (["timeline", "--calling-ae", "A" * 17], "is not an AE title"),
    (["timeline", "--limit", "0"], "--limit must be at least 1"),
])
def test_bad_filters_are_clear_errors(args: list[str], message: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEURA_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["audit", *args])
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("error: ") and message in exc.value.code


def test_missing_views_and_sqlite_role_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url, "0002")
    monkeypatch.setenv("PLEURA_DATABASE_URL", url)
    with pytest.raises(SystemExit) as exc:
        main(["audit", "failures"])
    assert "cannot read the audit view (no such table: v_failures)" in str(exc.value.code)
    assert "pleura db upgrade" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        main(["audit", "role", "auditor"])
    assert "an auditor role exists on PostgreSQL only" in str(exc.value.code)


def test_downgrade_drops_the_views(db_url: str) -> None:
    upgrade(db_url)
    command.downgrade(_alembic_config(db_url), "0002")
    engine = create_engine(db_url)
    assert not {v.name for v in audit.VIEWS} & set(inspect(engine).get_view_names())
    assert "studies" in inspect(engine).get_table_names()
    engine.dispose()


def test_auditor_role_reads_the_views_only(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _populate(pg_url)
    role = f"pleura_auditor_{uuid.uuid4().hex[:8]}"
    auditor_url = pg_url.replace("postgres@", f"{role}:secret@")
    monkeypatch.setenv("PLEURA_DATABASE_URL", pg_url)
    admin = create_engine(pg_url)
    try:
        main(["audit", "role", role])
        assert f"role {role} (NOLOGIN): SELECT on v_study_sources" in capsys.readouterr().out
        with pytest.raises(OperationalError, match="not permitted to log in"):
            create_engine(auditor_url).connect()
        secret = tmp_path / "auditor_password"
        secret.write_text("secret\n")
        main(["audit", "role", role, "--password-file", str(secret)])  # updates the same role
        assert f"role {role} (LOGIN)" in capsys.readouterr().out

        auditor = create_engine(auditor_url)
        with auditor.connect() as conn:
            for view in audit.VIEWS:
                conn.execute(text(f"SELECT * FROM {view.name}")).all()
            assert conn.execute(text("SELECT count(*) FROM v_study_timeline")).scalar() == 4
        for statement in ("SELECT * FROM studies", "SELECT count(*) FROM events", "SELECT * FROM alembic_version",
                          "INSERT INTO events (at, kind) VALUES (now(), 'forged')",
                          "UPDATE deliveries SET state = 'DELIVERED'", "DELETE FROM events",
                          "CREATE TABLE mine (id int)"):
            with auditor.connect() as conn, pytest.raises(ProgrammingError, match="permission denied"):
                conn.execute(text(statement))
        auditor.dispose()
        with admin.connect() as conn:  # on the views: SELECT and nothing else; on the tables: nothing
            privileges = conn.execute(text(
                "SELECT c.relname, c.relkind, p.privilege FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " CROSS JOIN unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER'])"
                " AS p(privilege) WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v')"
                " AND has_table_privilege(:role, c.oid, p.privilege)"), {"role": role}).all()
        assert sorted(privileges) == sorted((v.name, "v", "SELECT") for v in audit.VIEWS)
        # `pleura audit` needs nothing but the views: it works logged in as the auditor
        rows = _json(monkeypatch, capsys, auditor_url, "failures", "--kind", "job_failed")
        assert [r["study_instance_uid"] for r in rows] == [B]

        for refused in ("postgres",):  # superuser and owner of the tables
            with pytest.raises(SystemExit, match="cannot be made a read-only auditor"):
                _audit(monkeypatch, capsys, pg_url, "role", refused)
    finally:
        with admin.begin() as conn:
            if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first():
                conn.execute(text(f'DROP OWNED BY "{role}"'))
                conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()
