"""Appending to the event trail (the only way rows get into ``events``)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from worker.ledger.db import utcnow
from worker.ledger.models import Event


def record(
    session: Session,
    kind: str,
    *,
    study_id: int | None = None,
    job_id: int | None = None,
    **detail: Any,
) -> None:
    """Add one event; ``detail`` must hold no patient identifiers."""
    session.add(
        Event(
            at=utcnow(),
            kind=kind,
            study_id=study_id,
            job_id=job_id,
            detail=json.dumps(detail, default=str, sort_keys=True) if detail else None,
        )
    )
