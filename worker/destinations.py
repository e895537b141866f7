"""Where results and notifications go: DICOM peers (``AET@host:port``), RIS peers speaking HL7 v2 over
MLLP (``host:port``), FHIR servers (a base URL); each with ``+tls`` where it applies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_DESTINATION = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})(?P<tls>\+tls)?$")
_HL7_PEER = re.compile(r"^(?P<host>[^:@/\s]+):(?P<port>\d{1,5})(?P<tls>\+tls)?$")

HL7 = "HL7"
FHIR = "FHIR"


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives results: ``AET@host:port``, or ``AET@host:port+tls`` for DICOM TLS
    (the peer's certificate must come from ``tls_ca_file`` and name ``host``)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = _DESTINATION.match(text.strip())
        if not match:
            raise ValueError(f"destination {text!r} is not of the form AET@host:port or AET@host:port+tls")
        return cls(match["aet"].strip(), match["host"], int(match["port"]), match["tls"] is not None)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


@dataclass(frozen=True)
class Hl7Peer:
    """An MLLP listener of a RIS: ``host:port``, or ``host:port+tls`` for TLS (the peer's certificate
    must come from ``tls_ca_file`` and name ``host``; ours is presented when configured)."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> Hl7Peer:
        match = _HL7_PEER.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"HL7 destination {text!r} is not of the form host:port or host:port+tls")
        return cls(match["host"], int(match["port"]), match["tls"] is not None)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + ("+tls" if self.tls else "")


def fhir_base(text: str) -> str:
    """A FHIR server's base URL (``http://`` or ``https://``), without a trailing slash."""
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"FHIR destination {text!r} is not an http:// or https:// base URL")
    return url
