"""A throw-away PKI for the TLS tests, made with the ``openssl`` command line tool.

Two CAs (``trusted`` and ``rogue``), each signing a server certificate (for ``localhost`` and
127.0.0.1) and a client certificate. RSA 2048 keys, PEM files, no pass phrases.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support import require_tool


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    ca: Identity
    server: Identity
    client: Identity


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(path))
    return path


def _signed(folder: Path, name: str, ca: Identity, extensions: str) -> Identity:
    key = _key(folder / f"{name}.key")
    csr, ext, cert = folder / f"{name}.csr", folder / f"{name}.ext", folder / f"{name}.pem"
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert))
    return Identity(cert, key)


def authority(folder: Path, name: str) -> Authority:
    """A CA called ``name`` with one server and one client certificate, written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = _key(folder / f"{name}-ca.key")
    cert = folder / f"{name}-ca.pem"
    _openssl("req", "-x509", "-new", "-key", str(key), "-subj", f"/CN={name} test CA", "-days", "2", "-sha256",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-out", str(cert))
    ca = Identity(cert, key)
    server = _signed(folder, f"{name}-server", ca,
                     "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                     "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    client = _signed(folder, f"{name}-client", ca,
                     "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                     "extendedKeyUsage=clientAuth\n")
    return Authority(ca, server, client)
