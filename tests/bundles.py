"""Helpers for the bundle trust tests: Ed25519 keys made by OpenSSL, tampering, copies of the demo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from engines.bundle import BUILTIN_DIR
from tests.support import require_tool


def keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 private key and its public key, as PEM files written by ``openssl`` (what a site runs)."""
    openssl = require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    subprocess.run([openssl, "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True, timeout=30)
    subprocess.run([openssl, "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True, timeout=30)
    return private, public


def demo_copy(target: Path) -> Path:
    """A copy of the built-in demo bundle at ``target``."""
    return Path(shutil.copytree(BUILTIN_DIR / "demo", target))


def flip_middle(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``path``: what a bad disk, copy or hand does to a model."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))
