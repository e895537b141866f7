"""Signed bundles: an Ed25519 signature of the manifest, which pins every other file.

``manifest.sig`` (JSON) holds ``algorithm`` ("ed25519"), ``key`` (the signer key's id,
:func:`key_id`) and ``signature`` (base64 of the signature of the manifest's bytes). Keys are
PEM files as ``openssl genpkey -algorithm ed25519`` and ``openssl pkey -pubout`` write them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engines.pins import MANIFEST, SIGNATURE

ALGORITHM = "ed25519"


class SignatureError(ValueError):
    """A key cannot be used, or a bundle's signature is absent, untrusted or wrong."""


@dataclass(frozen=True)
class TrustedKey:
    """A public key bundles may be signed with, and the file it came from."""

    id: str
    path: Path
    key: Ed25519PublicKey


def key_id(key: Ed25519PublicKey) -> str:
    """``sha256:`` and the hex SHA-256 of the raw 32-byte public key: what results name as the signer."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load_trusted_keys(paths: Iterable[Path | str]) -> dict[str, TrustedKey]:
    """The Ed25519 public keys in the PEM files ``paths``, by :func:`key_id`."""
    keys = {}
    for path in map(Path, paths):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise SignatureError(f"trusted key {path}: cannot read a PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"trusted key {path}: not an Ed25519 key ({type(key).__name__})")
        keys[key_id(key)] = TrustedKey(key_id(key), path, key)
    return keys


def sign(bundle_dir: Path, private_key_pem: Path) -> str:
    """Sign ``bundle_dir``'s manifest with the key in ``private_key_pem``; return the key's id."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {private_key_pem}: cannot read an unencrypted PEM private key "
                             f"({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {private_key_pem}: not an Ed25519 key ({type(key).__name__}); "
                             "make one with: openssl genpkey -algorithm ed25519 -out KEY.pem")
    signature = key.sign((bundle_dir / MANIFEST).read_bytes())
    signer = key_id(key.public_key())
    document = {"algorithm": ALGORITHM, "key": signer, "signature": base64.b64encode(signature).decode()}
    (bundle_dir / SIGNATURE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return signer


def verify(bundle_dir: Path, trusted: dict[str, TrustedKey]) -> TrustedKey:
    """The trusted key that signed ``bundle_dir``'s manifest; :class:`SignatureError` if there is none."""
    path = bundle_dir / SIGNATURE
    if not path.is_file():
        raise SignatureError(f"bundle {bundle_dir} is not signed ({SIGNATURE} is missing) and only bundles "
                             "signed by a trusted key may be loaded; sign it: pleura models sign")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        signer, signature = document["key"], base64.b64decode(document["signature"], validate=True)
        if document["algorithm"] != ALGORITHM:
            raise SignatureError(f"{path}: algorithm {document['algorithm']!r}, only {ALGORITHM!r} is accepted")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"{path}: not a bundle signature ({type(exc).__name__}: {exc})") from exc
    key = trusted.get(signer)
    if key is None:
        raise SignatureError(f"bundle {bundle_dir} is signed by key {signer}, which is not a trusted key "
                             f"(trusted: {', '.join(trusted) or 'none'})")
    try:
        key.key.verify(signature, (bundle_dir / MANIFEST).read_bytes())
    except InvalidSignature as exc:
        raise SignatureError(f"bundle {bundle_dir}: its signature by key {signer} does not match its manifest "
                             "(changed after signing, or forged); reinstall it from its source") from exc
    return key
