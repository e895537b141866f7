"""HL7 v2 ``ORU^R01`` final reports in, and the acknowledgments that answer them (docs/hl7.md).

One report per message, from the first OBR and the OBX segments after it (up to the next OBR):

- accession number: OBR-18 (placer field 1, where IHE Radiology puts it), else OBR-3 (filler order
  number), else ORC-3; the first component
- Study Instance UID: ZDS-1 (first component), else an OBX of value type RP or ST whose OBX-3 is
  DCM ``110180`` or reads ``Study Instance UID``
- text: OBX-5 of every other OBX of value type TX, FT or ST, repetitions as lines, joined by lines
- status: OBR-25 ``P`` preliminary, ``F`` final, ``C`` corrected
- reported at: OBR-22 (a time without a zone is taken as UTC; an unreadable one is ignored)

Values are unescaped (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\.br\\``). A message is read as UTF-8, or as
ISO 8859-1 where it is not valid UTF-8.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from worker.ledger.models import ReportStatus
from worker.notify.hl7 import escape

VERSION = "2.5.1"
SENDING_APPLICATION = "PLEURA"
STATUSES = {"P": ReportStatus.PRELIMINARY, "F": ReportStatus.FINAL, "C": ReportStatus.CORRECTED}
TEXT_TYPES = ("TX", "FT", "ST")
#: HL7 table 0357 codes given in ERR-3
REQUIRED_MISSING, DATA_TYPE, BAD_VALUE, UNSUPPORTED_TYPE, DUPLICATE, INTERNAL = "101", "102", "103", "200", "205", "207"
_ERROR_NAMES = {REQUIRED_MISSING: "Required field missing", DATA_TYPE: "Data type error",
                BAD_VALUE: "Table value not found", UNSUPPORTED_TYPE: "Unsupported message type",
                DUPLICATE: "Duplicate key identifier", INTERNAL: "Application internal error"}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?([+-]\d{4})?$")


class Hl7Error(ValueError):
    """A message Pleura cannot use: answered ``code`` (AE, AR) with ERR-3 ``error`` and the reason."""

    def __init__(self, reason: str, error: str = REQUIRED_MISSING, code: str = "AE") -> None:
        super().__init__(reason)
        self.reason, self.error, self.code = reason, error, code


@dataclass(frozen=True)
class Header:
    """The MSH values an acknowledgment and the allow-list need."""

    control_id: str
    sending_application: str
    sending_facility: str
    message_type: str
    version: str


@dataclass(frozen=True)
class Hl7Report:
    """What an ORU^R01 says about its report."""

    status: str
    text: str
    accession_number: str | None
    study_instance_uid: str | None
    reported_at: datetime | None


class Message:
    """A message's segments, each a list of raw fields where ``fields[n]`` is SEG-n (MSH too)."""

    def __init__(self, payload: bytes) -> None:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = payload.decode("latin-1")
        lines = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]
        if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
            raise Hl7Error("not an HL7 v2 message: it does not begin with an MSH segment")
        self.field_sep = lines[0][3]
        first = lines[0].split(self.field_sep)
        encoding = first[1][:4] + "^~\\&"[len(first[1][:4]):]  # MSH-2; HL7's defaults for what it leaves out
        self.component_sep, self.repetition_sep, self.escape_char = encoding[0], encoding[1], encoding[2]
        self._escapes = {"F": self.field_sep, "S": self.component_sep, "T": encoding[3], "R": self.repetition_sep,
                         "E": self.escape_char, ".br": "\n"}
        self.segments = [["MSH", self.field_sep, *first[1:]]] + [line.split(self.field_sep) for line in lines[1:]]

    def first(self, name: str) -> list[str] | None:
        return next((s for s in self.segments if s[0] == name), None)

    def value(self, segment: list[str] | None, field: int, component: int = 1) -> str:
        """SEG-field.component of the first repetition, unescaped and stripped ('' when absent)."""
        if segment is None or len(segment) <= field:
            return ""
        parts = segment[field].split(self.repetition_sep)[0].split(self.component_sep)
        return self.unescape(parts[component - 1]).strip() if len(parts) >= component else ""

    def unescape(self, value: str) -> str:
        """``value`` with its escape sequences replaced (unknown ones, e.g. ``\\H\\``, dropped)."""
        e = self.escape_char
        if e not in value:
            return value
        out, i = [], 0
        while i < len(value):
            if value[i] != e:
                j = value.find(e, i)
                j = len(value) if j < 0 else j
                out.append(value[i:j])
                i = j
                continue
            end = value.find(e, i + 1)
            if end < 0:
                out.append(value[i:])
                break
            out.append(self._escapes.get(value[i + 1:end], ""))
            i = end + 1
        return "".join(out)

    def header(self) -> Header:
        msh = self.segments[0]
        return Header(self.value(msh, 10), self.value(msh, 3), self.value(msh, 4),
                      f"{self.value(msh, 9, 1)}^{self.value(msh, 9, 2)}", self.value(msh, 12) or VERSION)


def read_header(payload: bytes) -> Header:
    """The header of a message; Hl7Error when it has no MSH (nothing to acknowledge)."""
    return Message(payload).header()


def read_report(payload: bytes) -> Hl7Report:
    """The report an ORU^R01 carries; Hl7Error (AE) with the reason when Pleura cannot use it."""
    message = Message(payload)
    header = message.header()
    if header.message_type != "ORU^R01":
        raise Hl7Error(f"message type {header.message_type} is not ORU^R01: Pleura takes final reports only",
                       UNSUPPORTED_TYPE)
    obr_at = next((i for i, s in enumerate(message.segments) if s[0] == "OBR"), None)
    if obr_at is None:
        raise Hl7Error("the message has no OBR segment")
    obr = message.segments[obr_at]
    group = message.segments[obr_at + 1:]
    observations = group[:next((i for i, s in enumerate(group) if s[0] == "OBR"), len(group))]
    observations = [s for s in observations if s[0] == "OBX"]
    flag = message.value(obr, 25)
    if not flag:
        raise Hl7Error("OBR-25 (result status) is empty: P, F or C is needed")
    if flag not in STATUSES:
        raise Hl7Error(f"OBR-25 result status {flag[:8]!r} is not one Pleura takes (P, F or C)", BAD_VALUE)
    accession = message.value(obr, 18) or message.value(obr, 3) or message.value(message.first("ORC"), 3)
    uid, source = message.value(message.first("ZDS"), 1), "ZDS-1"
    texts = []
    for obx in observations:
        kind = message.value(obx, 2)
        if kind in ("RP", "ST") and _names_study_uid(message, obx):
            if not uid:
                uid, source = message.value(obx, 5), "OBX-5"
        elif kind in TEXT_TYPES and len(obx) > 5:
            lines = [message.unescape(r) for r in obx[5].split(message.repetition_sep)]
            texts.append("\n".join(lines).strip())
    if uid and (len(uid) > 64 or not _UID.match(uid)):
        raise Hl7Error(f"{source} is not a DICOM UID (digits and dots, at most 64 characters)", DATA_TYPE)
    if not accession and not uid:
        raise Hl7Error("no accession number (OBR-18, OBR-3, ORC-3) and no Study Instance UID (ZDS-1, OBX)")
    text = "\n".join(t for t in texts if t)
    if not text:
        raise Hl7Error("no report text: no OBX of value type TX, FT or ST after the OBR")
    return Hl7Report(STATUSES[flag], text, accession or None, uid or None, _dtm(message.value(obr, 22)))


def partial_header(head: bytes) -> Header | None:
    """The header of a message of which only ``head`` is at hand (an oversized one), if its MSH is whole."""
    ends = [i for i in (head.find(b"\r"), head.find(b"\n")) if i >= 0]
    if not ends:
        return None
    try:
        return read_header(head[:min(ends)])
    except Hl7Error:
        return None


def ack(header: Header, code: str, text: str = "", error: str | None = None) -> bytes:
    """The acknowledgment (original mode) of the message ``header`` heads: MSA-1 ``code``, MSA-3 and
    ERR-3/ERR-8 the reason; UTF-8, segments ending with CR."""
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + "+0000"
    segments = [
        "|".join(["MSH", "^~\\&", SENDING_APPLICATION, "", escape(header.sending_application),
                  escape(header.sending_facility), now, "", "ACK^R01^ACK", uuid.uuid4().hex[:20].upper(), "P",
                  escape(header.version)]),
        "|".join(["MSA", code, escape(header.control_id), escape(text[:200])]).rstrip("|"),
    ]
    if error is not None:
        segments.append("|".join(["ERR", "", "", f"{error}^{_ERROR_NAMES.get(error, '')}^HL70357", "E", "", "", "",
                                  escape(text)]))
    return ("\r".join(segments) + "\r").encode("utf-8")


def _names_study_uid(message: Message, obx: list[str]) -> bool:
    return message.value(obx, 3, 1) == "110180" or "study instance uid" in (
        message.value(obx, 3, 2) + " " + message.value(obx, 3, 1)).lower()


def _dtm(value: str) -> datetime | None:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) as an aware datetime; None if unreadable."""
    match = _DTM.match(value)
    if not match:
        return None
    year, month, day, hour, minute, second, zone = match.groups()
    tz = UTC
    if zone:
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5]))
        tz = timezone(offset if zone[0] == "+" else -offset)
    try:
        return datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                        int(second or 0), tzinfo=tz).astimezone(UTC)
    except ValueError:
        return None
