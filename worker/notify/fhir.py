"""FHIR R4 transaction Bundle for one result, and POSTing it to a FHIR server (docs/hl7.md).

The Bundle holds a Device (the model), one Observation per finding and a DiagnosticReport
(status ``preliminary``). Each is a conditional update on its own identifier, stable across
resends and across the study's revisions: a resend changes nothing, a revision replaces the
earlier result. The Bundle's own identifier is the result's control ID (as MSH-10).
"""

from __future__ import annotations

import http.client
import json
import ssl
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from worker.notify.result import ABNORMAL, CRITICAL, NORMAL, StudyResult

SYSTEM = "urn:pleura"  # our identifier systems: urn:pleura:report, urn:pleura:observation, ...
_SCHEMES = {"SCT": "http://snomed.info/sct", "LN": "http://loinc.org", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
            "RADLEX": "http://radlex.org", "RID": "http://radlex.org"}
_INTERPRETATION = {CRITICAL: "Critical abnormal", ABNORMAL: "Abnormal", NORMAL: "Normal"}
_NAMESPACE = uuid.UUID("6f1d3c0e-3b5e-4a57-9a8e-6c1e5d0b7a21")


def _system(scheme: str) -> str:
    return _SCHEMES.get(scheme.upper(), f"urn:pleura:coding-scheme:{scheme}")


def _instant(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _date_time(dicom: str) -> str | None:
    """The study date as a FHIR date: DICOM's time has no zone, and a FHIR time must have one."""
    return f"{dicom[:4]}-{dicom[4:6]}-{dicom[6:8]}" if len(dicom) >= 8 else None


def _entry(kind: str, identifier: str, resource: dict) -> dict:
    system = f"{SYSTEM}:{kind.lower()}"
    full_url = f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{system}|{identifier}')}"
    resource = {"resourceType": kind, "identifier": [{"system": system, "value": identifier}], **resource}
    return {"fullUrl": full_url, "resource": resource,
            "request": {"method": "PUT", "url": f"{kind}?identifier={system}|{identifier}"}}


def bundle(result: StudyResult) -> dict:
    """The transaction Bundle (a JSON-ready dict) for ``result``."""
    p = result.patient
    subject = {"type": "Patient", "identifier": {"value": p.id}}
    if p.issuer:
        subject["identifier"]["assigner"] = {"display": p.issuer}
    study = {"type": "ImagingStudy",
             "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_instance_uid}"}}
    issued, effective = _instant(result.result_at), _date_time(result.study_datetime)
    model_id = f"{result.model_name}|{result.model_version}"
    device = _entry("Device", model_id, {
        "deviceName": [{"name": result.model_name, "type": "model-name"}],
        "version": [{"value": result.model_version}],
        "manufacturer": "Pleura",
        "type": {"text": "AI model (chest X-ray triage)"},
    })
    observations = []
    for f in result.findings:
        observations.append(_entry("Observation", f"{result.report_id}-{f.code_scheme}-{f.code_value}", {
            "status": "preliminary",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "imaging", "display": "Imaging"}]}],
            "code": {"coding": [{"system": _system(f.code_scheme), "code": f.code_value, "display": f.code_meaning}],
                     "text": f.name},
            "subject": subject,
            **({"effectiveDateTime": effective} if effective else {}),
            "issued": issued,
            "valueQuantity": {"value": round(f.probability, 4), "unit": "probability",
                              "system": "http://unitsofmeasure.org", "code": "1"},
            "interpretation": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                "code": f.flag, "display": _INTERPRETATION[f.flag]}]}],
            "referenceRange": [{"high": {"value": round(f.threshold, 4), "unit": "probability",
                                         "system": "http://unitsofmeasure.org", "code": "1"},
                                "text": "below the model's operating threshold"}],
            "derivedFrom": [study],
            "device": {"reference": device["fullUrl"]},
        }))
    flagged = [f.name for f in result.findings if f.flag == CRITICAL]
    report = _entry("DiagnosticReport", result.report_id, {
        "basedOn": [{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": result.accession_number}}] if result.accession_number else [],
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "AI triage of a chest X-ray"},
        "subject": subject,
        **({"effectiveDateTime": effective} if effective else {}),
        "issued": issued,
        "imagingStudy": [study],
        "result": [{"reference": o["fullUrl"]} for o in observations],
        "conclusion": (f"Triage: {', '.join(flagged)} positive. " if flagged else "Triage: no triage finding. ")
        + f"AI output of {result.model_name} {result.model_version}, preliminary, not for primary diagnosis.",
    })
    if not report["resource"]["basedOn"]:
        del report["resource"]["basedOn"]
    return {"resourceType": "Bundle", "type": "transaction",
            "identifier": {"system": f"{SYSTEM}:notification", "value": result.control_id},
            "timestamp": issued, "entry": [device, *observations, report]}


@dataclass(frozen=True)
class Response:
    status: int
    text: str  # the OperationOutcome's diagnostics, or the body's start


def post(base_url: str, body: bytes, timeout: float, tls: ssl.SSLContext | None,
         token_file: Path | None) -> Response:
    """POST a transaction Bundle to the server's base URL; OSError/HTTPException on the way there."""
    parts = urlsplit(base_url)
    headers = {"Content-Type": "application/fhir+json; fhir-version=4.0", "Accept": "application/fhir+json"}
    if token_file is not None:
        headers["Authorization"] = "Bearer " + token_file.read_text().strip()
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path or "/", body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read(1 << 20)
    finally:
        conn.close()
    return Response(answer.status, _outcome_text(data) or answer.reason)


def _outcome_text(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        return data[:300].decode("utf-8", errors="replace")
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        return "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
                         for i in doc.get("issue", []))[:1000]
    return ""
