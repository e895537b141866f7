"""``pleura status``: recent studies with state, timings, findings and deliveries."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.cli.common import command
from worker.ledger import Association, Delivery, Finding, Instance, Job, Notification, OutputObject, Study
from worker.ledger.audit import human_seconds
from worker.ledger.db import Ledger, as_utc
from worker.ledger.models import DeliveryState, NotificationState
from worker.settings import Settings


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
        "notifications": [],
    }
    if job is None:
        return info
    info["job"] = {
        "id": job.id, "revision": job.revision, "state": job.state, "attempts": job.attempts,
        "model": f"{job.bundle_name} {job.bundle_version}" if job.bundle_name else None,
        "backend": job.backend, "error": job.error, "completed_by": job.completed_by,
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
    info["notifications"] = [
        {"protocol": n.protocol, "destination": n.destination, "state": n.state, "triage": n.triage,
         "attempts": n.attempts, "peer_answer": n.peer_answer, "error": n.last_error}
        for n in s.scalars(select(Notification).where(Notification.job_id == job.id).order_by(Notification.id))
    ]
    return info


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns for ``pleura status``; what needs a look (errors, notes, deliveries not all
    delivered, skipped images) on indented lines under its study."""
    if not rows:
        return "no studies received yet"

    headers = ["STUDY INSTANCE UID", "STATE", "REV", "IMG", "FROM", "COMPLETED BY", "MODEL", "POSITIVE", "SENT",
               "TIME TO RESULT", "RIS"]
    table = []
    for r in rows:
        sent = r["deliveries"].get(DeliveryState.DELIVERED, 0)
        table.append(([r["study_instance_uid"], r["state"], str(r["revision"]), str(r["instances"]),
                       ",".join(r["calling_ae"]) or "-", (r["job"] or {}).get("completed_by") or "-",
                       (r["job"] or {}).get("model") or "-",
                       ", ".join(r["positive_findings"]) or "none", f"{sent}/{sum(r['deliveries'].values())}",
                       human_seconds(r["seconds_to_result"]), _ris(r["notifications"])], _details(r)))
    widths = [max(len(h), *(len(cells[i]) for cells, _ in table)) for i, h in enumerate(headers)]
    right = {2, 3, 8, 9}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [line(headers)]
    for cells, details in table:
        lines += [line(cells), *(f"    {d}" for d in details)]
    return "\n".join(lines)


def _ris(notifications: list[dict[str, Any]]) -> str:
    """Notifications told / made, and ``flagged`` when the result flags the worklist."""
    if not notifications:
        return "-"
    told = sum(n["state"] == NotificationState.DELIVERED for n in notifications)
    return f"{told}/{len(notifications)}" + (" flagged" if notifications[0]["triage"] else "")


def _details(r: dict[str, Any]) -> list[str]:
    job = r["job"] or {}
    lines = [f"error: {job['error']}"] if job.get("error") else []
    if r["note"]:
        lines.append(f"note: {r['note']}")
    if set(r["deliveries"]) - {DeliveryState.DELIVERED}:
        lines.append("deliveries: " + ", ".join(f"{k} {v}" for k, v in sorted(r["deliveries"].items())))
    for d in r["failed_deliveries"]:
        lines.append(f"delivery of {d['object']} to {d['destination']} FAILED after {d['attempts']} "
                     f"attempts: {d['error']}")
    for n in r["notifications"]:
        if n["state"] != NotificationState.DELIVERED:
            lines.append(f"notification to {n['protocol']} {n['destination']} {n['state']} after {n['attempts']} "
                         f"attempts" + (f": {n['peer_answer'] or ''} {n['error'] or ''}".rstrip() if n["attempts"]
                                        else ""))
    lines += [f"skipped {sop}: {reason}" for sop, reason in r["ineligible"].items()]
    return lines


def cmd_status(settings: Settings, args: argparse.Namespace) -> None:
    rows = recent_studies(Ledger(settings.effective_database_url), args.limit)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``status`` to the ``pleura`` subcommands."""
    p = command(sub, "status", "list recent studies: state, timings, findings, deliveries", cmd_status)
    p.add_argument("--json", action="store_true", help="print the studies as a JSON list")
    p.add_argument("--limit", type=int, default=20, help="newest N studies (default 20)")
