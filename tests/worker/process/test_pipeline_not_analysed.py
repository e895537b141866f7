"""Issue 14: a chest X-ray study that the gate refuses for a chest-domain reason (a child, a
lateral view only, pixels that cannot be decoded) gets exactly one not-analysed SR in its study,
delivered like the other results; studies of other body parts or modalities, and Pleura's own
objects, get nothing; ``PLEURA_NOTIFY_NOT_ANALYSED=false`` turns the notice off.

In process, on SQLite, with the demo model (loaded once for the module): instances are recorded
as the listener records them, the study's job runs here, and its deliveries go over DICOM to a
DCMTK storescp.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComputedRadiographyImageStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select

from dicom_node.filing import StoredInstance
from dicom_node.results.uids import derive_uid
from tests.e2e.harness import storescp
from worker.assemble.sweeper import sweep
from worker.cli.status import recent_studies
from worker.deliver import send as delivery
from worker.ledger import Instance, OutputObject
from worker.ledger.db import Ledger, upgrade
from worker.listen.receiver import LedgerReceiver
from worker.process import eligibility, pipeline
from worker.queue import DELIVER_TASK
from worker.runtime import Runtime
from worker.settings import Settings
from worker.synth.studies import png_to_dataset, read_labels

#: An NIH image of a 12-year-old (PatientAge 012Y); the demo bundle's minimum age is 18.
CHILD = "00004934_000.png"


def _chest_cr(name: str, study: str | None = None, **attrs: object) -> Dataset:
    """A small synthetic adult frontal chest CR (UIDs derived from ``name``), changed by ``attrs``."""
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = derive_uid("na-test-sop", name)
    ds.StudyInstanceUID = derive_uid("na-test-study", study or name)
    ds.SeriesInstanceUID = derive_uid("na-test-series", name)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "CR", "CHEST", "PA", "050Y"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "NOTICE^SYNTHETIC", "NA-1", "19750101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = np.add.outer(np.arange(256), np.arange(256)) * 8
    ds.PixelData = np.clip(ramp, 0, 4095).astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class _Node:
    """A data folder, a SQLite ledger and a runtime sharing the module's engine, delivering to ``dest``."""

    def __init__(self, folder: Path, base: Runtime, dest: tuple[Path, int], **settings: object) -> None:
        url = f"sqlite:///{folder / 'ledger.db'}"
        folder.mkdir()
        upgrade(url)
        self.ledger = Ledger(url)
        self.received, port = dest
        self.published: list[int] = []
        self.rt = dataclasses.replace(
            base, settings=Settings(data_dir=folder, destinations=f"DEST@127.0.0.1:{port}", **settings),
            ledger=self.ledger, publish=self._publish)

    def _publish(self, task: str, row_id: int) -> bool:
        if task == DELIVER_TASK:  # delivered here, in order, by process()
            self.published.append(row_id)
        return True

    def receive(self, ds: Dataset) -> None:
        path = self.rt.settings.spool_dir / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        LedgerReceiver(self.ledger).instance_stored(StoredInstance(
            association=None, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            transfer_syntax_uid=ExplicitVRLittleEndian, modality=ds.Modality, path=str(path),
            size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))

    def process(self) -> list[Dataset]:
        """Queue the quiet study, run its job, deliver what it produced; the objects delivered."""
        before = set(self.received.iterdir())
        for job_id in sweep(self.ledger, 0, 60, self.rt.publish).queued:
            pipeline.run_job(self.rt, job_id)
        for delivery_id in self.published:
            delivery.deliver(self.rt, delivery_id)
        self.published.clear()
        return [dcmread(path) for path in sorted(set(self.received.iterdir()) - before)]

    def kinds(self) -> list[str]:
        with self.ledger.session() as s:
            return list(s.scalars(select(OutputObject.kind).order_by(OutputObject.id)))


@pytest.fixture(scope="module")
def base() -> Iterator[Runtime]:
    rt = Runtime(settings=Settings(), ledger=None, publish=lambda task, row_id: True)  # type: ignore[arg-type]
    rt.engine()
    yield rt
    rt.batcher().close()


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A storescp of the test's own (it names files by SOP Instance UID, and UIDs repeat across tests)."""
    proc, port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    yield tmp_path / "received", port
    proc.stop()


@pytest.fixture
def node(tmp_path: Path, base: Runtime, dest: tuple[Path, int]) -> Iterator[_Node]:
    n = _Node(tmp_path / "node", base, dest)
    yield n
    n.ledger.close()


def _child(nih: Path) -> Dataset:
    row = next(r for r in read_labels(nih / "labels.csv") if r["image"] == CHILD)
    ds = png_to_dataset(nih / "images" / CHILD, row, modality="DX")
    assert ds.PatientAge == "012Y" and ds.ViewPosition == "PA"
    return ds


def _sentence(notice: Dataset) -> str:
    (section,) = [item for item in notice.ContentSequence if item.ValueType == "CONTAINER"]
    return section.ContentSequence[0].TextValue


def test_child_lateral_and_undecodable_studies_get_one_notice_each(
        node: _Node, nih: Path, dciodvfy) -> None:  # type: ignore[no-untyped-def]
    child = _child(nih)
    lateral = _chest_cr("lateral", ViewPosition="LL")
    broken = _chest_cr("broken")
    broken.PixelData = broken.PixelData[:1000]  # a chest CR whose pixel data is cut short
    expected = {
        child.StudyInstanceUID: "Not analysed by AI model demo 0.1.0: patient age below the intended "
                                "minimum of 18 years.",
        lateral.StudyInstanceUID: "Not analysed by AI model demo 0.1.0: lateral view (the model is "
                                  "intended for AP or PA views).",
        broken.StudyInstanceUID: "Not analysed by AI model demo 0.1.0: the image pixel data could not be decoded.",
    }
    for ds in (child, lateral, broken):
        node.receive(ds)
    delivered = node.process()

    assert sorted(o.StudyInstanceUID for o in delivered) == sorted(expected)  # one per study
    for notice in delivered:
        assert notice.SOPClassUID == EnhancedSRStorage
        assert _sentence(notice) == expected[notice.StudyInstanceUID]
        assert notice.SeriesDescription == "AI not analysed (demo 0.1.0) - not for primary diagnosis"
        assert notice.SeriesNumber == pipeline.NOT_ANALYSED_SERIES_NUMBER and notice.InstanceNumber == 1
        source = {ds.StudyInstanceUID: ds for ds in (child, lateral, broken)}[notice.StudyInstanceUID]
        assert (notice.PatientID, notice.PatientName) == (source.PatientID, source.PatientName)
    assert node.kinds() == [pipeline.NOT_ANALYSED_KIND] * 3
    path = next(p for p in node.received.iterdir() if dcmread(p, stop_before_pixels=True).StudyInstanceUID
                == child.StudyInstanceUID)
    assert dciodvfy(path)[0] == []

    status = {row["study_instance_uid"]: row for row in recent_studies(node.ledger)}
    for uid in expected:
        assert status[uid]["state"] == "DONE" and status[uid]["deliveries"] == {"DELIVERED": 1}
        assert status[uid]["note"] == "no eligible images; not-analysed SR produced"
    assert status[broken.StudyInstanceUID]["ineligible"][broken.SOPInstanceUID].startswith(
        "pixel data could not be decoded")


def test_other_studies_and_our_own_objects_stay_silent(node: _Node, nih: Path) -> None:
    knee = _chest_cr("knee", BodyPartExamined="KNEE", PatientAge="012Y")  # a child's knee: not our business
    ct = _chest_cr("ct", Modality="CT", ViewPosition="LL")
    child = _child(nih)
    for ds in (knee, ct, child):
        node.receive(ds)
    (notice,) = node.process()
    assert notice.StudyInstanceUID == child.StudyInstanceUID
    node.receive(notice)  # the PACS sends our notice back: the study reopens, nothing new is sent
    assert node.process() == []
    status = {row["study_instance_uid"]: row for row in recent_studies(node.ledger)}
    for ds, reason in ((knee, "body part KNEE"), (ct, "modality CT")):
        row = status[ds.StudyInstanceUID]
        assert (row["state"], row["note"], row["deliveries"]) == ("DONE", "no eligible images", {})
        assert row["ineligible"][ds.SOPInstanceUID].startswith(reason)
    row = status[child.StudyInstanceUID]
    assert (row["revision"], row["ineligible"][notice.SOPInstanceUID]) == (2, "produced by Pleura")
    assert node.kinds() == [pipeline.NOT_ANALYSED_KIND]  # the child's, nothing since


def test_setting_turns_the_notice_off(tmp_path: Path, base: Runtime, dest: tuple[Path, int], nih: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEURA_NOTIFY_NOT_ANALYSED", "false")
    off = _Node(tmp_path / "off", base, dest)
    assert off.rt.settings.notify_not_analysed is False
    off.receive(_child(nih))
    off.receive(_chest_cr("lateral-off", ViewPosition="LL"))
    assert off.process() == [] and off.kinds() == []
    assert {row["note"] for row in recent_studies(off.ledger)} == {"no eligible images"}
    off.ledger.close()


def test_revisions_replace_the_notice_then_the_findings_follow(node: _Node) -> None:
    study = "revisions"
    (first,) = _one(node, _chest_cr("lat-1", study, ViewPosition="LL"))
    (second,) = _one(node, _chest_cr("lat-2", study, ViewPosition="RL"))  # one more lateral: the notice is redone
    assert second.SOPInstanceUID != first.SOPInstanceUID and second.SeriesInstanceUID == first.SeriesInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    assert _sentence(first) == _sentence(second)  # both lateral: the reason is said once
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert _one(node, _chest_cr("knee-3", study, BodyPartExamined="KNEE")) == []  # same refusals: same notice

    findings = _one(node, _chest_cr("pa-4", study))  # an image the model reads: SR + SC as for any study
    assert sorted(o.SOPClassUID for o in findings) == sorted([Comprehensive3DSRStorage, SecondaryCaptureImageStorage])
    (sr,) = [o for o in findings if o.SOPClassUID == Comprehensive3DSRStorage]
    assert "PredecessorDocumentsSequence" not in sr  # the notice is another document, not a version of it
    assert node.kinds() == ["SR-NA", "SR-NA", "SC", "SR"]
    with node.ledger.session() as s:
        assert s.scalars(select(Instance.ineligible_reason).where(
            Instance.sop_instance_uid == derive_uid("na-test-sop", "pa-4"))).one() is None
    status = recent_studies(node.ledger)[0]
    assert (status["revision"], status["note"], status["deliveries"]) == (4, None, {"DELIVERED": 2})


def _one(node: _Node, ds: Dataset) -> list[Dataset]:
    node.receive(ds)
    return node.process()


def test_which_refusals_are_chest_domain() -> None:
    use = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "views": ["PA", "AP"], "min_age_years": 18}
    told = {
        "lateral": (dict(ViewPosition="LL"), "lateral view (the model is intended for AP or PA views)"),
        "oblique": (dict(ViewPosition="OBL"), "view position OBL (the model is intended for AP or PA views)"),
        "child": (dict(PatientAge="012Y"), "patient age below the intended minimum of 18 years"),
        "colour": (dict(PhotometricInterpretation="RGB"), "image type not supported (photometric interpretation RGB)"),
    }
    for name, (attrs, notice) in told.items():
        refusal = eligibility.check(_chest_cr(name, **attrs), use)
        assert refusal is not None and refusal.chest_domain and refusal.notice == notice, name
        assert "12" not in refusal.notice  # the patient's age is never said
    silent = {"knee": dict(BodyPartExamined="KNEE", PatientAge="012Y"), "ct": dict(Modality="CT", ViewPosition="LL"),
              "own": dict(Manufacturer="Pleura")}
    for name, attrs in silent.items():
        refusal = eligibility.check(_chest_cr(name, **attrs), use)
        assert refusal is not None and not refusal.chest_domain and refusal.notice is None, name
    no_rows = _chest_cr("no-rows")
    del no_rows.Rows
    assert not eligibility.check(no_rows, use).chest_domain  # type: ignore[union-attr]
    assert eligibility.undecodable("pixel data could not be decoded: ...").chest_domain
    assert eligibility.check(_chest_cr("adult"), use) is None
