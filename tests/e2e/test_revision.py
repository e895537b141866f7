"""A late instance reopens a delivered study: a new SR names the previous one, nothing is lost."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from tests.e2e.harness import embedded_env, pleura, pleura_run, storescp, wait_for, wait_port
from tests.support import free_port

QUIET = 2


@pytest.mark.integration
def test_late_instance_produces_a_successor_sr(real_cr: Path, tmp_path: Path, dciodvfy) -> None:  # type: ignore[no-untyped-def]
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = embedded_env(tmp_path, port, dest_port, QUIET)
    late = dcmread(real_cr)
    late.SOPInstanceUID = generate_uid()  # a second image of the same study, sent later
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path)
    serve = pleura("serve", env, tmp_path / "serve.log")

    def received(n: int) -> list[Path]:
        files = sorted((tmp_path / "received").iterdir())
        return files if len(files) >= n else []

    try:
        wait_port(port, serve, timeout=120)
        pleura_run({}, "send", "127.0.0.1", str(port), str(real_cr))
        wait_for(lambda: received(2), QUIET + 30, "the first SR and SC")
        pleura_run({}, "send", "127.0.0.1", str(port), str(late_path))
        files = wait_for(lambda: received(4), QUIET + 30, "the successor SR and the new SC")
        objects = [dcmread(f) for f in files]
        srs = sorted((o for o in objects if o.SOPClassUID == Comprehensive3DSRStorage), key=lambda o: len(o.get(
            "PredecessorDocumentsSequence", [])))
        assert len(srs) == 2 and len(objects) == 4  # the first SC is not sent again
        first, second = srs
        assert "PredecessorDocumentsSequence" not in first
        predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
        assert first.SeriesInstanceUID == second.SeriesInstanceUID  # one SR series per model version
        assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
        assert sorted(o.InstanceNumber for o in objects if o.Modality != "SR") == [1, 2]
        assert all(dciodvfy(f)[0] == [] for f in files)
        with sqlite3.connect(tmp_path / "var" / "pleura.db") as db:  # the ledger keeps both versions
            ledger_srs = db.execute("SELECT o.sop_instance_uid, o.predecessor_sop_instance_uid, j.revision "
                                    "FROM output_objects o JOIN jobs j ON j.id = o.job_id "
                                    "WHERE o.kind = 'SR' ORDER BY j.revision").fetchall()
        assert ledger_srs == [(first.SOPInstanceUID, None, 1), (second.SOPInstanceUID, first.SOPInstanceUID, 2)]
        status = json.loads(pleura_run(env, "status", "--json"))[0]
        assert (status["state"], status["revision"], status["instances"]) == ("DONE", 2, 2)
    except BaseException:
        print(serve.tail())
        raise
    finally:
        serve.stop()
        dest.stop()
