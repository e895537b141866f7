"""Durable spool of received instances: atomic writes (temp file, fsync, rename, fsync dir).

Paths are built only from validated DICOM UIDs, so a peer-supplied string can never name a
file outside the spool.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


class SpoolFull(OSError):
    """Free space is below the watermark; nothing was written."""


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID (and so never becomes part of a path)."""


@dataclass(frozen=True)
class SpoolWrite:
    path: Path
    sha256: str
    size: int


#: PS3.5 9.1: ASCII digit components without leading zeros, joined by dots. Matched against the
#: whole raw value: no stripping of padding, newlines or NULs (pydicom's UID strips them).
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def check_uid(value: str) -> str:
    """Return ``value`` if it is a valid DICOM UID (digits and dots, <= 64 chars).

    The message never repeats the value: it is the peer's string and may hold anything.
    """
    if len(value) > 64 or not _UID.fullmatch(value):
        raise InvalidUID(f"not a valid DICOM UID ({len(value)} characters)")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Spool:
    """Content-checked storage ``<root>/<study uid>/<sop uid>.dcm``.

    Duplicate policy: bytes already stored for a SOP Instance UID (any version) are not
    written again (the path that holds them is returned); different bytes are kept as a new
    file ``<sop uid>.<sha8>.dcm`` beside the first (nothing accepted is ever overwritten).
    Whether the instance changed is the application's call: it compares the digest with the
    version it records as current.

    A temporary file ``.<name>.<pid>.tmp`` is a write that a crash cut short: it was never
    renamed, so never acknowledged nor recorded. One listener owns a spool, so the files left
    when it starts are all stale; they are removed then (``removed_temp_files``). A listener of
    several processes opens the spool once, before the others are forked.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        root.mkdir(parents=True, exist_ok=True)
        self.removed_temp_files = sorted(root.glob("*/.*.tmp"))
        for stale in self.removed_temp_files:
            stale.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def store(self, study_uid: str, sop_uid: str, data: bytes) -> SpoolWrite:
        folder = self.root / check_uid(study_uid)
        path = folder / f"{check_uid(sop_uid)}.dcm"
        digest = hashlib.sha256(data).hexdigest()
        if path.exists():
            for stored in (path, folder / f"{sop_uid}.{digest[:8]}.dcm"):
                if stored.exists() and _sha256_of(stored) == digest:
                    return SpoolWrite(stored, digest, len(data))
            path = folder / f"{sop_uid}.{digest[:8]}.dcm"
        if self.free_bytes() - len(data) < self.min_free_bytes:
            raise SpoolFull(f"spool free space below {self.min_free_bytes} bytes")
        atomic_write(path, data)
        return SpoolWrite(path, digest, len(data))


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
