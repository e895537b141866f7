"""A C-STORE whose SOP class is not its context's, or no storage class: one failure status, the association goes on.

pynetdicom's SCU picks the context by the data set's SOP class, so the test hands ``send_c_store``
the context to use (as a peer that mixes them up would send it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.security.make_corpus import base_dataset
from tests.support import free_port, wait_for
from worker.ledger import Association as AssociationRow
from worker.ledger import Event, Instance
from worker.ledger.db import Ledger, upgrade
from worker.listen.receiver import LedgerReceiver

NOT_A_STORAGE_CLASS = "1.2.826.0.1.3680043.10.1.99"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Ledger, int]]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    ledger = Ledger(url)
    port = free_port()
    scp = StorageSCP("PLEURA", "127.0.0.1", port, Spool(tmp_path / "spool"), LedgerReceiver(ledger))
    scp.start()
    yield ledger, port
    scp.stop()
    ledger.close()


def _instance(name: str, sop_class: str | None = None) -> Dataset:
    ds = base_dataset(name)
    if sop_class is not None:
        ds.SOPClassUID = sop_class
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _send_on(assoc: Association, ds: Dataset, context: PresentationContext) -> int | None:
    """C-STORE ``ds`` on ``context`` whatever its SOP class; the status (None: no answer)."""
    with patch.object(assoc, "_get_valid_context", return_value=context):
        return assoc.send_c_store(ds).get("Status")


def test_mismatched_sop_class_is_refused_and_the_association_goes_on(listener: tuple[Ledger, int]) -> None:
    ledger, port = listener
    first, ct, unknown, echo, last = (_instance("first"), _instance("ct", CTImageStorage),
                                      _instance("unknown", NOT_A_STORAGE_CLASS), _instance("echo", Verification),
                                      _instance("last"))
    ae = AE(ae_title="MIXER")
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA", contexts=[
        build_context(first.SOPClassUID, [ExplicitVRLittleEndian]), build_context(Verification)])
    assert assoc.is_established
    contexts = {str(cx.abstract_syntax): cx for cx in assoc.accepted_contexts}
    statuses = []
    for ds in (first, ct, unknown, echo, last):
        statuses.append(_send_on(assoc, ds, contexts[Verification if ds is echo else first.SOPClassUID]))
        assert assoc.is_established, f"aborted after {ds.SOPClassUID}: {statuses}"
    assoc.release()
    assert statuses == [0x0000, 0xA900, 0x0122, 0x0122, 0x0000]

    def ended() -> str | None:
        with ledger.session() as s:
            return s.scalars(select(AssociationRow)).one().end_reason

    assert wait_for(ended, 5, "the association's end to be recorded") == "released"
    with ledger.session() as s:
        stored = [i.sop_instance_uid for i in s.scalars(select(Instance).order_by(Instance.id))]
        refusals = [json.loads(e.detail) for e in s.scalars(select(Event).where(Event.kind == "instance_refused")
                                                             .order_by(Event.id))]
    assert stored == [first.SOPInstanceUID, last.SOPInstanceUID]
    assert [(r["sop_instance_uid"], r["status"]) for r in refusals] == [
        (ct.SOPInstanceUID, "0xA900"), (unknown.SOPInstanceUID, "0x0122"), (echo.SOPInstanceUID, "0x0122")]
    assert CTImageStorage in refusals[0]["reason"] and NOT_A_STORAGE_CLASS in refusals[1]["reason"]
    assert all(r["association_id"] is not None for r in refusals)
