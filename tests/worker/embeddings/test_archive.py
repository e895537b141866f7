"""The embedding archive on SQLite, the shared PostgreSQL (exact search: no pgvector there) and a
private PostgreSQL 16 with pgvector (tests/pgvector.py): store, replace, search with vectors whose
neighbour order is known by construction; the HNSW index, its use by the planner, and its recall."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, event, func, select, text

from tests.pgvector import pgvector_postgres
from tests.reliability.services import PrivatePostgres
from tests.worker.archived import archive_studies
from worker.embeddings import EXACT, PGVECTOR, BundleMismatch, EmbeddingArchive, SearchError, UnknownUID
from worker.embeddings.search import Query, search
from worker.embeddings.vectors import unit
from worker.ledger import Embedding, Instance, Job
from worker.ledger.db import Ledger, upgrade, utcnow

DIM = 16
E0, E1, E2 = np.eye(DIM, dtype=np.float32)[:3]


def _add_study(ledger: Ledger, archive: EmbeddingArchive, name: str, vectors: list[np.ndarray],
               bundle: tuple[str, str] = ("demo", "0.1.0")) -> None:
    """Study ``name`` with one instance (``name.1``, ``name.2``...) per vector, stored by one job."""
    archive_studies(ledger, {name: vectors}, bundle)


def _mix(*parts: tuple[float, np.ndarray]) -> np.ndarray:
    return sum(w * v for w, v in parts)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def pgvector_cluster() -> Iterator[PrivatePostgres]:
    """One private PostgreSQL 16 + pgvector cluster for this module's pgvector tests (about 1 s to start)."""
    pg = pgvector_postgres()
    yield pg
    pg.close()


@pytest.fixture
def pgvector_url(pgvector_cluster: PrivatePostgres) -> Iterator[str]:
    """A fresh, empty database on that cluster, dropped afterwards."""
    name = f"pleura_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pgvector_cluster.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield pgvector_cluster.url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "pgvector"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite, the shared PostgreSQL (exact search unless it has pgvector) and PostgreSQL 16 with pgvector."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "pgvector_url")


@pytest.fixture
def archive(ledger_url: str) -> Iterator[EmbeddingArchive]:
    """An archive where, for a query along E0, studies rank B > E > C > D by construction.

    Vectors are stored unnormalised (the archive normalises). Cosine with E0: B 0.995,
    C 0.707, D 0, E's best image 0.894 (its other image -1). A holds the query image A.1 and a
    near-copy A.2; F is an exact copy of E0 but from another bundle version.
    """
    upgrade(ledger_url)
    ledger = Ledger(ledger_url)
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


def test_backend_is_chosen_by_what_the_database_offers(archive: EmbeddingArchive,
                                                       request: pytest.FixtureRequest) -> None:
    kind = request.node.callspec.params["ledger_url"]
    expected = {"sqlite": EXACT, "pgvector": PGVECTOR}.get(kind) or (
        PGVECTOR if _pg_has_vector(archive.ledger) else EXACT)  # the shared server has no pgvector today
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


def _search_statements(ledger: Ledger, *calls: Callable[[], object]) -> list[tuple[str, dict]]:
    """The pgvector search statements (SQL, parameters) that ``calls`` send to the server."""
    seen: list[tuple[str, dict]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if "<=>" in statement:
            seen.append((statement, parameters))

    event.listen(ledger.engine, "before_cursor_execute", record)
    try:
        for call in calls:
            call()
    finally:
        event.remove(ledger.engine, "before_cursor_execute", record)
    return seen


def test_pgvector_migration_adds_the_extension_the_column_and_an_hnsw_index_per_dimension(
        pgvector_url: str) -> None:
    upgrade(pgvector_url)
    ledger = Ledger(pgvector_url)
    try:
        with ledger.engine.connect() as conn:
            assert conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
            assert conn.execute(text("SELECT udt_name FROM information_schema.columns WHERE table_name = 'embeddings' "
                                     "AND column_name = 'pgvec'")).scalar() == "vector"
        arch = EmbeddingArchive(ledger)
        assert arch.backend == PGVECTOR
        _add_study(ledger, arch, "1.1.A", [E0, E1])
        _add_study(ledger, arch, "1.1.B", [np.ones(8)], bundle=("small", "1"))
        with ledger.engine.connect() as conn:
            indexes = dict(conn.execute(text("SELECT indexname, indexdef FROM pg_indexes "
                                             "WHERE tablename = 'embeddings' AND indexdef LIKE '%hnsw%'")).all())
            stored = conn.execute(text("SELECT vector_dims(pgvec) FROM embeddings ORDER BY id")).scalars().all()
        assert stored == [DIM, DIM, 8]
        assert sorted(indexes) == [f"ix_embeddings_pgvec_hnsw_{DIM}", "ix_embeddings_pgvec_hnsw_8"]
        for dim in (DIM, 8):
            assert (f"USING hnsw (((pgvec)::vector({dim})) vector_cosine_ops) WHERE (dim = {dim})"
                    in indexes[f"ix_embeddings_pgvec_hnsw_{dim}"])
    finally:
        ledger.close()


def test_pgvector_search_uses_the_hnsw_index_and_finds_the_exact_top_10(pgvector_url: str) -> None:
    """400 random 160-d vectors (the demo bundle's dimension), one study each, 20 random queries."""
    dim, k = 160, 10
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(400, dim)).astype(np.float32)
    names = [f"1.2.{n}" for n in range(len(vectors))]
    upgrade(pgvector_url)
    ledger = Ledger(pgvector_url)
    try:
        archive_studies(ledger, {name: [v] for name, v in zip(names, vectors, strict=True)})
        with ledger.engine.connect() as conn:
            conn.execute(text("ANALYZE embeddings"))  # as autovacuum would; a table never analysed looks empty
            conn.commit()
        # ef_search 40, so the candidate list (LIMIT) is a tenth of the table: with the default 400
        # the planner rightly scans all 400 rows instead (exact, and cheaper at this size)
        narrow = EmbeddingArchive(ledger, ef_search=40)
        statements = _search_statements(ledger, lambda: narrow.like("1.2.0"),
                                        lambda: narrow.nearest(vectors[1], "demo", "0.1.0"))
        assert len(statements) == 2
        with ledger.engine.connect() as conn:
            for sql, params in statements:
                plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + sql, params).scalars())
                assert f"Index Scan using ix_embeddings_pgvec_hnsw_{dim} on embeddings" in plan, plan

        units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        recalls = []
        for q in rng.normal(size=(20, dim)):
            cosine = units @ unit(q)
            truth = [names[i] for i in np.argsort(-cosine)[:k]]
            with ledger.session() as s:
                exact = search(s, EXACT, Query(unit(q), "demo", "0.1.0"), k, 0).hits
            assert [h.study_instance_uid for h in exact] == truth
            approximate = narrow.nearest(q, "demo", "0.1.0", limit=k).hits  # through the HNSW index
            assert [h.score for h in approximate] == pytest.approx(
                [cosine[names.index(h.study_instance_uid)] for h in approximate], abs=1e-5)
            recalls.append(len({h.study_instance_uid for h in approximate} & set(truth)) / k)
        print(f"pgvector HNSW recall@{k} against exact search, 400 x {dim}-d, 20 queries: "
              f"mean {np.mean(recalls):.3f}, min {min(recalls):.1f}")
        assert np.mean(recalls) >= 0.9
    finally:
        ledger.close()
