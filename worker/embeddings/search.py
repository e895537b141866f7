"""Nearest studies to a query vector: exact (numpy over the float32 bytes) or pgvector (HNSW).

Vectors are only compared within one bundle name and version (another version is another
embedding space). A study scores as its best image; the query's own study is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from worker.embeddings.vectors import matrix, pgvector_literal, unit
from worker.ledger import Embedding, Instance, Study

#: pgvector's ``hnsw.ef_search`` ceiling; candidate lists grow up to it.
MAX_EF_SEARCH = 1000
#: Least HNSW candidate list (pgvector's own default is 40). bench/search.py: on isotropic 160-d
#: vectors (the hard case) 40 finds 64% of the true top 10 at 10k stored and 400 finds 99%, for
#: about 10 ms more; on demo-like embeddings every value gives 0.998-1.0.
DEFAULT_EF_SEARCH = 400


class SearchError(ValueError):
    """A search that cannot be answered; the message says why, for the command line."""


class UnknownUID(SearchError):
    pass


class BundleMismatch(SearchError):
    pass


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # cosine similarity of the study's best image to the query
    study_instance_uid: str
    sop_instance_uid: str
    bundle_name: str
    bundle_version: str


@dataclass(frozen=True)
class Query:
    """What is searched for: a unit vector in one bundle version's space."""

    vector: np.ndarray
    bundle_name: str
    bundle_version: str
    exclude_study_id: int | None = None
    description: str = "vector"
    images: int = 0


@dataclass(frozen=True)
class SearchResult:
    backend: str
    query: str
    query_images: int
    bundle_name: str
    bundle_version: str
    limit: int
    offset: int
    hits: list[Hit] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(s: Session, uid: str, bundle: str | None = None, version: str | None = None) -> Query:
    """The query for a Study Instance UID (mean of its images, re-normalised) or a SOP Instance UID.

    Without ``bundle`` the most recently stored bundle version of the query is used; with it,
    that bundle's most recent version (or ``version``).
    """
    study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == uid))
    if study_id is not None:
        kind, where = "study", Embedding.study_id == study_id
    else:
        row = s.execute(select(Instance.id, Instance.study_id).where(Instance.sop_instance_uid == uid)).first()
        if row is None:
            raise UnknownUID(f"{uid} is neither a Study nor a SOP Instance UID known to this ledger")
        kind, where, study_id = "image", Embedding.instance_id == row.id, row.study_id
    stored = s.scalars(select(Embedding).where(where).order_by(Embedding.created_at.desc(), Embedding.id.desc())).all()
    if not stored:
        raise SearchError(f"{kind} {uid} has no stored embeddings (not processed yet, or no eligible image)")
    matching = [e for e in stored if (bundle is None or e.bundle_name == bundle)
                and (version is None or e.bundle_version == version)]
    if not matching:
        have = sorted({f"{e.bundle_name} {e.bundle_version}" for e in stored})
        wanted = (f"bundle {bundle!r}" if bundle else "any bundle") + (f" version {version!r}" if version else "")
        raise BundleMismatch(f"{kind} {uid} has no embeddings from {wanted}; it has: {', '.join(have)}")
    name, ver = matching[0].bundle_name, matching[0].bundle_version
    chosen = [e for e in matching if (e.bundle_name, e.bundle_version) == (name, ver)]
    mean = matrix([e.vector for e in chosen], chosen[0].dim).mean(axis=0)
    return Query(unit(mean), name, ver, study_id, f"{kind} {uid}", len(chosen))


def search(s: Session, backend: str, query: Query, limit: int, offset: int,
           ef_search: int = DEFAULT_EF_SEARCH) -> SearchResult:
    """One page of studies nearest to ``query``, best first (``ef_search``: pgvector's least candidate list)."""
    if limit < 1 or offset < 0:
        raise SearchError("limit must be at least 1 and offset at least 0")
    dim = int(query.vector.size)
    same_bundle = (Embedding.bundle_name == query.bundle_name, Embedding.bundle_version == query.bundle_version)
    if s.scalar(select(Embedding.id).where(*same_bundle, Embedding.dim == dim).limit(1)) is None and (
            dims := set(s.scalars(select(Embedding.dim).distinct().where(*same_bundle)))):
        raise BundleMismatch(f"query vector has {dim} dimensions; bundle {query.bundle_name} "
                             f"{query.bundle_version} stores {', '.join(map(str, sorted(dims)))}")
    wanted = offset + limit
    ranked = _pgvector(s, query, wanted, ef_search) if backend == "pgvector" else _exact(s, query, wanted)
    page = ranked[offset:offset + limit]
    uids = {row.id: (row.sop_instance_uid, row.study_instance_uid) for row in s.execute(
        select(Instance.id, Instance.sop_instance_uid, Study.study_instance_uid)
        .join(Study, Study.id == Instance.study_id)
        .where(Instance.id.in_([instance_id for instance_id, _ in page])))}
    hits = [Hit(offset + n, score, uids[instance_id][1], uids[instance_id][0], query.bundle_name,
                query.bundle_version) for n, (instance_id, score) in enumerate(page, start=1)]
    return SearchResult(backend, query.description, query.images, query.bundle_name, query.bundle_version,
                        limit, offset, hits)


def _candidates(query: Query):  # type: ignore[no-untyped-def]
    conditions = [Embedding.bundle_name == query.bundle_name, Embedding.bundle_version == query.bundle_version,
                  Embedding.dim == int(query.vector.size)]
    if query.exclude_study_id is not None:
        conditions.append(Embedding.study_id != query.exclude_study_id)
    return conditions


def _exact(s: Session, query: Query, wanted: int) -> list[tuple[int, float]]:
    """(instance id, score) of each study's best image, best first: every vector scored in numpy."""
    table = Embedding.__table__
    rows = s.connection().execute(  # Core, not ORM: rows as plain tuples, several times faster
        select(table.c.instance_id, table.c.study_id, table.c.vector).where(*_candidates(query)).order_by(table.c.id)
    ).all()
    if not rows:
        return []
    instance_ids, study_ids, blobs = zip(*rows, strict=True)
    scores = matrix(list(blobs), query.vector.size) @ query.vector
    instances, studies = np.array(instance_ids), np.array(study_ids)
    order = np.argsort(-scores, kind="stable")
    _, first = np.unique(studies[order], return_index=True)  # each study's best row, as positions in order
    best = order[np.sort(first)][:wanted]
    return [(int(instances[i]), float(scores[i])) for i in best]


def _pgvector(s: Session, query: Query, wanted: int, ef_search: int) -> list[tuple[int, float]]:
    """Like :func:`_exact` through the HNSW index (approximate), widening the candidate list
    until it covers ``wanted`` studies or the archive runs out."""
    dim = int(query.vector.size)  # literal, so the planner matches the per-dimension partial index
    distance = f"pgvec::vector({dim}) <=> CAST(:q AS vector({dim}))"
    exclude = "AND study_id <> :exclude" if query.exclude_study_id is not None else ""
    sql = text(f"SELECT instance_id, study_id, 1 - ({distance}) AS score FROM embeddings "
               f"WHERE dim = {dim} AND bundle_name = :name AND bundle_version = :version {exclude} "
               f"ORDER BY {distance} LIMIT :k")
    params = {"q": pgvector_literal(query.vector), "name": query.bundle_name,
              "version": query.bundle_version, "exclude": query.exclude_study_id}
    k = max(ef_search, 4 * wanted)
    while True:
        s.execute(text(f"SET LOCAL hnsw.ef_search = {min(k, MAX_EF_SEARCH)}"))
        rows = s.execute(sql, {**params, "k": k}).all()
        best: dict[int, tuple[int, float]] = {}
        for row in rows:  # already best first
            best.setdefault(row.study_id, (row.instance_id, float(row.score)))
        if len(best) >= wanted or len(rows) < k:
            return list(best.values())[:wanted]
        k *= 4
