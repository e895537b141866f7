"""Duplicate SOP Instance UIDs (issue 5 item 3), through `pleura serve` and a DCMTK destination.

Identical bytes again (same association, another association, after the study is done): one
stored copy, ``times_received`` counts them, one job, one inference, one SR. Changed bytes: the
documented policy (docs/conformance.md): both files kept, ``instance_changed``, the study
reopened as revision 2 and a second SR that names the first as its predecessor.

Embedded mode: the intake code (``worker/listen/receiver.py``, ``dicom_node/spool.py``) is the same in
both modes, and a private SQLite ledger keeps this test off the shared broker.
"""

from __future__ import annotations

import copy
from collections import Counter
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage

from tests.e2e.harness import embedded_env, pleura, running, storescp, wait_port
from tests.figures import save
from tests.reliability.ingest import SUCCESS, Ledger, SendLog, send, sha256, small_studies, spool_files, wire_bytes
from tests.support import free_port, wait_for

QUIET = 2

pytestmark = pytest.mark.integration


def test_duplicate_instances(nih: Path, tmp_path: Path) -> None:
    a, b = small_studies(nih, 1, 2)[0]
    changed = copy.deepcopy(b)
    pixels = changed.pixel_array.copy()
    pixels[0, :8] = np.flip(pixels[0, :8]) + 1  # a modality re-sends a corrected image under the same UID
    changed.PixelData = pixels.tobytes()
    assert wire_bytes(changed) != wire_bytes(b)
    a_uid, b_uid = str(a.SOPInstanceUID), str(b.SOPInstanceUID)
    received = tmp_path / "received"
    dest, dest_port = storescp(received, tmp_path / "storescp.log")
    port = free_port()
    serve = pleura("serve", embedded_env(tmp_path, port, dest_port, QUIET), tmp_path / "serve.log")
    ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'pleura.db'}")
    spool = tmp_path / "var" / "spool"
    log = SendLog()

    def times(uid: str) -> int:
        return ledger.scalar("SELECT times_received FROM instances WHERE sop_instance_uid = :u", u=uid)

    def study() -> tuple[str, int]:
        return tuple(ledger.rows("SELECT state, revision FROM studies")[0].values())  # type: ignore[return-value]

    def delivered(n: int) -> bool:
        return (study()[0] == "DONE"
                and ledger.scalar("SELECT count(*) FROM deliveries WHERE state = 'DELIVERED'") == n)

    with running(serve, dest), closing(ledger):
        wait_port(port, serve, timeout=120)
        send(port, [a, b, a], log)  # the same instance twice in one association
        send(port, [a], log)  # and again in another
        assert times(a_uid) == 3 and times(b_uid) == 1
        assert len(spool_files(spool)[0]) == 2  # one stored copy each
        wait_for(lambda: delivered(3), QUIET + 60, "SR + 2 SC delivered")
        send(port, [a], log)  # identical bytes after the results went out
        # intake committed before Success: the study stays DONE, so the sweeper never queues it again
        assert study() == ("DONE", 1) and times(a_uid) == 4
        assert ledger.scalar("SELECT count(*) FROM jobs") == 1
        findings_once = ledger.scalar("SELECT count(*) FROM findings")

        send(port, [changed], log)  # changed bytes, same SOP Instance UID
        assert study()[1] == 2  # reopened: a new revision (queued at once if the settle time passed already)
        files = {p.name: p for p in spool_files(spool)[0]}
        new_files = [name for name in files if name.startswith(b_uid) and name != f"{b_uid}.dcm"]
        assert len(new_files) == 1 and len(files) == 3  # both versions of b kept, nothing overwritten
        row = ledger.rows("SELECT spool_path, sha256, times_received FROM instances WHERE sop_instance_uid = :u",
                          u=b_uid)[0]
        assert Path(row["spool_path"]).name == new_files[0] == f"{b_uid}.{row['sha256'][:8]}.dcm"
        assert sha256(files[new_files[0]].read_bytes()) == row["sha256"] and row["times_received"] == 2
        assert dcmread(files[f"{b_uid}.dcm"]).PixelData == b.PixelData  # the first version untouched
        events = Counter(r["kind"] for r in ledger.rows("SELECT kind FROM events"))
        assert events["instance_changed"] == 1 and events["study_reopened"] == 1

        wait_for(lambda: delivered(5), QUIET + 60, "the revision's SR and new SC delivered")
        objects = [dcmread(p) for p in received.iterdir()]
        srs = sorted((o for o in objects if o.SOPClassUID == Comprehensive3DSRStorage),
                     key=lambda o: o.InstanceNumber)
        copies = Counter(str(o.SOPInstanceUID) for o in objects)
        save("duplicates", {
            "identical_resends": 3, "changed_resends": 1, "c_store_answers": len(log.answers),
            "spool_files": len(files), "jobs": ledger.scalar("SELECT count(*) FROM jobs"),
            "srs_delivered": len(srs), "objects_delivered": len(objects),
            "duplicates_delivered": sum(n - 1 for n in copies.values()),
            "times_received": {"identical": times(a_uid), "changed": times(b_uid)},
        })
        assert [s for _, s in log.answers] == [SUCCESS] * 6
        assert len(srs) == 2 and len(objects) == 5 and max(copies.values()) == 1
        first, second = srs
        assert "PredecessorDocumentsSequence" not in first
        predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
        assert [r["revision"] for r in ledger.rows("SELECT revision FROM jobs ORDER BY revision")] == [1, 2]
        assert ledger.scalar("SELECT count(*) FROM findings") == 2 * findings_once  # one inference per revision
        assert study() == ("DONE", 2) and times(a_uid) == 4
