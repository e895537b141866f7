"""The embedding archive on SQLite and PostgreSQL: store, replace, search with vectors whose
neighbour order is known by construction; pgvector where the server has the extension."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import func, select, text

from worker.embeddings import EXACT, PGVECTOR, BundleMismatch, EmbeddingArchive, SearchError, UnknownUID
from worker.ledger import Embedding, Instance, Job, Study
from worker.ledger.db import Ledger, upgrade, utcnow

DIM = 16
E0, E1, E2 = np.eye(DIM, dtype=np.float32)[:3]


def _add_study(ledger: Ledger, archive: EmbeddingArchive, name: str, vectors: list[np.ndarray],
               bundle: tuple[str, str] = ("demo", "0.1.0")) -> None:
    """Study ``name`` with one instance (``name.1``, ``name.2``...) per vector, stored by one job."""
    now = utcnow()
    with ledger.session() as s:
        study = Study(study_instance_uid=name, state="DONE", revision=1, first_received_at=now, last_received_at=now)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, revision=1, state="SUCCEEDED", created_at=now, attempts=1)
        s.add(job)
        instances = [Instance(study_id=study.id, sop_instance_uid=f"{name}.{n}", sop_class_uid="1.2",
                              series_instance_uid=f"{name}.0", transfer_syntax_uid="1.2.840.10008.1.2.1",
                              spool_path="/dev/null", size_bytes=0, sha256="0" * 64, received_at=now)
                     for n in range(1, len(vectors) + 1)]
        s.add_all(instances)
        s.flush()
        archive.store(s, job_id=job.id, study_id=study.id, bundle_name=bundle[0], bundle_version=bundle[1],
                      vectors=[(i.id, v) for i, v in zip(instances, vectors, strict=True)], now=now)


def _mix(*parts: tuple[float, np.ndarray]) -> np.ndarray:
    return sum(w * v for w, v in parts)  # type: ignore[return-value]


@pytest.fixture
def archive(db_url: str) -> Iterator[EmbeddingArchive]:
    """An archive where, for a query along E0, studies rank B > E > C > D by construction.

    Vectors are stored unnormalised (the archive normalises). Cosine with E0: B 0.995,
    C 0.707, D 0, E's best image 0.894 (its other image -1). A holds the query image A.1 and a
    near-copy A.2; F is an exact copy of E0 but from another bundle version.
    """
    upgrade(db_url)
    ledger = Ledger(db_url)
    arch = EmbeddingArchive(ledger)
    _add_study(ledger, arch, "1.1.A", [3 * E0, _mix((1, E0), (0.01, E2))])
    _add_study(ledger, arch, "1.1.B", [_mix((1, E0), (0.1, E1))])
    _add_study(ledger, arch, "1.1.C", [_mix((2, E0), (2, E1))])
    _add_study(ledger, arch, "1.1.D", [5 * E1])
    _add_study(ledger, arch, "1.1.E", [-E0, _mix((1, E0), (0.5, E1))])
    _add_study(ledger, arch, "1.1.F", [E0], bundle=("demo", "0.2.0"))
    yield arch
    ledger.close()


def _pg_has_vector(ledger: Ledger) -> bool:
    with ledger.engine.connect() as conn:
        return conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first() is not None


def test_backend_is_chosen_by_what_the_database_offers(archive: EmbeddingArchive) -> None:
    engine = archive.ledger.engine
    expected = PGVECTOR if engine.dialect.name == "postgresql" and _pg_has_vector(archive.ledger) else EXACT
    assert archive.backend == expected
    assert archive.describe().startswith(expected)


def test_like_an_image_ranks_studies_by_their_best_image_and_paginates(archive: EmbeddingArchive) -> None:
    result = archive.like("1.1.A.1", limit=10)
    assert [(h.study_instance_uid, h.sop_instance_uid) for h in result.hits] == [
        ("1.1.B", "1.1.B.1"), ("1.1.E", "1.1.E.2"), ("1.1.C", "1.1.C.1"), ("1.1.D", "1.1.D.1")]
    expected = [1 / np.sqrt(1.01), 1 / np.sqrt(1.25), 1 / np.sqrt(2), 0.0]
    assert [h.score for h in result.hits] == pytest.approx(expected, abs=1e-5)
    assert [h.rank for h in result.hits] == [1, 2, 3, 4]
    assert {(h.bundle_name, h.bundle_version) for h in result.hits} == {("demo", "0.1.0")}
    assert (result.query, result.query_images, result.backend) == ("image 1.1.A.1", 1, archive.backend)

    pages = [archive.like("1.1.A.1", limit=2, offset=k).hits for k in (0, 2, 4)]
    assert [[h.study_instance_uid for h in page] for page in pages] == [["1.1.B", "1.1.E"], ["1.1.C", "1.1.D"], []]
    assert [h.rank for h in pages[1]] == [3, 4]


def test_like_a_study_queries_with_the_mean_of_its_images(archive: EmbeddingArchive) -> None:
    # query ∝ E0 + 2 E1: C first, then D; either image alone would rank otherwise (E0: B; E1: D)
    _add_study(archive.ledger, archive, "1.1.Q", [E0, 4 * E1, E1])
    result = archive.like("1.1.Q")
    assert [h.study_instance_uid for h in result.hits] == ["1.1.C", "1.1.D", "1.1.E", "1.1.B", "1.1.A"]
    expected = [3 / np.sqrt(10), 2 / np.sqrt(5), 0.8, 1.2 / np.sqrt(1.01 * 5), 1 / np.sqrt(5)]
    assert [h.score for h in result.hits] == pytest.approx(expected, abs=1e-5)
    assert (result.query, result.query_images) == ("study 1.1.Q", 3)


def test_a_rerun_replaces_the_vector_instead_of_adding_one(archive: EmbeddingArchive) -> None:
    with archive.ledger.session() as s:
        d = s.scalars(select(Instance).where(Instance.sop_instance_uid == "1.1.D.1")).one()
        job = Job(study_id=d.study_id, revision=2, state="SUCCEEDED", created_at=utcnow(), attempts=1)
        s.add(job)
        s.flush()
        archive.store(s, job_id=job.id, study_id=d.study_id, bundle_name="demo", bundle_version="0.1.0",
                      vectors=[(d.id, 7 * E0)], now=utcnow())
    with archive.ledger.session() as s:
        rows = s.scalars(select(Embedding).join(Instance).where(Instance.sop_instance_uid == "1.1.D.1")).all()
        assert [(r.bundle_version, r.job_id, r.dim) for r in rows] == [("0.1.0", job.id, DIM)]
        assert np.frombuffer(rows[0].vector, dtype=np.float32) == pytest.approx(E0)
        assert s.scalar(select(func.count()).select_from(Embedding)) == 8  # A2 B1 C1 D1 E2 F1
    hits = archive.like("1.1.A.1").hits
    assert (hits[0].study_instance_uid, hits[0].score) == ("1.1.D", pytest.approx(1.0, abs=1e-6))


def test_versions_are_separate_spaces_and_errors_are_clear(archive: EmbeddingArchive) -> None:
    assert [h.study_instance_uid for h in archive.nearest(E0, "demo", "0.2.0").hits] == ["1.1.F"]
    assert archive.like("1.1.F").hits == []  # alone in its bundle version
    with pytest.raises(UnknownUID, match="1.9.9"):
        archive.like("1.9.9")
    with pytest.raises(BundleMismatch, match=r"bundle 'other'.*demo 0\.1\.0"):
        archive.like("1.1.A", bundle="other")
    with pytest.raises(BundleMismatch, match="3 dimensions"):
        archive.nearest(np.ones(3), "demo", "0.1.0")
    with pytest.raises(SearchError, match="limit"):
        archive.like("1.1.A", limit=0)


def test_pgvector_path_uses_an_hnsw_index_per_dimension(pg_url: str) -> None:
    probe = Ledger(pg_url)
    try:
        with probe.engine.connect() as conn:
            available = conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first()
    finally:
        probe.close()
    if not available:
        pytest.skip("the pgvector extension is not installed on this PostgreSQL server "
                    "(pg_available_extensions has no 'vector'); the exact path is tested on PostgreSQL instead")
    upgrade(pg_url)
    ledger = Ledger(pg_url)
    try:
        arch = EmbeddingArchive(ledger)
        assert arch.backend == PGVECTOR
        _add_study(ledger, arch, "1.1.A", [E0])
        _add_study(ledger, arch, "1.1.B", [_mix((1, E0), (0.1, E1))])
        _add_study(ledger, arch, "1.1.C", [_mix((1, E0), (1, E1)), E1])
        _add_study(ledger, arch, "1.1.D", [E2])
        hits = arch.like("1.1.A", limit=2).hits + arch.like("1.1.A", limit=2, offset=2).hits
        assert [h.study_instance_uid for h in hits] == ["1.1.B", "1.1.C", "1.1.D"]
        assert [h.score for h in hits] == pytest.approx([1 / np.sqrt(1.01), 1 / np.sqrt(2), 0.0], abs=1e-5)
        with ledger.engine.connect() as conn:
            index = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                                 {"n": f"ix_embeddings_pgvec_hnsw_{DIM}"}).scalar()
        assert index is not None and "hnsw" in index and f"dim = {DIM}" in index
    finally:
        ledger.close()
