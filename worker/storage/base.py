"""The storage interface that the listener, the pipeline, delivery and notification share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session


def instance_key(sha256: str) -> str:
    """A received instance's bytes, by content (a resend of the same bytes is the same blob)."""
    return f"sha256:{sha256}"


def output_key(sop_instance_uid: str) -> str:
    """A result object's bytes (SR, SC), by its SOP Instance UID."""
    return f"sop:{sop_instance_uid}"


class Storage(Protocol):
    #: True when other hosts can read what this host keeps (no shared filesystem needed)
    shared: bool

    def keep(self, s: Session, key: str, path: Path, sha256: str | None = None) -> None:
        """Make the bytes at ``path`` durable under ``key`` within ``s``'s transaction (``sha256``: their
        digest, when the caller already computed it)."""

    def fetch(self, key: str, recorded: str) -> Path:
        """A path on this host holding the bytes of ``key`` (``recorded``: where they were written)."""

    def done(self, path: Path) -> None:
        """The caller no longer needs a path :meth:`fetch` gave (a fetched copy is removed)."""

    def remove(self, s: Session, key: str, recorded: str) -> None:
        """Remove the bytes of ``key`` for good (retention), within ``s``'s transaction."""


@contextmanager
def fetched(storage: Storage, key: str, recorded: str) -> Iterator[Path]:
    """:meth:`Storage.fetch` for the length of a block."""
    path = storage.fetch(key, recorded)
    try:
        yield path
    finally:
        storage.done(path)
