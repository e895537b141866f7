"""The ledger: SQLAlchemy models that are the audit trail and every study's source of truth."""

from worker.ledger.models import (
    Association,
    Attempt,
    Base,
    Blob,
    BlobChunk,
    Delivery,
    Embedding,
    Event,
    Finding,
    Instance,
    Job,
    Notification,
    OutputObject,
    Report,
    Study,
    StudyArrival,
)

__all__ = [
    "Association",
    "Attempt",
    "Base",
    "Blob",
    "BlobChunk",
    "Delivery",
    "Embedding",
    "Event",
    "Finding",
    "Instance",
    "Job",
    "Notification",
    "OutputObject",
    "Report",
    "Study",
    "StudyArrival",
]
