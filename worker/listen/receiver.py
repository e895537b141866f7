"""Listen role: records what the SCP received in the ledger (the SCP's Receiver), and counts it.

Each association runs in a thread of its own: its log lines carry ``association_id`` (and the
``study_id`` of the last instance recorded) through structlog's context variables.

Given a publish function, it also hints the workers to prepare (decode and infer) each accepted
instance at once; a thread of its own publishes those, so the C-STORE answer never waits on
the broker.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import structlog
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.filing import RELEASED, Peer, StoredInstance
from worker.ledger import Association, Instance, Study, StudyArrival
from worker.ledger.accession import accession_key
from worker.ledger.db import Ledger, utcnow
from worker.ledger.events import record
from worker.ledger.models import StudyState
from worker.observability.metrics import ASSOCIATIONS_ACTIVE, ASSOCIATIONS_REJECTED, INSTANCES, RECEIVED_BYTES
from worker.queue import PREPARE_TASK, Publish
from worker.storage import LocalStorage, Storage, instance_key

log = structlog.get_logger(__name__)

#: How the SCP words its refusals (dicom_node.scp), as a bounded label for the rejection counter.
_REJECTION_KINDS = (
    ("called AE title", "called_ae"),
    ("calling AE title", "calling_ae"),
    ("association limit", "limit"),
    ("TLS handshake", "tls"),
)


def rejection_kind(reason: str) -> str:
    """``called_ae``, ``calling_ae``, ``limit``, ``tls`` or ``other``."""
    return next((kind for prefix, kind in _REJECTION_KINDS if reason.startswith(prefix)), "other")


class HintPublisher:
    """Publishes ``pleura.prepare`` hints from a daemon thread, in the order they were submitted.

    At most ``capacity`` hints wait (a slow or unreachable broker); more are dropped, as a lost
    hint only leaves the work to the study's job.
    """

    def __init__(self, publish: Publish, capacity: int = 10_000) -> None:
        self._publish = publish
        self._queue: queue.Queue[int] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="pleura-prepare-hints", daemon=True)
        self._thread.start()

    def submit(self, instance_id: int) -> None:
        """Queue a hint; never blocks."""
        try:
            self._queue.put_nowait(instance_id)
        except queue.Full:
            log.debug("prepare hint dropped: too many waiting", instance_id=instance_id)

    def _run(self) -> None:
        while True:
            instance_id = self._queue.get()
            try:
                self._publish(PREPARE_TASK, instance_id)
            except Exception as exc:  # the next hint may go through; this image waits for its job
                log.warning("prepare hint not published", instance_id=instance_id, error=type(exc).__name__)


class LedgerReceiver:
    """Implements ``dicom_node.scp.Receiver`` on the ledger; every call commits.

    With ``publish``, each accepted instance (new or changed bytes, not an identical duplicate)
    is hinted for preparation once its row is committed. ``on_released`` is called once an
    association's A-RELEASE is committed (the sweeper is woken for the completion rule).
    ``storage`` keeps the bytes of each accepted instance in the transaction that records it
    (worker.storage); where it is shared, the spool file is removed once that has committed.
    """

    def __init__(self, ledger: Ledger, publish: Publish | None = None,
                 on_released: Callable[[], None] | None = None, storage: Storage | None = None) -> None:
        self.ledger = ledger
        self.storage = storage or LocalStorage()
        self.hints = HintPublisher(publish) if publish is not None else None
        self.on_released = on_released

    def association_opened(self, peer: Peer) -> int:
        with self.ledger.session() as s:
            assoc = Association(
                calling_ae=peer.calling_ae,
                called_ae=peer.called_ae,
                peer_host=peer.host,
                peer_port=peer.port,
                started_at=utcnow(),
            )
            s.add(assoc)
            s.flush()
            key = assoc.id
        ASSOCIATIONS_ACTIVE.inc()
        structlog.contextvars.bind_contextvars(association_id=key)
        return key

    def association_closed(self, key: object, reason: str) -> None:
        ASSOCIATIONS_ACTIVE.dec()
        log.info("association ended", reason=reason)
        structlog.contextvars.unbind_contextvars("association_id", "study_id")
        with self.ledger.session() as s:
            assoc = s.get(Association, key)
            if assoc is not None:
                assoc.ended_at = utcnow()
                assoc.end_reason = reason
        if reason == RELEASED and self.on_released is not None:
            self.on_released()

    def association_rejected(self, peer: Peer, reason: str) -> None:
        ASSOCIATIONS_REJECTED.labels(rejection_kind(reason)).inc()
        with self.ledger.session() as s:
            record(s, "association_rejected", calling_ae=peer.calling_ae, called_ae=peer.called_ae,
                   peer_host=peer.host, reason=reason)

    def instance_refused(self, key: object, sop_instance_uid: str, status: int, reason: str) -> None:
        INSTANCES.labels("refused", "").inc()
        with self.ledger.session() as s:
            record(s, "instance_refused", association_id=key, sop_instance_uid=sop_instance_uid[:64],
                   status=f"0x{status:04X}", reason=reason)

    def instance_stored(self, stored: StoredInstance) -> None:
        self.instances_stored([stored])

    def instances_stored(self, stored: Sequence[StoredInstance]) -> None:
        """Record the instances in one transaction, by study UID (concurrent batches lock studies in
        one order)."""
        batch = sorted(stored, key=lambda i: i.study_instance_uid)
        for attempt in range(3):
            try:
                with self.ledger.session() as s:
                    recorded = [self._record(s, instance) for instance in batch]
                break
            except IntegrityError:
                if attempt == 2:  # another association created the same rows concurrently
                    raise
        for instance, (study_id, outcome, instance_id) in zip(batch, recorded, strict=True):
            if self.storage.shared:  # the database holds the bytes now; this host keeps none
                Path(instance.path).unlink(missing_ok=True)
            if self.hints is not None and outcome == "accepted":
                self.hints.submit(instance_id)
            structlog.contextvars.bind_contextvars(study_id=study_id)
            INSTANCES.labels(outcome, UID(instance.transfer_syntax_uid).name).inc()
            RECEIVED_BYTES.inc(instance.size)

    def _record(self, s: Session, stored: StoredInstance) -> tuple[int, str, int]:
        """Record the instance; returns the study's id, ``accepted`` or ``duplicate``, the instance's id."""
        now = utcnow()
        study = s.scalars(
            select(Study).where(Study.study_instance_uid == stored.study_instance_uid).with_for_update()
        ).one_or_none()
        if study is None:
            study = Study(
                study_instance_uid=stored.study_instance_uid,
                state=StudyState.RECEIVING,
                revision=1,
                first_received_at=now,
                last_received_at=now,
                receiving_since=now,
            )
            s.add(study)
            s.flush()
            record(s, "study_opened", study_id=study.id)
        if stored.accession_number and study.accession_sha256 is None:
            study.accession_sha256 = accession_key(stored.accession_number)
        instance = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == stored.sop_instance_uid)
        ).one_or_none()
        if instance is not None and instance.sha256 == stored.sha256:
            instance.times_received += 1
            return study.id, "duplicate", instance.id
        if instance is None:
            instance = Instance(
                study_id=study.id,
                association_id=stored.association,
                sop_instance_uid=stored.sop_instance_uid,
                sop_class_uid=stored.sop_class_uid,
                series_instance_uid=stored.series_instance_uid,
                transfer_syntax_uid=stored.transfer_syntax_uid,
                modality=stored.modality,
                spool_path=stored.path,
                size_bytes=stored.size,
                sha256=stored.sha256,
                received_at=now,
            )
            s.add(instance)
        else:
            record(
                s,
                "instance_changed",
                study_id=study.id,
                sop_instance_uid=stored.sop_instance_uid,
                previous_path=instance.spool_path,
                previous_sha256=instance.sha256,
                new_sha256=stored.sha256,
            )
            instance.spool_path, instance.sha256 = stored.path, stored.sha256
            instance.size_bytes, instance.received_at = stored.size, now
            instance.association_id = stored.association
            instance.times_received += 1
            instance.ineligible_reason = None
        self.storage.keep(s, instance_key(stored.sha256), Path(stored.path), stored.sha256)
        study.last_received_at = now
        if study.state != StudyState.RECEIVING:
            record(s, "study_reopened", study_id=study.id, previous_state=study.state,
                   revision=study.revision + 1)
            study.state = StudyState.RECEIVING
            study.revision += 1
            study.done_at = None
            study.receiving_since = now
        s.flush()
        if stored.association is not None:
            _record_arrival(s, study, stored.association, now)
        return study.id, "accepted", instance.id


def _record_arrival(s: Session, study: Study, association_id: int, now: datetime) -> None:
    """Count the instance against (study revision, association): what the completion rule reads."""
    key = {"study_id": study.id, "revision": study.revision, "association_id": association_id}
    arrival = s.get(StudyArrival, key)
    if arrival is None:
        s.add(StudyArrival(**key, instances=1, last_received_at=now))
    else:
        arrival.instances += 1
        arrival.last_received_at = now
