"""Where results and notifications go: DICOM peers (``AET@host:port``) and DICOMweb servers (a base URL),
RIS peers speaking HL7 v2 over MLLP (``host:port``), FHIR servers (a base URL); each with ``+tls`` where
it applies."""

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
            raise ValueError(f"destination {text!r} is not of the form AET@host:port, AET@host:port+tls "
                             "or a DICOMweb base URL (http://host:port/dicom-web)")
        return cls(match["aet"].strip(), match["host"], int(match["port"]), match["tls"] is not None)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


@dataclass(frozen=True)
class DicomWebDestination:
    """A DICOMweb server that receives results by STOW-RS: its base URL, ``http://host:port/dicom-web`` or
    ``https://...`` (the server's certificate must come from ``tls_ca_file``; ours is presented when
    configured). Credentials go in ``destination_token_file``, never in the URL."""

    url: str

    @classmethod
    def parse(cls, text: str) -> DicomWebDestination:
        url = _base_url(text, "DICOMweb destination")
        if urlsplit(url).username is not None:
            raise ValueError(f"DICOMweb destination {url.split('@')[-1]!r} carries credentials: put a bearer "
                             "token in PLEURA_DESTINATION_TOKEN_FILE instead")
        return cls(url)

    @property
    def tls(self) -> bool:
        return self.url.startswith("https:")

    def __str__(self) -> str:
        return self.url


def parse_destination(text: str) -> Destination | DicomWebDestination:
    """A ``PLEURA_DESTINATIONS`` entry: ``AET@host:port[+tls]``, or a DICOMweb base URL."""
    return DicomWebDestination.parse(text) if "://" in text else Destination.parse(text)


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
    return _base_url(text, "FHIR destination")


def _base_url(text: str, what: str) -> str:
    """An ``http://`` or ``https://`` base URL without a trailing slash, query or fragment."""
    url = text.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number or out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{what} {text!r} is not an http:// or https:// base URL")
    return url
