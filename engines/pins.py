"""Pinned bundles: the manifest's ``pins`` give the SHA-256 of every file in the bundle directory.

A pinned bundle loads only if its files are exactly those the manifest pins: none changed, none
missing, none added (a backend may read a file no role names, such as an ONNX graph's external
data). Only the manifest itself, which holds the pins, and its signature (:mod:`engines.signing`)
are outside the pins. Whoever writes a bundle calls :func:`pin` last.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: The manifest's file name; it holds the pins, so it is not pinned itself.
MANIFEST = "manifest.json"
#: The detached signature of the manifest (see :mod:`engines.signing`).
SIGNATURE = "manifest.sig"
UNPINNED = (MANIFEST, SIGNATURE)


class PinError(ValueError):
    """A bundle's files differ from its manifest's pins (raised as a BundleError by load_bundle)."""


def file_digests(path: Path) -> dict[str, str]:
    """SHA-256 (hex) of every regular file under ``path``, by relative POSIX path, sorted."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix(): _sha256(p) for p in files}


def pinnable(digests: dict[str, str]) -> dict[str, str]:
    """The digests a manifest pins: every file but the manifest and its signature."""
    return {name: digest for name, digest in digests.items() if name not in UNPINNED}


def check(path: Path, pins: Any, digests: dict[str, str]) -> None:
    """Raise :class:`PinError` naming each file that differs from ``pins`` (changed, missing, extra)."""
    if not isinstance(pins, dict) or not all(isinstance(v, str) for v in pins.values()):
        raise PinError(f"{path / MANIFEST}: pins must map each file name to its SHA-256")
    found = pinnable(digests)
    changed = [name for name in pins if name in found and found[name] != pins[name]]
    missing = [name for name in pins if name not in found]
    extra = [name for name in found if name not in pins]
    problems = [f"{what}: {', '.join(names)}" for what, names in
                (("changed since pinned", changed), ("missing", missing), ("not pinned", extra)) if names]
    if problems:
        raise PinError(
            f"bundle {path} refused, its files are not the ones its manifest pins ({'; '.join(problems)}). "
            "Reinstall the bundle from its source; if the change is intended, re-pin it "
            "(pleura models pin) and sign it again"
        )


def pin(path: Path) -> dict[str, str]:
    """Write the pins of every file now in ``path`` into its manifest; return them.

    A signature of the previous manifest no longer matches, so it is removed: sign again.
    """
    manifest_path = path / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["pins"] = pinnable(file_digests(path))
    manifest.pop("sha256", None)  # the partial digests older importers wrote
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (path / SIGNATURE).unlink(missing_ok=True)
    return manifest["pins"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
