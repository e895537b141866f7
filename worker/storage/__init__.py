"""Where instance and result bytes live (``PLEURA_STORAGE``).

- ``local`` (the default): the spool and the outbox of the host that wrote them. Listener and
  workers share ``PLEURA_DATA_DIR``: one host, or a shared filesystem.
- ``database``: 1 MiB ``blob_chunks`` rows in the ledger's own database, kept in the transaction
  that records the instance (before the C-STORE is answered) or the result. Every host that
  reaches the ledger reaches the bytes; each use reads a private copy into
  ``<data dir>/fetched/`` and removes it afterwards.

Callers name bytes by key (:func:`instance_key`, :func:`output_key`) and ask for a local path;
the recorded path (spool, outbox) is where they were written, used as is by ``local``.
"""

from __future__ import annotations

from worker.storage.base import Storage, instance_key, output_key
from worker.storage.database import DatabaseStorage
from worker.storage.local import LocalStorage

__all__ = ["DatabaseStorage", "LocalStorage", "Storage", "instance_key", "output_key"]
