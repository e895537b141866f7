"""Helpers for the reliability tests: small real studies, a recording C-STORE sender, ledger and spool checks.

Studies are built with :mod:`worker.synth.studies` from NIH ChestX-ray14 PNGs downscaled to a
small matrix, so that a thousand instances fit a CI machine. The sender records the DIMSE
status of every C-STORE (``None`` when the association died before an answer).
"""

from __future__ import annotations

import copy
import hashlib
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from sqlalchemy import create_engine, text

from dicom_node.spool import Spool
from worker.synth.studies import png_to_dataset, read_labels

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def small_studies(nih: Path, studies: int, per_study: int, size: int = 128) -> list[list[Dataset]]:
    """``studies`` studies of ``per_study`` CR images each, ``size`` x ``size`` pixels, fresh UIDs.

    Pixels come from distinct NIH images of adults (cycled when more are asked for than the
    sample holds), so that every image passes the demo model's intended-use gate.
    """
    rows = [row for row in read_labels(nih / "labels.csv") if int(row["age"]) >= 18]
    templates: dict[int, Dataset] = {}
    result = []
    for s in range(studies):
        study_uid = generate_uid()
        datasets = []
        for i in range(per_study):
            index = (s * per_study + i) % len(rows)
            if index not in templates:
                row = {**rows[index], "original_width": str(size), "original_height": str(size)}
                templates[index] = png_to_dataset(nih / "images" / row["image"], row)
            ds = copy.deepcopy(templates[index])
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            datasets.append(ds)
        result.append(datasets)
    return result


def wire_bytes(ds: Dataset) -> bytes:
    """The data set exactly as the sender puts it on the wire (Explicit VR Little Endian)."""
    data = encode(ds, False, True)
    assert data is not None
    return data


def dataset_bytes_of_file(path: Path) -> bytes:
    """A Part 10 file's bytes after its preamble and File Meta Information group."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM" or raw[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path.name} is not a Part 10 file with a group length")
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class SendLog:
    """Every C-STORE answer in order, and the last status by SOP Instance UID (thread-safe)."""

    answers: list[tuple[str, int | None]] = field(default_factory=list)
    statuses: dict[str, int | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)  # SOP Instance UIDs sent again over a new association
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, sop_uid: str, status: int | None) -> None:
        with self.lock:
            self.answers.append((sop_uid, status))
            self.statuses[sop_uid] = status

    def with_status(self, status: int | None) -> list[str]:
        with self.lock:
            return [uid for uid, s in self.statuses.items() if s == status]


def send(port: int, datasets: Sequence[Dataset], log: SendLog, calling_ae: str = "MODALITY",
         after_each: Callable[[str, int | None], None] | None = None, timeout: float = 60,
         resend_after_abort: int = 0) -> None:
    """C-STORE ``datasets`` over one association, recording each answer; stops when the association dies.

    With ``resend_after_abort`` N, a dead association is opened again (N times at most) and the
    instance left unanswered is sent again with the rest, as a PACS does. pynetdicom's requestor can
    lose a C-STORE response to its own reactor thread (a race in pynetdicom 3.0; the sender then
    times out and aborts), so a long run of C-STOREs needs this to finish.
    """
    pending = list(datasets)
    for round_ in range(resend_after_abort + 1):
        if round_:
            with log.lock:
                log.resent.append(str(pending[0].SOPInstanceUID))
        pending = _send_until_dead(port, pending, log, calling_ae, after_each, timeout,
                                   final=round_ == resend_after_abort)
        if not pending:
            return


def _send_until_dead(port: int, datasets: list[Dataset], log: SendLog, calling_ae: str,
                     after_each: Callable[[str, int | None], None] | None, timeout: float,
                     final: bool) -> list[Dataset]:
    """Send over one association; the datasets left unanswered when it died (errors logged if ``final``)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    if not assoc.is_established:
        if final:
            log.errors.append("association not established")
        return datasets
    try:
        for i, ds in enumerate(datasets):
            uid = str(ds.SOPInstanceUID)
            try:
                answer = assoc.send_c_store(ds)
                status = int(answer.Status) if "Status" in answer else None
            except Exception as exc:  # the peer died mid-transfer
                status = None
                if final:
                    log.errors.append(f"{type(exc).__name__}: {exc}")
            if status is None and not final and not assoc.is_established:
                return datasets[i:]
            log.put(uid, status)
            if after_each is not None:
                after_each(uid, status)
            if not assoc.is_established:
                return datasets[i + 1:]
    finally:
        if assoc.is_established:
            assoc.release()
    return []


def send_concurrently(port: int, batches: Sequence[Sequence[Dataset]], log: SendLog, **kwargs: object) -> None:
    """One association per batch, all at once; returns when every sender has finished."""
    threads = [threading.Thread(target=send, args=(port, batch, log), kwargs=kwargs, daemon=True)
               for batch in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)


class Ledger:
    """Read-only SQL on the ledger (PostgreSQL or SQLite URL)."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def rows(self, sql: str, **params: object) -> list:  # type: ignore[type-arg]
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).mappings().all())

    def scalar(self, sql: str, **params: object):  # type: ignore[no-untyped-def]
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def close(self) -> None:
        self.engine.dispose()


def production_env(pg_url: str, broker_url: str, data_dir: Path, port: int, dest_port: int,
                   quiet: float, lease: float = 6) -> dict[str, str]:
    """Settings for `pleura listen` / `pleura worker` on PostgreSQL and RabbitMQ, delivering to DEST.

    Give it a private broker (``tests.reliability.services.PrivateRabbitMQ``): the machine's
    shared one holds one ``pleura`` queue for every test running at once, and thousands of
    stale messages in it would set this test's pace.
    """
    return {
        "PLEURA_DATA_DIR": str(data_dir),
        "PLEURA_DATABASE_URL": pg_url,
        "PLEURA_BROKER_URL": broker_url,
        "PLEURA_DICOM_PORT": str(port),
        "PLEURA_DESTINATIONS": f"DEST@127.0.0.1:{dest_port}",
        "PLEURA_STUDY_QUIET_SECONDS": str(quiet),
        "PLEURA_SWEEP_INTERVAL_SECONDS": "0.5",
        "PLEURA_LEASE_SECONDS": str(lease),
        "PLEURA_MIN_FREE_DISK_MB": "20",
    }


def spool_files(spool: Path) -> tuple[list[Path], list[Path]]:
    """(instance files ``*.dcm``, temporary files: data sets being received, in ``.incoming/``) under the spool."""
    files = [p for p in spool.rglob("*") if p.is_file()]
    temps = [p for p in files if p.parent.name == Spool.INCOMING]
    return [p for p in files if p not in temps], temps
