"""Studies in by DICOMweb STOW-RS on ``PLEURA_DICOMWEB_PORT``: :mod:`dicom_node.stow` over the
listener's spool and ledger receiver, served by the web stack."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

from dicom_node.filing import Receiver
from dicom_node.spool import Spool
from dicom_node.stow import StowPolicy, StowService
from worker.settings import Settings
from worker.web.server import HttpEndpoints, server_tls

#: the sender recorded for a token given without a name
UNNAMED = "DICOMWEB"


def read_tokens(path: Path) -> dict[str, str]:
    """Token -> sender name from a token file: one token a line, ``name:token`` or just ``token``;
    blank lines and ``#`` comments are skipped. ValueError for a name over 16 characters."""
    tokens = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, token = line.partition(":") if ":" in line else (UNNAMED, "", line)
        name = name.strip()
        if not 0 < len(name) <= 16 or not token.strip():
            raise ValueError(f"{path} line {number}: expected name:token with a name of 1 to 16 characters")
        tokens[token.strip()] = name
    return tokens


def bind(settings: Settings) -> socket.socket:
    """The STOW-RS port, bound once before several listener processes are forked (each then serves it)."""
    try:
        return socket.create_server((settings.dicomweb_host, settings.dicomweb_port or 0))
    except OSError as exc:
        raise SystemExit(f"error: cannot serve DICOMweb on {settings.dicomweb_host}:{settings.dicomweb_port}: "
                         f"{exc}") from exc


def start(settings: Settings, spool: Spool, receiver: Receiver,
          listen_socket: socket.socket | None = None) -> HttpEndpoints:
    """Serve STOW-RS (on ``listen_socket`` when given); SystemExit with the reason when it cannot.
    Clients prove who they are by a bearer token of PLEURA_DICOMWEB_TOKEN_FILE, or, without that
    file, by a client certificate from PLEURA_TLS_CA_FILE (PLEURA_DICOMWEB_TLS with
    PLEURA_TLS_REQUIRE_PEER_CERT: mutual TLS; the sender is then recorded as ``TLS-CLIENT``)."""
    token_file = settings.dicomweb_token_file
    mutual = settings.dicomweb_tls and settings.tls_require_peer_cert and settings.tls_ca_file is not None
    if token_file is None and not mutual:
        raise SystemExit("error: PLEURA_DICOMWEB_PORT needs PLEURA_DICOMWEB_TOKEN_FILE (the clients' bearer tokens) "
                         "or mutual TLS (PLEURA_DICOMWEB_TLS with PLEURA_TLS_CA_FILE)")
    tokens = None
    if token_file is not None:
        try:
            read_tokens(token_file)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: PLEURA_DICOMWEB_TOKEN_FILE: {exc}") from exc
        tokens = partial(read_tokens, token_file)
    policy = StowPolicy(tokens, settings.dicomweb_max_mb * 1_000_000, settings.dicomweb_timeout_seconds)
    service = StowService(spool, receiver, policy, settings.max_inflated_mb * 2**20)
    tls = server_tls(settings, require_peer_cert=mutual) if settings.dicomweb_tls else None
    try:
        return HttpEndpoints(settings.dicomweb_host, settings.dicomweb_port or 0, {}, extra=service.routes(),
                             tls=tls, name="dicomweb", listen_socket=listen_socket).start()
    except OSError as exc:
        raise SystemExit(f"error: cannot serve DICOMweb on {settings.dicomweb_host}:{settings.dicomweb_port}: "
                         f"{exc}") from exc
