"""HL7 v2.5.1 ``ORU^R01`` for one result, and the acknowledgment that answers it (docs/hl7.md).

Messages are UTF-8 (MSH-18 ``UNICODE UTF-8``), segments end with CR, and every value is
escaped (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``). The same result always gives the same bytes: the
message time is the result's, not the sending's, so a resend is the same message.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.valuerep import PersonName

from worker.notify.result import StudyResult

VERSION = "2.5.1"
SENDING_APPLICATION = "PLEURA"
#: NTE-3 under the OBR: what the result is and is not
DISCLAIMER = ("AI triage result from {model} {version}: preliminary, not for primary diagnosis; "
              "a radiologist reads the study.")
#: MSA-1 codes (original and enhanced mode) and what Pleura makes of them
ACCEPTED, RETRY, REFUSED = frozenset({"AA", "CA"}), frozenset({"AE", "CE"}), frozenset({"AR", "CR"})


def escape(value: str) -> str:
    """A value with HL7's delimiters escaped; line breaks become spaces (a CR ends a segment)."""
    out = value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
    return out.replace("~", "\\R\\").replace("\r", " ").replace("\n", " ")


def _components(*values: str) -> str:
    return "^".join(escape(v) for v in values).rstrip("^")


def _segment(name: str, *fields: str) -> str:
    return "|".join((name, *fields)).rstrip("|")


def _dtm(result: StudyResult) -> str:
    return result.result_at.strftime("%Y%m%d%H%M%S") + "+0000"


def _name(pn: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) as XPN (family^given^middle^suffix^prefix)."""
    name = PersonName(pn)
    return _components(name.family_name, name.given_name, name.middle_name, name.name_suffix, name.name_prefix)


def _sex(value: str) -> str:
    return value if value in ("M", "F", "O") else "U"


def oru(result: StudyResult, sending_facility: str) -> bytes:
    """The ORU^R01 message for ``result`` (segments separated by CR), UTF-8 encoded."""
    p, when = result.patient, _dtm(result)
    filler = f"{result.report_id}^{SENDING_APPLICATION}"
    patient_id = escape(p.id) + (f"^^^{escape(p.issuer)}" if p.issuer else "")
    if result.procedure is not None:
        service = _components(result.procedure.code_value, result.procedure.code_meaning,
                              result.procedure.code_scheme)
    else:
        service = _components("", result.study_description or "Chest X-ray")
    segments = [
        "MSH|^~\\&|" + "|".join([SENDING_APPLICATION, escape(sending_facility), "", "", when, "",
                                 "ORU^R01^ORU_R01", result.control_id, "P", VERSION, "", "", "", "", "",
                                 "UNICODE UTF-8"]),
        _segment("PID", "1", "", patient_id, "", _name(p.name), "", escape(p.birth_date), _sex(p.sex)),
        _segment("ORC", "RE", escape(result.accession_number), filler),
        _segment("OBR", "1", escape(result.accession_number), filler, service, "", "", result.study_datetime,
                 *[""] * 10, escape(result.accession_number), "", "", "", when, "", "RAD", "P"),
        _segment("NTE", "1", "L", escape(DISCLAIMER.format(model=result.model_name, version=result.model_version))),
    ]
    observations = [("ST", "110180^Study Instance UID^DCM", escape(result.study_instance_uid), "", "", "")]
    for f in result.findings:
        observations.append(("NM", _components(f.code_value, f.code_meaning, f.code_scheme), f"{f.probability:.4f}",
                             "1^^UCUM", f"<{f.threshold:.4f}", f.flag))
    observations.append(("ST", "111001^Algorithm Name^DCM", escape(result.model_name), "", "", ""))
    observations.append(("ST", "111003^Algorithm Version^DCM", escape(result.model_version), "", "", ""))
    for set_id, (kind, code, value, units, reference, flag) in enumerate(observations, start=1):
        segments.append(_segment("OBX", str(set_id), kind, code, "", value, units, reference, flag, "", "", "P",
                                 "", "", when))
    return ("\r".join(segments) + "\r").encode("utf-8")


@dataclass(frozen=True)
class Ack:
    """The peer's acknowledgment: MSA-1 code, and its text (MSA-3 and the ERR segments)."""

    code: str
    text: str


class AckError(ValueError):
    """The peer's answer is not an acknowledgment of our message."""


def parse_ack(frame: bytes, control_id: str) -> Ack:
    """Read the ACK in an MLLP frame's payload; AckError when it is not one for ``control_id``."""
    text = frame.decode("utf-8", errors="replace")
    segments = [s for s in text.replace("\n", "\r").split("\r") if s.strip()]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise AckError(f"the answer is not an HL7 message (it starts {text[:20]!r})")
    sep = segments[0][3]
    msa = next((s.split(sep) for s in segments if s.startswith("MSA" + sep)), None)
    if msa is None or len(msa) < 3:
        raise AckError("the answer has no MSA segment with a code and a message control ID")
    if msa[2] != control_id:
        raise AckError(f"the answer acknowledges message {msa[2][:40]!r}, not ours ({control_id})")
    words = [msa[3]] if len(msa) > 3 and msa[3] else []
    for err in (s.split(sep) for s in segments if s.startswith("ERR" + sep)):
        words += [v for i, v in enumerate(err) if i in (3, 8) and v]  # ERR-3 error code, ERR-8 user message
    return Ack(msa[1], "; ".join(words)[:1000])
