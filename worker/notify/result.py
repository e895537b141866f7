"""What a notification says: one analysed result (a job) with its patient, study and findings.

Patient and study come from the header of the study's first analysed instance (worker.storage;
the ledger holds no patient data); findings are the job's, one per finding for the study
(the highest probability over its images, positive when any image is).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from engines import Bundle
from worker.ledger import Finding, Instance, Job
from worker.ledger.db import as_utc
from worker.storage import Storage, instance_key
from worker.storage.base import fetched

#: OBX-8 / Observation.interpretation: a positive triage finding, another positive, a negative
CRITICAL, ABNORMAL, NORMAL = "AA", "A", "N"


def triage_names(triage_findings: list[str] | None, bundle: Bundle) -> frozenset[str]:
    """The findings that flag a study: the site's list, else those the bundle's manifest marks."""
    if triage_findings is not None:
        return frozenset(triage_findings)
    return frozenset(f.name for f in bundle.reported_findings if f.triage)


def check_triage(triage_findings: list[str] | None, bundle: Bundle) -> None:
    """Refuse (ValueError) a triage list naming findings the bundle does not report."""
    known = {f.name for f in bundle.reported_findings}
    unknown = sorted(set(triage_findings or ()) - known)
    if unknown:
        raise ValueError(f"PLEURA_TRIAGE_FINDINGS names {', '.join(unknown)}, which bundle {bundle.name} "
                         f"{bundle.version} does not report; its findings are {', '.join(sorted(known))}")


def control_id(sr_sop_instance_uid: str) -> str:
    """The message's identity (MSH-10, at most 20 characters): derived from the result's SR, so
    every resend of the same result carries the same one and another result never does."""
    return hashlib.sha256(f"pleura-notify|{sr_sop_instance_uid}".encode()).hexdigest()[:20].upper()


def report_id(study_instance_uid: str, bundle_name: str) -> str:
    """The result's filler order number (OBR-3) and FHIR identifier: the same for every revision
    of the study with this model, so a revision replaces the earlier result at the RIS."""
    return hashlib.sha256(f"pleura-report|{study_instance_uid}|{bundle_name}".encode()).hexdigest()[:20].upper()


@dataclass(frozen=True)
class FindingOutcome:
    name: str
    code_value: str
    code_scheme: str
    code_meaning: str
    probability: float
    threshold: float
    positive: bool
    triage: bool

    @property
    def flag(self) -> str:
        return (CRITICAL if self.triage else ABNORMAL) if self.positive else NORMAL


@dataclass(frozen=True)
class Patient:
    id: str
    issuer: str
    name: str  # DICOM PN: family^given^middle^prefix^suffix
    birth_date: str
    sex: str


@dataclass(frozen=True)
class Procedure:
    code_value: str
    code_scheme: str
    code_meaning: str


@dataclass(frozen=True)
class StudyResult:
    control_id: str
    report_id: str
    revision: int
    study_instance_uid: str
    accession_number: str
    study_datetime: str  # DICOM DA + TM (HHMMSS), or the date alone, or ""
    procedure: Procedure | None
    study_description: str
    patient: Patient
    model_name: str
    model_version: str
    result_at: datetime
    findings: tuple[FindingOutcome, ...]

    @property
    def triage_positive(self) -> bool:
        return any(f.flag == CRITICAL for f in self.findings)


def study_findings(s: Session, job_id: int, bundle: Bundle, triage: frozenset[str]) -> tuple[FindingOutcome, ...]:
    """One outcome per finding of the job, in the bundle's order."""
    rows = s.query(Finding).filter(Finding.job_id == job_id).all()
    outcomes = []
    for spec in bundle.reported_findings:
        mine = [r for r in rows if r.finding == spec.name]
        if mine:
            outcomes.append(FindingOutcome(
                spec.name, spec.code_value, spec.code_scheme, spec.code_meaning,
                max(r.probability for r in mine), mine[0].threshold, any(r.positive for r in mine),
                spec.name in triage))
    return tuple(outcomes)


def load(s: Session, job: Job, control: str, bundle: Bundle, triage: frozenset[str], storage: Storage) -> StudyResult:
    """The result of ``job`` as the messages tell it; OSError/ValueError when its source is unreadable."""
    findings = study_findings(s, job.id, bundle, triage)
    analysed = {r.instance_id for r in s.query(Finding.instance_id).filter(Finding.job_id == job.id)}
    source = s.query(Instance).filter(Instance.id.in_(analysed)).order_by(Instance.id).first()
    if source is None:
        raise ValueError(f"job {job.id} has no analysed image")
    with fetched(storage, instance_key(source.sha256), source.spool_path) as path:
        ds = dcmread(path, stop_before_pixels=True)
    assert job.finished_at is not None
    return StudyResult(
        control_id=control,
        report_id=report_id(job.study.study_instance_uid, bundle.name),
        revision=job.revision,
        study_instance_uid=job.study.study_instance_uid,
        accession_number=_text(ds, "AccessionNumber"),
        study_datetime=_datetime(ds),
        procedure=_procedure(ds),
        study_description=_text(ds, "StudyDescription"),
        patient=Patient(_text(ds, "PatientID"), _text(ds, "IssuerOfPatientID"), _text(ds, "PatientName"),
                        _text(ds, "PatientBirthDate"), _text(ds, "PatientSex")),
        model_name=bundle.name,
        model_version=bundle.version,
        result_at=as_utc(job.finished_at),
        findings=findings,
    )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _datetime(ds: Dataset) -> str:
    date, time = _text(ds, "StudyDate"), _text(ds, "StudyTime").replace(":", "").split(".")[0]
    if len(date) != 8 or not date.isdigit():
        return ""
    return date + (time[:6] if time.isdigit() and len(time) in (2, 4, 6) else "")


def _procedure(ds: Dataset) -> Procedure | None:
    """The study's procedure code: Procedure Code, else Requested Procedure Code (first item)."""
    for keyword in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence"):
        items = ds.get(keyword) or []
        if items and items[0].get("CodeValue") and items[0].get("CodingSchemeDesignator"):
            item = items[0]
            return Procedure(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.get("CodeMeaning", "")))
    return None
