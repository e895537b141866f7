"""The Storage SCP: C-ECHO and C-STORE for every storage SOP class.

The C-STORE handler never decodes pixels. It reads the header, writes the encoded bytes to
the spool durably, tells the application through a :class:`Receiver`, and answers Success
only when both returned. The application passes the Receiver in; this module knows no
database and no queue.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from io import BytesIO
from typing import Protocol

import structlog
from pydicom import dcmread, uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.spool import Spool, SpoolFull

log = structlog.get_logger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

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

#: Header attributes the application gets with each instance (no PHI among them).
_HEADER_KEYWORDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")


@dataclass(frozen=True)
class Peer:
    """Who opened an association."""

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


class Receiver(Protocol):
    """What the SCP reports to; every method may raise to make the SCP refuse."""

    def association_opened(self, peer: Peer) -> object:
        """Record the association; the returned key comes back with each instance."""

    def instance_stored(self, stored: StoredInstance) -> None:
        """Record the instance durably (commit) before returning."""

    def association_closed(self, key: object, reason: str) -> None:
        """Record the end of the association."""

    def association_rejected(self, peer: Peer, reason: str) -> None:
        """Record an association refused before it was established."""

    def instance_refused(self, key: object, sop_instance_uid: str, status: int, reason: str) -> None:
        """Record a C-STORE answered with a failure status (nothing of it was kept)."""


class StorageSCP:
    """A running listener; ``start()`` returns at once, ``stop()`` shuts it down."""

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        spool: Spool,
        receiver: Receiver,
        max_associations: int = 10,
    ) -> None:
        self.address = (host, port)
        self.spool = spool
        self.receiver = receiver
        self._keys: dict[int, object] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        self.ae.maximum_associations = max_associations
        self.ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, lambda event: self._on_closed(event, "released")),
            (evt.EVT_ABORTED, lambda event: self._on_closed(event, "aborted")),
        ]
        self._server = self.ae.start_server(self.address, block=False, evt_handlers=handlers)
        log.info("listening", ae_title=self.ae.ae_title, address=f"{self.address[0]}:{self.address[1]}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        peer = Peer(
            calling_ae=assoc.requestor.ae_title,
            called_ae=assoc.acceptor.ae_title,
            host=assoc.requestor.address,
            port=assoc.requestor.port,
        )
        try:
            key = self.receiver.association_opened(peer)
        except Exception:
            log.exception("association could not be recorded; aborting it")
            assoc.abort()
            return
        with self._lock:
            self._keys[id(assoc)] = key

    def _on_closed(self, event: evt.Event, reason: str) -> None:
        with self._lock:
            key = self._keys.pop(id(event.assoc), None)
        if key is not None:
            try:
                self.receiver.association_closed(key, reason)
            except Exception:
                log.exception("association end could not be recorded")

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            key = self._keys.get(id(event.assoc))
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        status, reason = self._store(event, key, sop_uid)
        if status != SUCCESS:
            log.warning("C-STORE refused", status=f"0x{status:04X}", reason=reason)
            try:
                self.receiver.instance_refused(key, sop_uid, status, reason)
            except Exception:
                log.exception("refusal could not be recorded")
        return status

    def _store(self, event: evt.Event, key: object, sop_uid: str) -> tuple[int, str]:
        """Spool and record one instance; return the DIMSE status and, on failure, why."""
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            data = event.encoded_dataset(include_meta=True)
            header = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=list(_HEADER_KEYWORDS))
            study_uid = str(header.get("StudyInstanceUID", ""))
            series_uid = str(header.get("SeriesInstanceUID", ""))
            if str(header.get("SOPInstanceUID", "")) != sop_uid:
                raise ValueError("SOP Instance UID in the data set differs from the C-STORE request's")
            written = self.spool.store(study_uid, sop_uid, data)
        except SpoolFull as exc:
            return OUT_OF_RESOURCES, f"spool full: {exc}"
        except OSError as exc:
            return OUT_OF_RESOURCES, f"spool write failed: {type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # anything unparseable is the peer's data set, never a crash here
            return CANNOT_UNDERSTAND, f"cannot understand: {type(exc).__name__}: {exc}"[:300]
        stored = StoredInstance(
            association=key,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            modality=header.get("Modality") or None,
            path=str(written.path),
            size=written.size,
            sha256=written.sha256,
        )
        try:
            self.receiver.instance_stored(stored)
        except Exception as exc:
            log.exception("instance could not be recorded")
            return OUT_OF_RESOURCES, f"ledger write failed: {type(exc).__name__}"
        return SUCCESS, ""
