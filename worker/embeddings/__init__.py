"""The embedding archive: every processed image's embedding, and semantic search over them."""

from worker.embeddings.archive import EXACT, PGVECTOR, EmbeddingArchive
from worker.embeddings.search import BundleMismatch, Hit, SearchError, SearchResult, UnknownUID
from worker.embeddings.text import NoTextEncoder, text_vector

__all__ = [
    "EXACT",
    "PGVECTOR",
    "BundleMismatch",
    "EmbeddingArchive",
    "Hit",
    "NoTextEncoder",
    "SearchError",
    "SearchResult",
    "UnknownUID",
    "text_vector",
]
