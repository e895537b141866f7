"""Durable spool of received instances: written as they arrive into a temporary file, then filed
under their UIDs (fsync, rename, fsync of the folder).

Paths are built only from validated DICOM UIDs, so a peer-supplied string can never name a
file outside the spool.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable
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


def _fsync(path: Path) -> None:
    """fsync a file or a folder (its entries) by path."""
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
    _fsync(path.parent)


class Incoming:
    """An instance's bytes being received, written to a temporary file of the spool as they arrive
    and hashed on the way (:meth:`Spool.incoming`); :meth:`Spool.place` files it, :meth:`discard`
    drops it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, data: bytes | memoryview) -> None:
        with memoryview(data) as view:
            self._hash.update(view)
            written = 0
            while written < len(view):
                written += os.write(self._fd, view[written:])  # type: ignore[arg-type]
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self, fsync: bool) -> None:
        """No more bytes; with ``fsync`` they are on disk when this returns."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Remove the temporary file (nothing of it is kept); harmless once placed or discarded."""
        self.close(fsync=False)
        self.path.unlink(missing_ok=True)


class Spool:
    """Content-checked storage ``<root>/<study uid>/<sop uid>.dcm``.

    An instance is written while it is received (:meth:`incoming`: ``<root>/.incoming/<name>.tmp``)
    and filed under its UIDs once complete (:meth:`place`: fsync, rename, fsync of the folder).
    A temporary file left behind was never renamed, so never acknowledged nor recorded: one
    listener owns a spool, so those found when it starts are all stale and removed then
    (``removed_temp_files``). A listener of several processes opens the spool once, before the
    others are forked. With ``durable=False`` nothing is fsynced: the bytes are made durable
    elsewhere (a database) before they are acknowledged, and the file is only their way there.

    Duplicate policy: bytes already stored for a SOP Instance UID (any version) are not
    written again (the path that holds them is returned); different bytes are kept as a new
    file ``<sop uid>.<sha8>.dcm`` beside the first (nothing accepted is ever overwritten).
    Whether the instance changed is the application's call: it compares the digest with the
    version it records as current.
    """

    INCOMING = ".incoming"

    def __init__(self, root: Path, min_free_bytes: int = 0, durable: bool = True) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.durable = durable
        self.incoming_dir = root / self.INCOMING
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self.removed_temp_files = sorted([*root.glob("*/.*.tmp"), *self.incoming_dir.glob("*.tmp")])
        for stale in self.removed_temp_files:
            stale.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _check_room(self) -> None:
        if self.free_bytes() < self.min_free_bytes:
            raise SpoolFull(f"spool free space below {self.min_free_bytes} bytes")

    def incoming(self) -> Incoming:
        """A new temporary file for an instance being received; SpoolFull below the watermark."""
        self._check_room()
        return Incoming(self.incoming_dir / f"{os.getpid()}-{uuid.uuid4().hex}.tmp")

    def place(self, incoming: Incoming, study_uid: str, sop_uid: str, sync_folder: bool = True) -> SpoolWrite:
        """File a complete instance under its UIDs (or find its bytes already there); the temporary
        file is gone afterwards, whatever happens. SpoolFull if writing it went below the watermark.
        Without ``sync_folder`` the caller makes the new entry durable (:meth:`sync`), once for several."""
        try:
            folder = self.root / check_uid(study_uid)
            path = folder / f"{check_uid(sop_uid)}.dcm"
            incoming.close(fsync=False)
            digest = incoming.sha256
            if path.exists():
                for stored in (path, folder / f"{sop_uid}.{digest[:8]}.dcm"):
                    if stored.exists() and _sha256_of(stored) == digest:
                        return SpoolWrite(stored, digest, incoming.size)
                path = folder / f"{sop_uid}.{digest[:8]}.dcm"
            self._check_room()
            if self.durable:
                _fsync(incoming.path)
            folder.mkdir(exist_ok=True)
            os.replace(incoming.path, path)
            if self.durable and sync_folder:
                _fsync(folder)
            return SpoolWrite(path, digest, incoming.size)
        finally:
            incoming.discard()

    def sync(self, paths: Iterable[str | Path]) -> None:
        """Make the entries of files placed without ``sync_folder`` durable: one fsync per folder."""
        if self.durable:
            for folder in sorted({Path(path).parent for path in paths}):
                _fsync(folder)


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
