"""What every way in (DIMSE C-STORE, DICOMweb STOW-RS) does with an instance once its bytes are in a
spool's temporary file: read its header, file it under its UIDs, hand it to the application's
:class:`Receiver`, and say why when it cannot (a DICOM status and a reason that quotes no value
of the sender's: a parser's message may hold patient names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from pydicom import Dataset, dcmread, uid

from dicom_node.deflate import InflateError, inflated_size
from dicom_node.spool import Incoming, InvalidUID, Spool, SpoolFull

log = structlog.get_logger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
#: PS3.4 B.2.3: the data set is not of the presentation context's SOP class.
DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: PS3.7 C.4.2: a SOP class the listener does not take at all.
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: PS3.18 10.5.3: a transfer syntax the origin server does not take.
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
#: PS3.18 10.5.3 failure reasons are DIMSE statuses; an instance of another study than the one the
#: STOW-RS request names is refused in the "cannot understand" range (0xCxxx).
STUDY_UID_MISMATCH = 0xC409
#: The end reason of an association the peer ended with an A-RELEASE (others begin "aborted"); a
#: STOW-RS request whose answer was sent ends so too.
RELEASED = "released"

#: Transfer syntaxes we accept, in order of preference when a peer proposes several in one
#: context: lossless compressed (stored exactly as sent), then uncompressed, then lossy
#: (last, so that a peer holding uncompressed pixels is never asked to compress them lossily).
ACCEPTED_TRANSFER_SYNTAXES = [
    uid.JPEG2000Lossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.JPEGLSLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.RLELossless,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEG2000,
    uid.HTJ2K,
    uid.JPEGLSNearLossless,
    uid.JPEGExtended12Bit,
    uid.JPEGBaseline8Bit,
]

#: Header attributes the application gets with each instance (no patient names, IDs or birth dates;
#: the accession number is how a RIS names the study, and the application stores only its hash).
HEADER_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                   "AccessionNumber")


@dataclass(frozen=True)
class Peer:
    """Who opened an association (or sent a STOW-RS request: the token's name as calling AE)."""

    calling_ae: str
    called_ae: str
    host: str
    port: int


@dataclass(frozen=True)
class StoredInstance:
    """An instance durably in the spool, handed to the application to record."""

    association: object
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    path: str
    size: int
    sha256: str
    accession_number: str | None = None


class Receiver(Protocol):
    """What the listeners report to; every method may raise to make them refuse."""

    def association_opened(self, peer: Peer) -> object:
        """Record the association; the returned key comes back with each instance."""

    def instance_stored(self, stored: StoredInstance) -> None:
        """Record the instance durably (commit) before returning."""

    def instances_stored(self, stored: Sequence[StoredInstance]) -> None:
        """Record several instances durably, in one transaction (all or none), before returning."""

    def association_closed(self, key: object, reason: str) -> None:
        """Record the end of the association."""

    def association_rejected(self, peer: Peer, reason: str) -> None:
        """Record an association refused before it was established."""

    def instance_refused(self, key: object, sop_instance_uid: str, status: int, reason: str) -> None:
        """Record an instance answered with a failure status (nothing of it was kept)."""


class NotUnderstood(ValueError):
    """A data set refused for a reason stated by this package (its message quotes no sender's value)."""


class Refused(Exception):
    """An instance not kept: the DICOM status to answer and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def refusal(exc: Exception) -> Refused:
    """The status and reason for what went wrong while an instance was received or filed."""
    if isinstance(exc, Refused):
        return exc
    if isinstance(exc, SpoolFull):
        return Refused(OUT_OF_RESOURCES, f"spool full: {exc}")
    if isinstance(exc, OSError):
        return Refused(OUT_OF_RESOURCES, f"spool write failed: {type(exc).__name__} (errno {exc.errno})")
    if isinstance(exc, (NotUnderstood, InvalidUID, InflateError)):
        return Refused(CANNOT_UNDERSTAND, f"cannot understand: {exc}")
    # anything unparseable is the sender's data set, never a crash here; only the type is named
    return Refused(CANNOT_UNDERSTAND, f"cannot understand: unparseable data set ({type(exc).__name__})")


def read_header(incoming: Incoming, transfer_syntax: str, max_inflated_bytes: int) -> Dataset:
    """The attributes of :data:`HEADER_KEYWORDS` of the Part-10 file ``incoming`` (a deflated data set
    is first inflated piece by piece, keeping nothing, and refused beyond ``max_inflated_bytes``)."""
    if transfer_syntax == uid.DeflatedExplicitVRLittleEndian:
        inflated_size(incoming.path.read_bytes(), max_inflated_bytes)  # before dcmread inflates it
    return dcmread(incoming.path, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))


def file_instance(spool: Spool, incoming: Incoming, header: Dataset, association: object, transfer_syntax: str,
                  sop_class: str | None = None, sop_uid: str | None = None, study_uid: str | None = None,
                  sync_folder: bool = True) -> StoredInstance:
    """File ``incoming`` (its :func:`read_header`) in ``spool``. ``sop_class``, ``sop_uid``, ``study_uid``:
    what the request said the instance is (C-STORE's affected SOP class and instance, STOW-RS's study),
    checked against the data set; ``sync_folder``: as :meth:`Spool.place`. Raises what :func:`refusal`
    maps."""
    found_uid = str(header.get("SOPInstanceUID", ""))
    if sop_uid is not None and found_uid != sop_uid:
        raise NotUnderstood("SOP Instance UID in the data set differs from the C-STORE request's")
    found_study = str(header.get("StudyInstanceUID", ""))
    if study_uid is not None and found_study != study_uid:
        raise Refused(STUDY_UID_MISMATCH, "the instance's Study Instance UID is not the request's study")
    written = spool.place(incoming, found_study, found_uid, sync_folder)
    return StoredInstance(
        association=association,
        sop_class_uid=sop_class or str(header.get("SOPClassUID", "")),
        sop_instance_uid=found_uid,
        study_instance_uid=found_study,
        series_instance_uid=str(header.get("SeriesInstanceUID", "")),
        transfer_syntax_uid=transfer_syntax,
        modality=header.get("Modality") or None,
        accession_number=str(header.get("AccessionNumber") or "").strip() or None,
        path=str(written.path),
        size=written.size,
        sha256=written.sha256,
    )


def record_instance(receiver: Receiver, stored: StoredInstance) -> tuple[int, str]:
    """Hand a filed instance to the application; the status to answer and, on failure, why."""
    return record_instances(receiver, [stored])


def record_instances(receiver: Receiver, stored: Sequence[StoredInstance]) -> tuple[int, str]:
    """Hand filed instances to the application, in one transaction when there are several; the status
    to answer for each (all or none are recorded) and, on failure, why."""
    try:
        if len(stored) == 1:
            receiver.instance_stored(stored[0])
        else:
            receiver.instances_stored(stored)
    except Exception as exc:
        log.exception("instance could not be recorded")
        return OUT_OF_RESOURCES, f"ledger write failed: {type(exc).__name__}"
    return SUCCESS, ""
