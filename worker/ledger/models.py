"""Ledger tables. PostgreSQL in production, SQLite for the embedded default, same models.

States are plain strings (see the ``*State`` classes) so that an auditor reads them in SQL.
Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class Base(DeclarativeBase):
    pass


class StudyState:
    RECEIVING = "RECEIVING"
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    FAILED = "FAILED"


class JobState:
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SUPERSEDED = "SUPERSEDED"


class OutboundState:
    """What deliveries and notifications share: due (``PENDING``), under a lease (``SENDING``), done."""

    PENDING = "PENDING"
    SENDING = "SENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class DeliveryState(OutboundState):
    pass


class Association(Base):
    """One inbound DICOM association: who called, from where, when."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(255))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    end_reason: Mapped[str | None] = mapped_column(String(32))


class CompletedBy:
    """Which rule decided that a study revision was complete (``worker.assemble.completion``)."""

    ASSOCIATION = "association"
    QUIET = "quiet"
    MAX_WAIT = "max_wait"


class Study(Base):
    """A study as Pleura sees it; ``revision`` grows when instances arrive after queueing."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    #: when the current revision began to arrive (the first instance, or the one that reopened it)
    receiving_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str | None] = mapped_column(Text)
    #: when retention removed the bytes of its instances and results (worker.storage.retention)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: :func:`worker.reports.accession_key` of its Accession Number (the number itself is not kept)
    accession_sha256: Mapped[str | None] = mapped_column(String(64), index=True)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class StudyArrival(Base):
    """Which association carried new instances of which study revision, and when the last came.

    The completion rule reads it: a revision whose every carrying association ended with an
    A-RELEASE is complete a settle time after its last instance.
    """

    __tablename__ = "study_arrivals"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_id: Mapped[int] = mapped_column(ForeignKey("associations.id"), primary_key=True)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Blob(Base):
    """Bytes kept in the ledger's own database (``PLEURA_STORAGE=database``, worker.storage),
    reachable from every host: in :class:`BlobChunk` rows, or (those kept before migration 0008)
    one PostgreSQL large object, ``lo_oid``. ``key`` names what they are: ``sha256:<hex>`` an
    instance's encoded bytes (its ``sha256``), ``sop:<UID>`` a result object.
    ``purged_at``: the bytes were removed (retention); the row stays for the audit."""

    __tablename__ = "blobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(80), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    lo_oid: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BlobChunk(Base):
    """The ``n``-th piece (from 0) of a blob's bytes, stored uncompressed in the row (STORAGE PLAIN)."""

    __tablename__ = "blob_chunks"

    blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id", ondelete="CASCADE"), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Instance(Base):
    """One received SOP instance and where its encoded bytes lie in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    spool_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    times_received: Mapped[int] = mapped_column(Integer, default=1)
    ineligible_reason: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    """Processing of one study revision with one model; claimed by a worker with a lease."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    bundle_name: Mapped[str | None] = mapped_column(String(128))
    bundle_version: Mapped[str | None] = mapped_column(String(64))
    backend: Mapped[str | None] = mapped_column(String(128))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    #: the :class:`CompletedBy` rule that queued this revision
    completed_by: Mapped[str | None] = mapped_column(String(16))

    study: Mapped[Study] = relationship(back_populates="jobs")
    findings: Mapped[list[Finding]] = relationship(back_populates="job")
    outputs: Mapped[list[OutputObject]] = relationship(back_populates="job")


class Attempt(Base):
    """One try at a job by one worker; an attempt without ``finished_at`` died mid-way."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)


class Finding(Base):
    """One model output: a finding's probability on one image, with its operating threshold."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    finding: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool]

    job: Mapped[Job] = relationship(back_populates="findings")


#: ``output_objects.kind``: the study revision's SR, one SC per image, the SR of a study not analysed
SR_KIND, SC_KIND, NOT_ANALYSED_KIND = "SR", "SC", "SR-NA"


class OutputObject(Base):
    """An SR or SC that Pleura produced, stored in the outbox until delivered."""

    __tablename__ = "output_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    source_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    predecessor_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="outputs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="output")


class Delivery(Base):
    """Sending one output object to one destination, with retries and the final status."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("output_object_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_object_id: Mapped[int] = mapped_column(ForeignKey("output_objects.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    peer_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)

    output: Mapped[OutputObject] = relationship(back_populates="deliveries")


class NotificationState(OutboundState):
    """``WAITING`` until the result's SR is delivered (or every SR delivery ended), then as a delivery."""

    WAITING = "WAITING"


class Notification(Base):
    """One analysed result (a job) told to one RIS destination: an HL7 v2 ORU over MLLP or a FHIR
    transaction Bundle (worker.notify), with retries, the peer's answer and the final state.

    ``control_id`` is the message's identity (MSH-10, the Bundle's identifier): the same on every
    resend of this result, so a resend is recognisably the same message.
    """

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("job_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    #: the result's SR: its delivery releases the notification, its header gives patient and study
    sr_output_id: Mapped[int] = mapped_column(ForeignKey("output_objects.id"))
    protocol: Mapped[str] = mapped_column(String(8))
    destination: Mapped[str] = mapped_column(String(300))
    control_id: Mapped[str] = mapped_column(String(20))
    #: a triage finding (PLEURA_TRIAGE_FINDINGS) is positive: the study is flagged
    triage: Mapped[bool]
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: the acknowledgment code (AA, AE, AR) or HTTP status the peer answered, as text
    peer_answer: Mapped[str | None] = mapped_column(String(16))
    #: the peer's own text (MSA-3/ERR, the OperationOutcome) or what went wrong on the way
    last_error: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship()


class ReportStatus:
    """A final report's status as the RIS gave it (HL7 OBR-25 P/F/C, FHIR DiagnosticReport.status)."""

    PRELIMINARY = "preliminary"
    FINAL = "final"
    CORRECTED = "corrected"


class Report(Base):
    """A radiology report received from the RIS (HL7 v2 ORU^R01 over MLLP, or a FHIR DiagnosticReport),
    matched to its study by Accession Number or Study Instance UID (``study_id`` stays NULL until the
    study arrives), with the labels its text gave (worker.reports).

    A later report of the same study (a final after a preliminary, a correction) sets
    ``superseded_at`` on the earlier ones: the study's labels are those of its newest report.
    """

    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("source", "message_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: ``hl7`` or ``fhir``
    source: Mapped[str] = mapped_column(String(8))
    #: who sent it: the peer's address (MLLP) or the HTTP client's
    sender: Mapped[str] = mapped_column(String(300))
    #: MSH-10 or the DiagnosticReport's id: a resend of the same message is recognised, not stored twice
    message_id: Mapped[str] = mapped_column(String(200))
    accession_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    #: the report's text (conclusion or findings and impression): clinical data, never logged
    text: Mapped[str] = mapped_column(Text)
    #: JSON: finding -> ``present`` / ``absent`` / ``uncertain`` / null (not mentioned)
    labels: Mapped[str] = mapped_column(Text)
    #: which labeler gave the labels (its name and version)
    labeler: Mapped[str] = mapped_column(String(64))
    #: when the report was written (OBR-22 / DiagnosticReport.issued), if the RIS said
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    matched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Event(Base):
    """Append-only trail of everything that happened; never updated or deleted."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    detail: Mapped[str | None] = mapped_column(Text)


class Embedding(Base):
    """One image's embedding from one bundle version: unit-length float32 bytes (cosine = dot).

    A re-run of the instance with the same bundle version replaces the row. On PostgreSQL with
    pgvector, migration 0002 adds a ``pgvec`` column (not mapped here) that the archive fills.
    """

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("instance_id", "bundle_name", "bundle_version"),
        Index("ix_embeddings_bundle", "bundle_name", "bundle_version", "dim"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
