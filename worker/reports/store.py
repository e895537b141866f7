"""Recording received reports and matching them to their studies.

A report is matched by Study Instance UID (exact), else by Accession Number (its
:func:`worker.reports.accession_key`; the first study received with it). One that matches no
study yet is kept with ``study_id`` NULL; :func:`match_pending` (run by every sweep) matches it
when its study arrives. Once a study has several reports, the newest stays current and the others
get ``superseded_at``: newest by status (a preliminary never supersedes a final or corrected
report), then by report time (OBR-22, ``issued``; the arrival time when the RIS gave none), then
by arrival. Events (``report_received``, ``report_matched``, ``report_resent``,
``report_refused``) carry ids, codes and reasons, never report text or accession numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.ledger.accession import accession_key
from worker.ledger.db import Ledger, as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import Report, ReportStatus, Study
from worker.reports.labeler import LABELS, Labeler, load
from worker.settings import Settings

log = structlog.get_logger(__name__)

#: The 14 NIH ChestX-ray14 labels, as that data set spells them.
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
_STATUS_RANK = {ReportStatus.PRELIMINARY: 0, ReportStatus.FINAL: 1, ReportStatus.CORRECTED: 1}


@dataclass(frozen=True)
class IncomingReport:
    """A report as a way in (HL7, FHIR) read it; it names an accession number, a study UID or both."""

    source: str
    sender: str
    message_id: str
    status: str
    text: str
    accession_number: str | None
    study_instance_uid: str | None
    reported_at: datetime | None


@dataclass(frozen=True)
class Stored:
    """What :func:`store` did: ``created`` False for a resend of a report already stored."""

    report_id: int
    created: bool
    study_id: int | None


class ReportConflict(ValueError):
    """A message id already stored with different content."""


@dataclass(frozen=True)
class Intake:
    """What both ways in share: the ledger, the labeler and the findings it labels."""

    ledger: Ledger
    labeler: Labeler
    findings: tuple[str, ...]

    def store(self, report: IncomingReport) -> Stored:
        return store(self.ledger, report, self.labeler, self.findings)

    def refuse(self, source: str, sender: str, reason: str, message_id: str | None = None, **detail: object) -> None:
        """Record a report refused (``report_refused``); a ledger outage is logged, not raised."""
        try:
            with self.ledger.session() as s:
                record(s, "report_refused", source=source, sender=sender[:300], reason=reason,
                       message_id=message_id, **detail)
        except Exception as exc:
            log.error("report refusal not recorded", source=source, error=type(exc).__name__)


def label_findings(settings: Settings) -> tuple[str, ...]:
    """The findings every report is labelled for: the configured bundle's reported findings (a head's
    ``NAME (head)`` as NAME), the NIH ChestX-ray14 labels and ``Abnormal``, each once."""
    from engines import BundleError
    from worker.bundles.catalogue import bundle

    try:
        names = [f.name.removesuffix(" (head)") for f in bundle(settings, settings.model).reported_findings]
    except (BundleError, OSError, ValueError) as exc:
        log.warning("reports labelled without the model's findings: its bundle did not load", error=str(exc))
        names = []
    return tuple(dict.fromkeys([*names, *NIH_FINDINGS, "Abnormal"]))


def open_intake(settings: Settings, ledger: Ledger) -> Intake:
    """The intake of this process: ``PLEURA_REPORT_LABELER`` (or the default) and :func:`label_findings`."""
    return Intake(ledger, load(settings.report_labeler), label_findings(settings))


def store(ledger: Ledger, report: IncomingReport, labeler: Labeler, findings: Sequence[str]) -> Stored:
    """Record ``report`` with its labels and match it, in one transaction; a resend (same source and
    message id, same content) is recognised and stored once. ReportConflict: same id, other content."""
    labels = json.dumps(_labels(labeler, report.text, findings))
    try:
        with ledger.session() as s:
            return _store(s, report, labels, labeler.name)
    except IntegrityError:  # a copy sent at the same time won the unique (source, message_id): it is there now
        with ledger.session() as s:
            return _store(s, report, labels, labeler.name)


def match_pending(ledger: Ledger) -> list[int]:
    """Match the reports waiting for a study that has arrived since; their ids."""
    with ledger.session() as s:
        pending = s.scalars(select(Report.id).where(Report.study_id.is_(None), or_(
            Report.study_instance_uid.in_(select(Study.study_instance_uid)),
            Report.accession_sha256.in_(select(Study.accession_sha256).where(Study.accession_sha256.is_not(None))),
        )).order_by(Report.id)).all()
    matched = []
    for report_id in pending:
        with ledger.session() as s:
            report = s.get(Report, report_id, with_for_update=True)
            if report is not None and report.study_id is None and _match(s, report):
                matched.append(report_id)
    if matched:
        log.info("reports matched to studies", reports=matched)
    return matched


def _labels(labeler: Labeler, text: str, findings: Sequence[str]) -> dict[str, str | None]:
    given = labeler.label(text, findings)
    labels = {f: given.get(f) for f in findings}
    wrong = sorted(f for f, label in labels.items() if label is not None and label not in LABELS)
    if wrong:
        raise ValueError(f"labeler {labeler.name} gave labels outside {LABELS} for {wrong}")
    return labels


def _store(s: Session, report: IncomingReport, labels: str, labeler: str) -> Stored:
    accession = accession_key(report.accession_number) if report.accession_number else None
    existing = s.scalars(select(Report).where(Report.source == report.source,
                                              Report.message_id == report.message_id)).one_or_none()
    if existing is not None:
        same = (existing.status, existing.text, existing.accession_sha256, existing.study_instance_uid) == (
            report.status, report.text, accession, report.study_instance_uid)
        if not same:
            raise ReportConflict(f"message {report.message_id} was received before with other content "
                                 f"(report {existing.id}); a new or corrected report needs a new message id")
        record(s, "report_resent", study_id=existing.study_id, report_id=existing.id, source=report.source,
               message_id=report.message_id)
        return Stored(existing.id, False, existing.study_id)
    row = Report(source=report.source, sender=report.sender[:300], message_id=report.message_id,
                 accession_sha256=accession, study_instance_uid=report.study_instance_uid, status=report.status,
                 text=report.text, labels=labels, labeler=labeler[:64], reported_at=report.reported_at,
                 received_at=utcnow())
    s.add(row)
    s.flush()
    record(s, "report_received", report_id=row.id, source=report.source, sender=row.sender,
           message_id=report.message_id, status=report.status, accession=accession is not None,
           study_instance_uid=report.study_instance_uid is not None)
    _match(s, row)
    return Stored(row.id, True, row.study_id)


def _match(s: Session, report: Report) -> bool:
    """Give ``report`` its study if it has arrived (locking the study's row), superseding as needed."""
    study, by = None, None
    if report.study_instance_uid:
        study, by = s.scalars(select(Study).where(Study.study_instance_uid == report.study_instance_uid)
                              .with_for_update()).one_or_none(), "study_instance_uid"
    if study is None and report.accession_sha256:
        study, by = s.scalars(select(Study).where(Study.accession_sha256 == report.accession_sha256)
                              .order_by(Study.id).limit(1).with_for_update()).one_or_none(), "accession"
    if study is None:
        return False
    report.study_id, report.matched_at = study.id, utcnow()
    current = s.scalars(select(Report).where(Report.study_id == study.id, Report.superseded_at.is_(None))).all()
    newest = max(current, key=_recency)
    superseded = [r.id for r in current if r is not newest]
    for r in current:
        if r is not newest:
            r.superseded_at = report.matched_at
    record(s, "report_matched", study_id=study.id, report_id=report.id, by=by, current=newest.id,
           superseded=superseded)
    return True


def _recency(report: Report) -> tuple[int, datetime, int]:
    return _STATUS_RANK[report.status], as_utc(report.reported_at or report.received_at), report.id
