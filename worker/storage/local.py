"""``PLEURA_STORAGE=local``: bytes stay where they were written (spool, outbox) on this host."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session


class LocalStorage:
    shared = False

    def keep(self, s: Session, key: str, path: Path, sha256: str | None = None) -> None:
        """Nothing to do: the spool and the outbox write atomically and durably themselves."""

    def fetch(self, key: str, recorded: str) -> Path:
        return Path(recorded)

    def done(self, path: Path) -> None:
        """The spool and outbox files stay."""

    def remove(self, s: Session, key: str, recorded: str) -> None:
        Path(recorded).unlink(missing_ok=True)
