"""The study labels the final reports give: what :mod:`worker.monitor` and ``pleura heads train
--labels-from-reports`` compare the model with.

A study's labels are those of its current report: the newest matched report that no later one
superseded, with status final or corrected (a preliminary report is not the radiologist's last word).
"""

from __future__ import annotations

import json
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.ledger.models import Report, ReportStatus

Uncertain = Literal["exclude", "positive", "negative"]
COUNTED = (ReportStatus.FINAL, ReportStatus.CORRECTED)


def current_labels(s: Session) -> dict[int, dict[str, str | None]]:
    """Study id -> its current report's labels (finding -> present / absent / uncertain / None)."""
    rows = s.execute(
        select(Report.study_id, Report.labels)
        .where(Report.study_id.is_not(None), Report.superseded_at.is_(None), Report.status.in_(COUNTED))
        .order_by(Report.study_id, Report.id)
    ).all()
    return {study_id: json.loads(labels) for study_id, labels in rows}  # the newest per study wins


def truth(label: str | None, uncertain: Uncertain = "exclude") -> bool | None:
    """A label as ground truth: present True; absent or not mentioned False; uncertain as ``uncertain`` says
    (None: left out)."""
    if label == "uncertain":
        return None if uncertain == "exclude" else uncertain == "positive"
    return label == "present"


def finding_label(labels: dict[str, str | None], finding: str) -> str | None:
    """The label of ``finding``; a head's finding ``NAME (head)`` takes the label of NAME."""
    if finding in labels:
        return labels[finding]
    return labels.get(finding.removesuffix(" (head)"))
