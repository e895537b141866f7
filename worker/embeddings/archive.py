"""Storing embeddings and choosing the search backend: pgvector where migration 0002 could add
its column (PostgreSQL with the ``vector`` extension), exact numpy search everywhere else."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cached_property

import numpy as np
from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from engines import Bundle
from worker.embeddings import search
from worker.embeddings.text import text_vector
from worker.embeddings.vectors import pgvector_literal, unit
from worker.ledger import Embedding
from worker.ledger.db import Ledger

PGVECTOR = "pgvector"
EXACT = "exact"
_REPLACED = ("study_id", "job_id", "dim", "vector", "created_at")


class EmbeddingArchive:
    """``store`` in the pipeline's transaction; ``like``, ``nearest`` and ``text`` for search."""

    def __init__(self, ledger: Ledger, ef_search: int = search.DEFAULT_EF_SEARCH) -> None:
        self.ledger = ledger
        self.ef_search = ef_search

    @cached_property
    def backend(self) -> str:
        """``pgvector`` when the embeddings table has the pgvector column, else ``exact``."""
        if self.ledger.engine.dialect.name != "postgresql":
            return EXACT
        with self.ledger.engine.connect() as conn:
            column = conn.execute(text(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = 'embeddings' AND column_name = 'pgvec'")).first()
        return PGVECTOR if column else EXACT

    def describe(self) -> str:
        """The backend and why it was chosen, for people."""
        if self.backend == PGVECTOR:
            return (f"pgvector: cosine distance (<=>) with an HNSW index per dimension (approximate, "
                    f"ef_search >= {self.ef_search})")
        if self.ledger.engine.dialect.name == "postgresql":
            return "exact: PostgreSQL without the vector extension, numpy over float32 arrays"
        return f"exact: {self.ledger.engine.dialect.name}, numpy over float32 arrays"

    def store(self, s: Session, *, job_id: int, study_id: int, bundle_name: str, bundle_version: str,
              vectors: Sequence[tuple[int, np.ndarray]], now: datetime) -> None:
        """Upsert one unit vector per (instance id, vector): a re-run replaces, never duplicates."""
        if not vectors:
            return
        units = [(instance_id, unit(v)) for instance_id, v in vectors]
        insert = (postgresql if s.get_bind().dialect.name == "postgresql" else sqlite).insert(Embedding)
        upsert = insert.on_conflict_do_update(
            index_elements=["instance_id", "bundle_name", "bundle_version"],
            set_={column: insert.excluded[column] for column in _REPLACED})
        s.execute(upsert, [
            {"study_id": study_id, "instance_id": instance_id, "job_id": job_id, "bundle_name": bundle_name,
             "bundle_version": bundle_version, "dim": v.size, "vector": v.tobytes(), "created_at": now}
            for instance_id, v in units
        ])
        if self.backend == PGVECTOR:
            s.execute(text("UPDATE embeddings SET pgvec = CAST(:v AS vector) WHERE instance_id = :i "
                           "AND bundle_name = :name AND bundle_version = :version"),
                      [{"v": pgvector_literal(v), "i": instance_id, "name": bundle_name, "version": bundle_version}
                       for instance_id, v in units])
            for dim in {v.size for _, v in units}:
                _ensure_hnsw_index(s, dim)

    def like(self, uid: str, limit: int = 10, offset: int = 0, bundle: str | None = None,
             version: str | None = None) -> search.SearchResult:
        """Studies nearest to a study (mean of its images) or an image, its own study left out."""
        with self.ledger.session() as s:
            return search.search(s, self.backend, search.resolve(s, uid, bundle, version), limit, offset,
                                 self.ef_search)

    def nearest(self, vector: np.ndarray, bundle_name: str, bundle_version: str, limit: int = 10,
                offset: int = 0) -> search.SearchResult:
        """Studies nearest to ``vector`` in the space of one bundle version."""
        query = search.Query(unit(vector), bundle_name, bundle_version)
        with self.ledger.session() as s:
            return search.search(s, self.backend, query, limit, offset, self.ef_search)


    def text(self, bundle: Bundle, query: str, limit: int = 10, offset: int = 0) -> search.SearchResult:
        """Studies nearest to a text, in the space of ``bundle`` (one with a text side)."""
        return self.nearest(text_vector(bundle, query), bundle.name, bundle.version, limit, offset)


def _ensure_hnsw_index(s: Session, dim: int) -> None:
    """pgvector indexes fixed dimensions only: one partial expression index per ``dim``, made once."""
    name = f"ix_embeddings_pgvec_hnsw_{dim}"
    if s.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None:
        return
    s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:n))"), {"n": name})  # two first jobs at once
    if s.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar() is None:
        s.execute(text(f"CREATE INDEX {name} ON embeddings USING hnsw ((pgvec::vector({dim})) vector_cosine_ops) "
                       f"WHERE dim = {dim}"))
