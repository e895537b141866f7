"""The listen role with a real DICOM peer (DCMTK storescu) and both ledger back-ends."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.support import free_port, require_tool, wait_for
from worker.ledger import Association, Event, Instance, Study
from worker.ledger.db import Ledger, upgrade
from worker.ledger.models import StudyState
from worker.listen.receiver import LedgerReceiver


@pytest.fixture
def listener(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    upgrade(db_url)
    ledger = Ledger(db_url)
    port = free_port()
    scp = StorageSCP("PLEURA", "127.0.0.1", port, Spool(tmp_path / "spool"), LedgerReceiver(ledger))
    scp.start()
    yield ledger, port, tmp_path / "spool"
    scp.stop()
    ledger.close()


def storescu(
    port: int, *files: Path, calling: str = "MODALITY1", called: str = "PLEURA"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("storescu"), "-v", "-xw", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )


def test_real_cr_is_spooled_and_recorded(listener, real_cr: Path) -> None:  # type: ignore[no-untyped-def]
    ledger, port, spool = listener
    sent = dcmread(real_cr)
    result = storescu(port, real_cr)
    assert result.returncode == 0, result.stderr
    with ledger.session() as s:
        instance = s.scalars(select(Instance)).one()
        study = s.get(Study, instance.study_id)
        assoc = s.get(Association, instance.association_id)
        assert instance.sop_instance_uid == sent.SOPInstanceUID
        assert instance.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID  # stored as sent
        assert study.study_instance_uid == sent.StudyInstanceUID and study.state == StudyState.RECEIVING
        assert assoc.calling_ae == "MODALITY1" and assoc.peer_host == "127.0.0.1"

    def ended() -> str | None:  # the release event may be handled just after storescu exits
        with ledger.session() as s:
            return s.get(Association, instance.association_id).end_reason

    assert wait_for(ended, 5, "the association's end to be recorded") == "released"
    stored = dcmread(instance.spool_path)
    assert stored.PixelData == sent.PixelData  # encoded bytes untouched
    assert Path(instance.spool_path).is_relative_to(spool)


def test_identical_duplicate_is_a_noop_and_changed_bytes_are_kept(listener, real_cr: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ledger, port, spool = listener
    assert storescu(port, real_cr).returncode == 0
    assert storescu(port, real_cr).returncode == 0
    changed = dcmread(real_cr)
    changed.SeriesDescription = "corrected"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    assert storescu(port, changed_path).returncode == 0
    assert storescu(port, changed_path).returncode == 0  # the same correction again: no change

    def current() -> tuple[str, int, int]:
        with ledger.session() as s:
            instance = s.scalars(select(Instance)).one()
            changes = sum(e.kind == "instance_changed" for e in s.scalars(select(Event)).all())
            return instance.spool_path, instance.times_received, changes

    path, times, changes = current()
    assert (times, changes) == (4, 1)
    assert dcmread(path).SeriesDescription == "corrected"
    assert len(list(spool.rglob("*.dcm"))) == 2  # first copy kept, changed copy beside it
    assert storescu(port, real_cr).returncode == 0  # back to the original bytes
    path, times, changes = current()
    assert (times, changes) == (5, 2) and dcmread(path).get("SeriesDescription") != "corrected"
    assert len(list(spool.rglob("*.dcm"))) == 2  # nothing new written


def test_invalid_study_uid_is_refused_with_a_status(listener, real_cr: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ledger, port, spool = listener
    bad = dcmread(real_cr)
    bad.StudyInstanceUID = "../../etc/passwd"
    bad_path = tmp_path / "bad.dcm"
    bad.save_as(bad_path)
    result = storescu(port, bad_path)
    assert "Error: CannotUnderstand" in result.stdout + result.stderr  # status 0xC000
    assert not list(spool.rglob("*.dcm"))
    with ledger.session() as s:
        assert s.scalars(select(Instance)).first() is None


def test_wrong_called_ae_is_rejected(listener, real_cr: Path) -> None:  # type: ignore[no-untyped-def]
    ledger, port, spool = listener
    result = storescu(port, real_cr, called="NOT_PLEURA")
    assert result.returncode != 0
    assert "rejected" in (result.stdout + result.stderr).lower()
    assert not list(spool.rglob("*.dcm"))


def test_spool_over_watermark_refuses_with_out_of_resources(real_cr: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    ledger = Ledger(url)
    port = free_port()
    full = Spool(tmp_path / "spool", min_free_bytes=10**18)  # more free space than any disk has
    scp = StorageSCP("PLEURA", "127.0.0.1", port, full, LedgerReceiver(ledger))
    scp.start()
    try:
        result = storescu(port, real_cr)
    finally:
        scp.stop()
    assert "Refused: OutOfResources" in result.stdout + result.stderr  # status 0xA700
    assert not [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    with ledger.session() as s:
        assert s.scalars(select(Instance)).first() is None


def test_sop_instance_uid_mismatch_is_refused(real_cr: Path, tmp_path: Path) -> None:
    """DCMTK and pynetdicom always send matching UIDs, so the handler gets a hand-made request, its
    data set received into the spool as the listener receives it."""
    from types import SimpleNamespace

    from dicom_node.filing import CANNOT_UNDERSTAND
    from dicom_node.scp import _Received

    spool = Spool(tmp_path / "spool")
    received = _Received(spool, real_cr.read_bytes)  # the file's own preamble and meta, then no data set
    event = SimpleNamespace(
        request=SimpleNamespace(AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.1", AffectedSOPInstanceUID="1.2.3.4.5",
                                MessageID=7),
        context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.4.91"),
        assoc=SimpleNamespace(dimse=SimpleNamespace(take={7: received}.pop)),
    )
    scp = StorageSCP("PLEURA", "127.0.0.1", free_port(), spool, receiver=None)  # type: ignore[arg-type]
    assert scp._on_store(event) == CANNOT_UNDERSTAND
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []  # nor its temporary file
