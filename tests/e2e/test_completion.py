"""Completion from the association (issue 15) against a real `pleura serve`, default settle time.

Three studies at once: one sent over two associations (each released; the second once the
first's revision is done), one over an association kept open with its images 3 s apart, one
whose association is aborted. The first completes at each release (a revision naming the first
SR holds both images), the others by the quiet period only, the open one with both images in
its one revision. The quiet period is far longer than the open association's gap, so that a
loaded host's pauses cannot end that study early.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from tests.e2e.harness import embedded_env, pleura, running, storescp, wait_port
from tests.reliability.ingest import small_studies
from tests.support import free_port, wait_for

QUIET = 15.0
#: between the held-open association's two images: longer than the settle time (0.5 s), far shorter than QUIET
HELD_GAP = 3.0

pytestmark = pytest.mark.integration


def _associate(port: int):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    assert assoc.is_established
    return assoc


def _store(assoc, ds) -> None:  # type: ignore[no-untyped-def]
    assert assoc.send_c_store(ds).Status == 0x0000


def test_released_studies_complete_at_once_open_and_aborted_ones_by_the_quiet_period(
        nih: Path, tmp_path: Path) -> None:
    two_sends, held_open, aborted = small_studies(nih, 3, 2)
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    serve = pleura("serve", embedded_env(tmp_path, port, dest_port, QUIET), tmp_path / "serve.log")
    db = tmp_path / "var" / "pleura.db"

    def jobs(study) -> list[tuple]:  # type: ignore[no-untyped-def]
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT j.revision, j.completed_by, j.state, "
                "(julianday(j.created_at) - julianday((SELECT max(i.received_at) FROM instances i "
                " WHERE i.study_id = s.id AND i.received_at <= j.created_at))) * 86400 "
                "FROM jobs j JOIN studies s ON s.id = j.study_id WHERE s.study_instance_uid = ? "
                "ORDER BY j.revision", (str(study[0].StudyInstanceUID),)).fetchall()

    with running(serve, dest):
        wait_port(port, serve, timeout=120)
        held = _associate(port)
        _store(held, held_open[0])
        opened = time.monotonic()
        cut = _associate(port)
        _store(cut, aborted[0])
        cut.abort()
        first = _associate(port)
        _store(first, two_sends[0])
        first.release()
        time.sleep(max(0.0, HELD_GAP - (time.monotonic() - opened)))
        assert jobs(held_open) == []  # open and not quiet yet: nothing decided
        _store(held, held_open[1])
        # the second association once the first's revision is done, so that its SR names the first's
        wait_for(lambda: any(state == "SUCCEEDED" for _, _, state, _ in jobs(two_sends)), 120,
                 "the first association's revision done", interval=0.1)
        second = _associate(port)
        _store(second, two_sends[1])
        second.release()
        wait_for(lambda: jobs(held_open), QUIET + 60, "the held-open study queued by the quiet period")
        held.release()

        def delivered() -> bool:
            with sqlite3.connect(db) as conn:
                srs = conn.execute("SELECT count(*) FROM output_objects WHERE kind LIKE 'SR%'").fetchone()[0]
                states = dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())
            return srs == 4 and set(states) == {"DELIVERED"}

        wait_for(delivered, 180, "every result delivered")

    released = jobs(two_sends)
    assert [(r, by) for r, by, _, _ in released] == [(1, "association"), (2, "association")]
    assert all(settle < QUIET for *_, settle in released), released  # well before the quiet period
    ((_, by, _, quiet),) = jobs(held_open)
    assert by == "quiet" and quiet >= QUIET - 0.05, jobs(held_open)
    ((_, by, _, quiet),) = jobs(aborted)
    assert by == "quiet" and quiet >= QUIET - 0.05, jobs(aborted)

    srs = [dcmread(f) for f in (tmp_path / "received").iterdir()]
    srs = [o for o in srs if o.SOPClassUID == Comprehensive3DSRStorage]

    def sources(sr) -> set[str]:  # type: ignore[no-untyped-def]
        return {sop.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}

    by_study: dict[str, list] = {}
    for sr in srs:
        by_study.setdefault(str(sr.StudyInstanceUID), []).append(sr)
    two = sorted(by_study[str(two_sends[0].StudyInstanceUID)], key=lambda o: o.InstanceNumber)
    assert len(two) == 2 and sources(two[1]) == {str(ds.SOPInstanceUID) for ds in two_sends}
    named = two[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert named.ReferencedSOPInstanceUID == two[0].SOPInstanceUID
    (held_sr,) = by_study[str(held_open[0].StudyInstanceUID)]
    assert sources(held_sr) == {str(ds.SOPInstanceUID) for ds in held_open}
    assert len(by_study[str(aborted[0].StudyInstanceUID)]) == 1
