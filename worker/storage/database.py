"""``PLEURA_STORAGE=database``: bytes as PostgreSQL large objects in the ledger's database.

Written and read in chunks (never a whole file in memory); a large object belongs to the
transaction that writes it, so an instance's bytes and its ledger row commit together. A fetch
checks the SHA-256 of what it read against the one recorded.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from worker.ledger import Blob
from worker.ledger.db import Ledger, utcnow

CHUNK = 1 << 20


class StorageError(OSError):
    """The bytes are not in the database (never kept, or removed by retention) or are corrupt."""


class DatabaseFull(OSError):
    """The ledger's database has reached ``PLEURA_MAX_DATABASE_MB``: nothing more is kept."""


def _lobject(s: Session, oid: int, mode: str):  # type: ignore[no-untyped-def]
    """psycopg2's large object on the session's connection (its transaction)."""
    return s.connection().connection.dbapi_connection.lobject(oid, mode)  # type: ignore[union-attr]


class DatabaseStorage:
    shared = True

    #: seconds between two reads of the database's size
    SIZE_EVERY = 5.0

    def __init__(self, ledger: Ledger, fetch_dir: Path, max_mb: int | None = None) -> None:
        if ledger.engine.dialect.name != "postgresql":
            raise ValueError("PLEURA_STORAGE=database keeps the bytes in the ledger's PostgreSQL: "
                             "set PLEURA_DATABASE_URL to a postgresql:// URL (SQLite is for one host: use local)")
        self.ledger, self.fetch_dir, self.max_mb = ledger, fetch_dir, max_mb
        self._size: tuple[float, int] | None = None  # (monotonic time read, bytes)
        fetch_dir.mkdir(parents=True, exist_ok=True)

    def _check_room(self, s: Session) -> None:
        """DatabaseFull once the database is ``max_mb`` large (its size read at most every few seconds)."""
        if self.max_mb is None:
            return
        now = time.monotonic()
        if self._size is None or now - self._size[0] > self.SIZE_EVERY:
            self._size = (now, int(s.scalar(text("SELECT pg_database_size(current_database())")) or 0))
        if self._size[1] >= self.max_mb * 1_000_000:
            raise DatabaseFull(f"the ledger's database holds {self._size[1] // 1_000_000} MB, at its limit "
                               f"PLEURA_MAX_DATABASE_MB={self.max_mb}: free space (PLEURA_RETENTION_HOURS) or raise it")

    def keep(self, s: Session, key: str, path: Path) -> None:
        """Stream the file into a new large object, unless ``key`` already holds bytes."""
        if s.scalars(select(Blob.id).where(Blob.key == key, Blob.purged_at.is_(None))).first():
            return
        self._check_room(s)
        digest, size = hashlib.sha256(), 0
        lob = _lobject(s, 0, "wb")
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                lob.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        oid = lob.oid
        lob.close()
        blob = s.scalars(select(Blob).where(Blob.key == key)).first()
        if blob is None:
            s.add(Blob(key=key, sha256=digest.hexdigest(), size_bytes=size, lo_oid=oid, created_at=utcnow()))
        else:  # purged, now received again
            blob.sha256, blob.size_bytes, blob.lo_oid, blob.purged_at = digest.hexdigest(), size, oid, None
        s.flush()

    def fetch(self, key: str, recorded: str) -> Path:
        """A private copy of the bytes under ``fetch_dir``, checked against their SHA-256."""
        target = self.fetch_dir / f"{uuid.uuid4().hex}.dcm"
        tmp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
        with self.ledger.session() as s:
            blob = s.scalars(select(Blob).where(Blob.key == key)).first()
            if blob is None or blob.lo_oid is None or blob.purged_at is not None:
                raise StorageError(f"no bytes for {key.split(':')[0]} in the database "
                                   f"({'removed by retention' if blob is not None else 'never kept'})")
            digest = hashlib.sha256()
            lob = _lobject(s, blob.lo_oid, "rb")
            try:
                with open(tmp, "wb") as fh:
                    while chunk := lob.read(CHUNK):
                        fh.write(chunk)
                        digest.update(chunk)
            finally:
                lob.close()
            if digest.hexdigest() != blob.sha256:
                tmp.unlink(missing_ok=True)
                raise StorageError(f"the bytes of {key.split(':')[0]} in the database do not match their SHA-256")
        tmp.rename(target)
        return target

    def done(self, path: Path) -> None:
        if path.parent == self.fetch_dir:
            path.unlink(missing_ok=True)

    def remove(self, s: Session, key: str, recorded: str) -> None:
        self.purge(s, key)
        Path(recorded).unlink(missing_ok=True)  # a copy this host may still hold

    def purge(self, s: Session, key: str) -> bool:
        """Remove the bytes of ``key`` (the row stays, with ``purged_at``); False when none were held."""
        blob = s.scalars(select(Blob).where(Blob.key == key, Blob.purged_at.is_(None))).first()
        if blob is None:
            return False
        if blob.lo_oid is not None:
            _lobject(s, blob.lo_oid, "rb").unlink()
        blob.lo_oid, blob.purged_at = None, utcnow()
        return True
