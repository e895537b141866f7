"""Audit role, first view: recent studies with state, timings, findings and deliveries."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.ledger import Association, Delivery, Finding, Instance, Job, OutputObject, Study
from worker.ledger.db import Ledger, as_utc
from worker.ledger.models import DeliveryState


def recent_studies(ledger: Ledger, limit: int = 20) -> list[dict[str, Any]]:
    """One dict per study, newest first (plain values, ready for JSON)."""
    with ledger.session() as s:
        studies = s.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)).all()
        return [_describe(s, study) for study in studies]


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value else None


def _describe(s: Session, study: Study) -> dict[str, Any]:
    instances = s.scalars(select(Instance).where(Instance.study_id == study.id)).all()
    calling = sorted(
        set(s.scalars(select(Association.calling_ae).join(Instance, Instance.association_id == Association.id)
                      .where(Instance.study_id == study.id)).all())
    )
    job = s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.revision.desc())).first()
    info: dict[str, Any] = {
        "study_instance_uid": study.study_instance_uid,
        "state": study.state,
        "revision": study.revision,
        "instances": len(instances),
        "calling_ae": calling,
        "first_received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
        "note": study.note,
        "ineligible": {i.sop_instance_uid: i.ineligible_reason for i in instances if i.ineligible_reason},
        "job": None,
        "positive_findings": [],
        "deliveries": {},
        "failed_deliveries": [],
        "delivered_at": None,
        "seconds_to_result": None,
    }
    if job is None:
        return info
    info["job"] = {
        "id": job.id, "revision": job.revision, "state": job.state, "attempts": job.attempts,
        "model": f"{job.bundle_name} {job.bundle_version}" if job.bundle_name else None,
        "backend": job.backend, "error": job.error,
    }
    findings = s.scalars(select(Finding).where(Finding.job_id == job.id)).all()
    info["positive_findings"] = sorted({f.finding for f in findings if f.positive})
    deliveries = s.scalars(
        select(Delivery).join(OutputObject).where(OutputObject.job_id == job.id)
    ).all()
    info["deliveries"] = dict(Counter(d.state for d in deliveries))
    info["failed_deliveries"] = [
        {"destination": d.destination, "object": d.output.kind, "attempts": d.attempts, "error": d.last_error}
        for d in deliveries if d.state == DeliveryState.FAILED
    ]
    delivered = [as_utc(d.delivered_at) for d in deliveries if d.delivered_at]
    if delivered and all(d.delivered_at for d in deliveries):
        info["delivered_at"] = max(delivered).isoformat()
        info["seconds_to_result"] = round((max(delivered) - as_utc(study.last_received_at)).total_seconds(), 1)
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    """Human-readable lines for ``pleura status``."""
    if not rows:
        return "no studies received yet"
    lines = []
    for r in rows:
        job = r["job"] or {}
        deliveries = ", ".join(f"{k} {v}" for k, v in sorted(r["deliveries"].items())) or "-"
        lines.append(
            f"{r['study_instance_uid']}  {r['state']:<10} rev {r['revision']}  "
            f"{r['instances']} inst from {','.join(r['calling_ae']) or '-'}  "
            f"model {job.get('model') or '-'}  positive: {', '.join(r['positive_findings']) or 'none'}  "
            f"deliveries: {deliveries}  time to result: "
            f"{str(r['seconds_to_result']) + ' s' if r['seconds_to_result'] is not None else '-'}"
        )
        if job.get("error"):
            lines.append(f"    error: {job['error']}")
        if r["note"]:
            lines.append(f"    note: {r['note']}")
        for d in r["failed_deliveries"]:
            lines.append(f"    delivery of {d['object']} to {d['destination']} FAILED after {d['attempts']} "
                         f"attempts: {d['error']}")
        for sop, reason in r["ineligible"].items():
            lines.append(f"    skipped {sop}: {reason}")
    return "\n".join(lines)
