"""worker.storage: bytes kept in the ledger's PostgreSQL (chunk rows; large objects before 0008) and read
back on any host."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import select, text

from dicom_node.filing import StoredInstance
from worker.ledger import Blob, Instance
from worker.ledger.db import Ledger, upgrade, utcnow
from worker.listen.receiver import LedgerReceiver
from worker.storage import DatabaseStorage, LocalStorage, instance_key, output_key
from worker.storage.database import CHUNK, DatabaseFull, StorageError


@pytest.fixture
def ledger(pg_url: str) -> Ledger:
    upgrade(pg_url)
    return Ledger(pg_url)


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_bytes_go_in_with_the_transaction_and_come_back_identical(ledger: Ledger, tmp_path: Path) -> None:
    storage = DatabaseStorage(ledger, tmp_path / "fetched")
    source = _file(tmp_path / "a.dcm", 3 * CHUNK + 123)  # several chunks, not a multiple of one
    key = instance_key("a" * 64)
    with pytest.raises(RuntimeError), ledger.session() as s:  # a rolled-back transaction keeps nothing
        storage.keep(s, key, source)
        raise RuntimeError("the ledger row failed")
    with ledger.session() as s:
        assert s.scalars(select(Blob)).all() == []
        assert s.scalar(text("SELECT count(*) FROM blob_chunks")) == 0
        storage.keep(s, key, source)
        storage.keep(s, key, source)  # the same content again: one blob
    copy = storage.fetch(key, "/elsewhere/a.dcm")
    assert copy.parent == tmp_path / "fetched" and copy.read_bytes() == source.read_bytes()
    second = storage.fetch(key, "/elsewhere/a.dcm")
    assert second != copy  # each use its own copy
    storage.done(copy)
    assert not copy.exists() and second.exists()
    storage.done(second)
    assert list((tmp_path / "fetched").iterdir()) == []
    with ledger.session() as s:
        blob = s.scalars(select(Blob)).one()
        assert (blob.key, blob.size_bytes, blob.lo_oid) == (key, source.stat().st_size, None)
        assert s.scalar(text("SELECT count(*) FROM blob_chunks")) == 4  # CHUNK bytes each, in the row
        assert s.scalar(text("SELECT attstorage FROM pg_attribute WHERE attrelid = 'blob_chunks'::regclass "
                             "AND attname = 'data'")) == "p"
        assert s.scalar(text("SELECT pg_relation_size(reltoastrelid) FROM pg_class "
                             "WHERE relname = 'blob_chunks'")) == 0  # nothing went to TOAST


def test_a_digest_the_caller_computed_is_recorded_and_checked_on_fetch(ledger: Ledger, tmp_path: Path) -> None:
    """The listener hashed the bytes as they arrived: keep() records that digest instead of hashing
    again, and a fetch still checks the bytes against it."""
    storage = DatabaseStorage(ledger, tmp_path / "fetched")
    source = _file(tmp_path / "a.dcm", CHUNK * 130)  # more than one COPY piece of BATCH rows
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    with ledger.session() as s:
        storage.keep(s, instance_key(digest), source, digest)
        storage.keep(s, instance_key("f" * 64), source, "f" * 64)  # a digest that is not the bytes'
    assert storage.fetch(instance_key(digest), "").read_bytes() == source.read_bytes()
    with pytest.raises(StorageError, match="do not match"):
        storage.fetch(instance_key("f" * 64), "")


def test_rows_of_one_mib_kept_before_0009_are_still_read(pg_url: str, tmp_path: Path) -> None:
    upgrade(pg_url, "0008")
    ledger = Ledger(pg_url)
    data = os.urandom(2 * (1 << 20) + 7)
    key = output_key("1.2.8")
    with ledger.session() as s:
        s.add(Blob(key=key, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), created_at=utcnow()))
        s.flush()
        blob_id = s.scalars(select(Blob.id)).one()
        for n, start in enumerate(range(0, len(data), 1 << 20)):
            s.execute(text("INSERT INTO blob_chunks (blob_id, n, data) VALUES (:b, :n, :d)"),
                      {"b": blob_id, "n": n, "d": data[start:start + (1 << 20)]})
    ledger.engine.dispose()
    upgrade(pg_url)
    storage = DatabaseStorage(Ledger(pg_url), tmp_path / "fetched")
    assert storage.fetch(key, "").read_bytes() == data


def test_a_large_object_kept_before_chunks_is_still_read_and_removed(ledger: Ledger, tmp_path: Path) -> None:
    """Blobs of migration 0006 (one large object each) outlive the move to chunk rows (0008)."""
    storage = DatabaseStorage(ledger, tmp_path / "fetched")
    data = os.urandom(CHUNK + 5)
    key = output_key("1.2.9")
    with ledger.session() as s:
        lob = s.connection().connection.dbapi_connection.lobject(0, "wb")
        lob.write(data)
        s.add(Blob(key=key, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), lo_oid=lob.oid,
                   created_at=utcnow()))
        lob.close()
    copy = storage.fetch(key, "")
    assert copy.read_bytes() == data
    storage.done(copy)
    with ledger.session() as s:
        assert storage.purge(s, key)
        assert s.scalar(text("SELECT count(*) FROM pg_largeobject_metadata")) == 0


def test_missing_corrupt_and_purged_bytes_are_clear_errors(ledger: Ledger, tmp_path: Path) -> None:
    storage = DatabaseStorage(ledger, tmp_path / "fetched")
    with pytest.raises(StorageError, match="never kept"):
        storage.fetch(output_key("1.2.3"), "/outbox/x.dcm")
    key = output_key("1.2.3")
    with ledger.session() as s:
        storage.keep(s, key, _file(tmp_path / "sr.dcm", 1000))
        s.execute(text("UPDATE blobs SET sha256 = :h"), {"h": "0" * 64})
    with pytest.raises(StorageError, match="do not match"):
        storage.fetch(key, "")
    assert list((tmp_path / "fetched").iterdir()) == []  # nothing half-written is left
    with ledger.session() as s:
        assert storage.purge(s, key) and not storage.purge(s, key)
        assert s.scalar(text("SELECT count(*) FROM blob_chunks")) == 0
    with pytest.raises(StorageError, match="removed by retention"):
        storage.fetch(key, "")


def test_local_storage_is_the_recorded_path_and_database_storage_needs_postgresql(tmp_path: Path) -> None:
    assert LocalStorage().fetch("sha256:x", "/var/spool/a.dcm") == Path("/var/spool/a.dcm")
    with pytest.raises(ValueError, match="needs? .*PostgreSQL|keeps the bytes in the ledger's PostgreSQL"):
        DatabaseStorage(Ledger(f"sqlite:///{tmp_path / 'l.db'}"), tmp_path / "fetched")


def test_a_full_database_refuses_the_instance_and_keeps_nothing(ledger: Ledger, tmp_path: Path) -> None:
    """``PLEURA_MAX_DATABASE_MB``: the listener's receiver raises, the SCP answers 0xA700 (ledger write failed)."""
    storage = DatabaseStorage(ledger, tmp_path / "fetched", max_mb=1)  # any PostgreSQL database is larger
    receiver = LedgerReceiver(ledger, storage=storage)
    spooled = _file(tmp_path / "x.dcm", 5000)
    with pytest.raises(DatabaseFull, match="PLEURA_MAX_DATABASE_MB=1"):
        receiver.instance_stored(StoredInstance(
            association=None, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", sop_instance_uid="1.2.3.4",
            study_instance_uid="1.2.3", series_instance_uid="1.2.3.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="CR", path=str(spooled), size=5000, sha256="b" * 64))
    with ledger.session() as s:
        assert s.scalars(select(Instance)).all() == [] and s.scalars(select(Blob)).all() == []
    assert spooled.exists()  # refused: the spool copy is not removed (the PACS sends again)
    roomy = LedgerReceiver(ledger, storage=DatabaseStorage(ledger, tmp_path / "fetched", max_mb=1_000_000))
    roomy.instance_stored(StoredInstance(
        association=None, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", sop_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3", series_instance_uid="1.2.3.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR", path=str(spooled), size=5000, sha256="b" * 64))
    assert not spooled.exists()  # kept in the database: the listener's copy goes
    with ledger.session() as s:
        assert s.scalars(select(Blob.key)).all() == [instance_key("b" * 64)]
