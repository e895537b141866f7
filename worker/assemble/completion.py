"""When a study revision is complete, decided from the ledger alone (so a restart changes nothing).

In order, the first rule that holds names the completion (``jobs.completed_by``):

- ``association``: every association that carried new instances of the revision ended with an
  A-RELEASE (none is open, none aborted) and ``settle_seconds`` passed since its last instance.
  A chest X-ray study nearly always arrives whole over one association; the settle time covers
  a sender that opens the next association right after the last (one per series, say).
- ``quiet``: no instance for ``quiet_seconds``. It decides whenever the first does not: an
  aborted association, one still open (a sender keeping it for hours), instances over another
  association or from another listener process still coming.
- ``max_wait``: the revision has been arriving for ``max_wait_seconds``, for a study that never
  stops growing. Late instances, as ever, open the next revision.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select

from dicom_node.filing import RELEASED
from worker.ledger import Association, Study, StudyArrival
from worker.ledger.models import CompletedBy


@dataclass(frozen=True)
class Completion:
    """The completion settings; ``settle_seconds`` or ``max_wait_seconds`` None turn that rule off."""

    quiet_seconds: float
    settle_seconds: float | None = None
    max_wait_seconds: float | None = None

    def rules(self, now: datetime) -> Iterator[tuple[str, ColumnElement[bool]]]:
        """(rule name, SQL condition on ``studies``) in the order they are tried."""
        if self.settle_seconds is not None:
            yield CompletedBy.ASSOCIATION, _released(now - timedelta(seconds=self.settle_seconds))
        yield CompletedBy.QUIET, Study.last_received_at < now - timedelta(seconds=self.quiet_seconds)
        if self.max_wait_seconds is not None:
            since = func.coalesce(Study.receiving_since, Study.first_received_at)
            yield CompletedBy.MAX_WAIT, since < now - timedelta(seconds=self.max_wait_seconds)


def _released(settled_before: datetime) -> ColumnElement[bool]:
    this_revision = and_(StudyArrival.study_id == Study.id, StudyArrival.revision == Study.revision)
    carried = select(StudyArrival.association_id).where(this_revision)
    not_released = (select(StudyArrival.association_id)
                    .join(Association, Association.id == StudyArrival.association_id)
                    .where(this_revision, or_(Association.ended_at.is_(None), Association.end_reason != RELEASED)))
    return and_(Study.last_received_at < settled_before, carried.exists(), ~not_released.exists())
