"""The listener writes a C-STORE data set into the spool as its fragments arrive (``_StreamingDIMSE``):
the file is the part-10 form pynetdicom's own handler would have written, an association that ends
mid data set leaves nothing behind, and a write that fails is one failure status, not an abort."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

import dicom_node.spool
from dicom_node.filing import OUT_OF_RESOURCES, SUCCESS, Peer, StoredInstance
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.security.make_corpus import base_dataset
from tests.support import free_port, wait_for

MAX_PDU = 16_384  # a 1 MB data set arrives in about 64 fragments


@dataclass
class Recorder:
    """A Receiver that keeps what it is told."""

    stored: list[StoredInstance] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    def association_opened(self, peer: Peer) -> object:
        return peer.port

    def instance_stored(self, stored: StoredInstance) -> None:
        self.stored.append(stored)

    def association_closed(self, key: object, reason: str) -> None:
        self.closed.append(reason)

    def association_rejected(self, peer: Peer, reason: str) -> None:
        raise AssertionError(reason)

    def instance_refused(self, key: object, sop_instance_uid: str, status: int, reason: str) -> None:
        self.refused.append((status, reason))


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[int, Spool, Recorder]]:
    port, spool, recorder = free_port(), Spool(tmp_path / "spool"), Recorder()
    scp = StorageSCP("PLEURA", "127.0.0.1", port, spool, recorder)
    scp.start()
    yield port, spool, recorder
    scp.stop()


def _image(name: str, rows: int = 512) -> Dataset:
    """A CR image of ``rows`` x ``rows`` 16-bit pixels (512: about 0.5 MB)."""
    ds = base_dataset(name, rows, rows)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _associate(port: int, ds: Dataset):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="STREAMER")
    ae.maximum_pdu_size = MAX_PDU
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA", max_pdu=MAX_PDU,
                         contexts=[build_context(ds.SOPClassUID, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    return assoc


def _leftovers(spool: Spool) -> list[Path]:
    return sorted(spool.incoming_dir.iterdir())


def test_the_spooled_file_is_the_part10_form_of_what_was_sent(listener: tuple[int, Spool, Recorder]) -> None:
    port, spool, recorder = listener
    ds = _image("stream")
    assoc = _associate(port, ds)
    assert assoc.send_c_store(ds).Status == SUCCESS
    assoc.release()
    (stored,) = recorder.stored
    expected = (b"\0" * 128 + b"DICM"
                + encode_file_meta(create_file_meta(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                                                    transfer_syntax=ExplicitVRLittleEndian))
                + encode(ds, False, True))
    data = Path(stored.path).read_bytes()
    assert data == expected  # byte for byte what pynetdicom's in-memory data set gave: digests did not change
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
    assert dcmread(stored.path).PixelData == ds.PixelData
    assert _leftovers(spool) == []


def test_an_association_aborted_mid_data_set_leaves_nothing(listener: tuple[int, Spool, Recorder]) -> None:
    port, spool, recorder = listener
    ds = _image("aborted", rows=1024)  # 2 MB: about 128 fragments
    assoc = _associate(port, ds)
    request = C_STORE()
    request.MessageID, request.AffectedSOPClassUID = 1, ds.SOPClassUID
    request.AffectedSOPInstanceUID, request.Priority = ds.SOPInstanceUID, 2
    request.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    fragments = message.encode_msg(assoc.accepted_contexts[0].context_id, MAX_PDU)
    for _ in range(40):  # the command set and part of the data set
        assoc.dul.send_pdu(next(fragments))
    wait_for(lambda: len(_leftovers(spool)) == 1, 10, "the data set written as it arrives")
    assoc.abort()
    wait_for(lambda: recorder.closed, 10, "the abort recorded")
    wait_for(lambda: _leftovers(spool) == [], 10, "the partial file removed")
    assert recorder.stored == [] and recorder.closed == ["aborted"]
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []


def test_a_failed_write_is_out_of_resources_and_the_association_goes_on(
        listener: tuple[int, Spool, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    port, spool, recorder = listener
    real_write, written = os.write, []

    def disk_full_after_100k(fd: int, data: bytes) -> int:
        written.append(len(data))
        if sum(written) > 100_000 and len(written) < 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    first, second = _image("full"), _image("after")
    assoc = _associate(port, first)
    monkeypatch.setattr(dicom_node.spool.os, "write", disk_full_after_100k)
    assert assoc.send_c_store(first).Status == OUT_OF_RESOURCES
    monkeypatch.setattr(dicom_node.spool.os, "write", real_write)
    assert assoc.is_established
    assert assoc.send_c_store(second).Status == SUCCESS
    assoc.release()
    assert recorder.refused == [(OUT_OF_RESOURCES, "spool write failed: OSError (errno 28)")]
    assert [s.sop_instance_uid for s in recorder.stored] == [second.SOPInstanceUID]
    assert _leftovers(spool) == []
