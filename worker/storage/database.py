"""``PLEURA_STORAGE=database``: bytes in the ledger's database, in ``blob_chunks`` rows of 8000 bytes.

Written with ``COPY ... FROM STDIN (FORMAT binary)`` and read a batch of rows at a time (never a
whole file in memory), in the caller's transaction, so an instance's bytes and its ledger row
commit together. A row of :data:`CHUNK` bytes fits one heap page (``STORAGE PLAIN``, migration
0009): no TOAST table and index to write as well, and COPY inserts the rows in batches. Rows of
1 MiB (kept out of line, migrations 0008 to 0009) and large objects (``Blob.lo_oid``, before 0008)
are still read and removed. A fetch checks the SHA-256 of what it read against the one recorded.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from worker.ledger import Blob, BlobChunk
from worker.ledger.db import Ledger, utcnow

#: bytes per ``blob_chunks`` row: the row (24-byte header, two integers, the bytea) fits one 8 KiB page
CHUNK = 8000
#: rows per piece of the COPY stream (about 1 MB)
BATCH = 128
#: rows a read fetches at a time: 256 KB, or 32 MiB at most for the 1 MiB rows written before 0009
FETCH = 32


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

    def keep(self, s: Session, key: str, path: Path, sha256: str | None = None) -> None:
        """Copy the file into ``blob_chunks`` rows of a new (or purged) blob, unless ``key`` holds bytes.
        ``sha256``: the file's digest when the caller already has it (computed on the way otherwise)."""
        if s.scalars(select(Blob.id).where(Blob.key == key, Blob.purged_at.is_(None))).first():
            return
        self._check_room(s)
        blob = s.scalars(select(Blob).where(Blob.key == key)).first()
        if blob is None:
            blob = Blob(key=key, sha256="", size_bytes=0, created_at=utcnow())
            s.add(blob)
        s.flush()  # its id, for the chunks
        digest = None if sha256 else hashlib.sha256()
        with open(path, "rb") as fh:
            rows = _CopyRows(blob.id, fh, digest)
            cursor = s.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.copy_expert("COPY blob_chunks (blob_id, n, data) FROM STDIN (FORMAT binary)", rows)
            finally:
                cursor.close()
        blob.sha256 = sha256 or digest.hexdigest()  # type: ignore[union-attr]
        blob.size_bytes, blob.lo_oid, blob.purged_at = rows.size, None, None
        s.flush()

    def fetch(self, key: str, recorded: str) -> Path:
        """A private copy of the bytes under ``fetch_dir``, checked against their SHA-256."""
        target = self.fetch_dir / f"{uuid.uuid4().hex}.dcm"
        tmp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
        with self.ledger.session() as s:
            blob = s.scalars(select(Blob).where(Blob.key == key)).first()
            if blob is None or blob.purged_at is not None:
                raise StorageError(f"no bytes for {key.split(':')[0]} in the database "
                                   f"({'removed by retention' if blob is not None else 'never kept'})")
            digest = hashlib.sha256()
            with open(tmp, "wb") as fh:
                for chunk in _chunks(s, blob):
                    fh.write(chunk)
                    digest.update(chunk)
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
        s.execute(delete(BlobChunk).where(BlobChunk.blob_id == blob.id))
        blob.lo_oid, blob.purged_at = None, utcnow()
        return True


def _chunks(s: Session, blob: Blob):  # type: ignore[no-untyped-def]
    """The blob's bytes a chunk at a time: its rows, or its large object (kept before migration 0008)."""
    if blob.lo_oid is not None:
        lob = _lobject(s, blob.lo_oid, "rb")
        try:
            while chunk := lob.read(CHUNK):
                yield chunk
        finally:
            lob.close()
        return
    rows = s.connection().execution_options(stream_results=True, yield_per=FETCH).execute(
        select(BlobChunk.data).where(BlobChunk.blob_id == blob.id).order_by(BlobChunk.n))
    for (chunk,) in rows:
        yield chunk


class _CopyRows(io.RawIOBase):
    """A file as ``COPY blob_chunks (blob_id, n, data) FROM STDIN (FORMAT binary)`` input, :data:`BATCH`
    rows a read; hashes what it reads into ``digest`` (when given) and counts it in ``size``."""

    _HEADER = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0)

    def __init__(self, blob_id: int, fh: io.BufferedReader, digest: hashlib._Hash | None) -> None:
        self._pieces = self._generate(blob_id, fh, digest)
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return next(self._pieces, b"")

    def _generate(self, blob_id: int, fh: io.BufferedReader, digest: hashlib._Hash | None):  # type: ignore[no-untyped-def]
        yield self._HEADER
        n = 0
        while batch := fh.read(CHUNK * BATCH):
            if digest is not None:
                digest.update(batch)
            self.size += len(batch)
            view, parts = memoryview(batch), []
            for start in range(0, len(batch), CHUNK):
                row = view[start:start + CHUNK]
                parts += (struct.pack("!hiiiii", 3, 4, blob_id, 4, n, len(row)), row)
                n += 1
            yield b"".join(parts)
        yield struct.pack("!h", -1)
