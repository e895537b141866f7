"""TLS contexts for DICOM (PS3.15 B.9, BCP 195 non-downgrading profile).

TLS 1.2 at least (1.3 allowed); for TLS 1.2 only ECDHE key exchange with AES-GCM or
ChaCha20-Poly1305 (TLS 1.3 suites are AEAD by definition); no compression, no renegotiation.
The server context can require a client certificate signed by our CA (mutual TLS); the
client context verifies the peer against our CA and its host name, and presents our own
certificate when one is configured.
"""

from __future__ import annotations

import ssl
from pathlib import Path

#: TLS 1.2 cipher suites allowed (OpenSSL names), strongest first.
BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
])


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_context(
    cert_file: Path | str,
    key_file: Path | str,
    ca_file: Path | str | None = None,
    require_peer_cert: bool = True,
) -> ssl.SSLContext:
    """The listener's context; with ``require_peer_cert`` a client without a certificate from ``ca_file`` fails."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if ca_file is not None:
        ctx.load_verify_locations(str(ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_peer_cert else ssl.CERT_OPTIONAL
    elif require_peer_cert:
        raise ValueError("client certificates are required but no CA file (tls_ca_file) is set to verify them")
    return ctx


def client_context(
    ca_file: Path | str | None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> ssl.SSLContext:
    """An outbound context: the server must present a certificate from ``ca_file`` (the system CAs if None)
    whose name matches the host we dial; our certificate and key are presented when given."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED and host name check by default
    if ca_file is not None:
        ctx.load_verify_locations(str(ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None or key_file is not None:
        if cert_file is None or key_file is None:
            raise ValueError("a client certificate needs both tls_cert_file and tls_key_file")
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx
