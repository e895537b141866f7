"""Must show 2-4: PostgreSQL + RabbitMQ, separate `pleura listen` / `pleura worker`, a real PACS.

Orthanc (Debian package) receives the study, auto-forwards it to Pleura over DICOM, and
then holds the SR and SC in that study. The documented audit SQL tells the story. A worker
killed with SIGKILL mid-study leaves that study to be delivered exactly once after restart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Connection
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import create_engine, text

from tests.e2e.harness import Orthanc, pleura, pleura_run, storescp, wait_for, wait_port
from tests.support import ROOT, free_port

QUIET = 3
AUDIT_SQL = ROOT / "docs" / "audit" / "study_story.sql"

pytestmark = pytest.mark.integration


def _env(pg_url: str, broker_url: str, tmp_path: Path, port: int, destination: str) -> dict[str, str]:
    with Connection(broker_url) as conn:  # messages left by an earlier run name rows of another DB
        conn.SimpleQueue("pleura").clear()
    return {
        "PLEURA_DATA_DIR": str(tmp_path / "var"),
        "PLEURA_DATABASE_URL": pg_url,
        "PLEURA_BROKER_URL": broker_url,
        "PLEURA_DICOM_PORT": str(port),
        "PLEURA_DESTINATIONS": destination,
        "PLEURA_STUDY_QUIET_SECONDS": str(QUIET),
        "PLEURA_SWEEP_INTERVAL_SECONDS": "0.5",
        "PLEURA_LEASE_SECONDS": "6",
        "PLEURA_MIN_FREE_DISK_MB": "20",  # CI disks can be nearly full; the watermark has its own test
    }


def test_orthanc_pushes_and_receives_results(pg_url: str, broker_url: str, real_cr: Path, tmp_path: Path) -> None:
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", pleura_port=port)
    env = _env(pg_url, broker_url, tmp_path, port, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    work = pleura("worker", env, tmp_path / "worker.log")
    try:
        wait_port(port, listen)
        uploaded = orthanc.rest("/instances", real_cr.read_bytes())
        study_id = uploaded["ParentStudy"]

        def result_series() -> list[str]:
            modalities = [orthanc.rest(f"/series/{sid}")["MainDicomTags"].get("Modality")
                          for sid in orthanc.rest(f"/studies/{study_id}")["Series"]]
            return modalities if {"SR", "OT"} <= set(modalities) or len(modalities) >= 3 else []

        modalities = wait_for(result_series, QUIET + 60, "SR and SC series in Orthanc's study")
        assert sorted(modalities) == ["CR", "OT", "SR"]
        study = orthanc.rest(f"/studies/{study_id}")
        source = dcmread(real_cr, stop_before_pixels=True)
        assert study["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID
        assert study["PatientMainDicomTags"]["PatientID"] == source.PatientID

        engine = create_engine(pg_url)

        def story() -> list:  # type: ignore[type-arg]
            with engine.connect() as conn:
                rows = conn.execute(text(AUDIT_SQL.read_text())).mappings().all()
            # Orthanc shows an object before Pleura has recorded the peer's answer
            return rows if rows and "SENDING" not in (rows[0]["delivery_status"] or "SENDING") else []

        rows = wait_for(story, 30, "the ledger to record both deliveries")
        engine.dispose()
        assert len(rows) == 1
        row = rows[0]
        assert row["study_instance_uid"] == source.StudyInstanceUID
        assert row["calling_ae"] == "ORTHANC@127.0.0.1"
        assert row["model"] == "demo" and row["model_version"]
        assert "Cardiomegaly=" in row["findings"]
        assert len(row["sr_uids"].split(", ")) == 1 and len(row["sc_uids"].split(", ")) == 1
        assert row["delivery_status"] == f"ORTHANC@127.0.0.1:{orthanc.dicom_port} DELIVERED x2"
        assert row["first_instance_received"] <= row["last_instance_received"] < row["last_delivered_at"]
        assert row["time_to_result"].total_seconds() < QUIET + 60
    except BaseException:
        print(f"--- listen\n{listen.tail()}\n--- worker\n{work.tail()}\n--- orthanc\n{orthanc.proc.tail(20)}")
        raise
    finally:
        work.stop()
        listen.stop()
        orthanc.stop()


def test_worker_killed_mid_study_delivers_exactly_once(
    pg_url: str, amqp_url: str, nih: Path, tmp_path: Path
) -> None:
    images = tmp_path / "study"
    pleura_run({}, "synth", "--images", str(nih / "images"), "--labels", str(nih / "labels.csv"),
               "--out", str(images), "--limit", "12", "--same-study")
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = _env(pg_url, amqp_url, tmp_path, port, f"DEST@127.0.0.1:{dest_port}")
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    work = pleura("worker", env, tmp_path / "worker.log", "--name", "first")
    restarted = None
    engine = create_engine(pg_url)

    def scalar(sql: str):  # type: ignore[no-untyped-def]
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()

    try:
        wait_port(port, listen)
        pleura_run({}, "send", "127.0.0.1", str(port), str(images), "--calling-ae", "MODALITY")
        wait_for(lambda: scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL"), 90,
                 "the worker to start processing", interval=0.05)
        work.kill9()
        assert scalar("SELECT count(*) FROM output_objects") == 0, "killed before it could finish"
        restarted = pleura("worker", env, tmp_path / "worker2.log", "--name", "second")
        wait_for(lambda: scalar("SELECT state FROM studies") == "DONE"
                 and scalar("SELECT count(*) FROM deliveries WHERE state <> 'DELIVERED'") == 0
                 and scalar("SELECT count(*) FROM deliveries"), 120, "delivery after the restart")
        received = [dcmread(p, stop_before_pixels=True) for p in (tmp_path / "received").iterdir()]
        srs = [d for d in received if d.SOPClassUID == Comprehensive3DSRStorage]
        assert len(srs) == 1, f"{len(srs)} SRs delivered"
        assert len(received) == 1 + 12  # one SR, one SC per image, nothing twice
        assert scalar("SELECT count(*) FROM attempts") == 2
        assert scalar("SELECT count(*) FROM attempts WHERE finished_at IS NULL") == 1  # the killed one
        assert scalar("SELECT count(*) FROM jobs") == 1
    except BaseException:
        print("--- listen\n" + listen.tail() + "\n--- worker\n" + work.tail()
              + ("\n--- restarted\n" + restarted.tail() if restarted else ""))
        raise
    finally:
        engine.dispose()
        for proc in (restarted, work, listen, dest):
            if proc is not None:
                proc.stop()
