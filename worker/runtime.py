"""What one Pleura process holds: settings, the ledger, the spool, loaded engines, a publisher."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from engines import Engine, load
from engines.batching import DynamicBatcher
from worker.bundles import catalogue
from worker.cpu import CpuPool
from worker.ledger.db import Ledger
from worker.observability.metrics import observe_batch
from worker.settings import Settings
from worker.storage import DatabaseStorage, LocalStorage, Storage

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    settings: Settings
    ledger: Ledger
    publish: Callable[[str, int], bool]
    _engines: dict[str, Engine] = field(default_factory=dict)
    _batchers: dict[str, DynamicBatcher] = field(default_factory=dict)
    _cpu: CpuPool | None = None
    _storage: Storage | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def _key(self) -> str:
        return f"{self.settings.model}|{self.settings.backend}"

    def engine(self) -> Engine:
        """The configured model, loaded once per process (the parity gate runs at load)."""
        with self._lock:
            key = self._key
            if key not in self._engines:
                bundle = catalogue.bundle(self.settings, self.settings.model)
                engine = load(bundle, backend=self.settings.backend)
                log.info("model loaded", bundle=bundle.name, version=bundle.version, backend=engine.backend,
                         selection=engine.selection_reason)
                self._engines[key] = engine
            return self._engines[key]

    def loaded_engine(self) -> Engine | None:
        """The configured model if :meth:`engine` has loaded it; never loads it (readiness probes)."""
        return self._engines.get(self._key)

    def batcher(self) -> DynamicBatcher:
        """The dynamic batcher in front of :meth:`engine`: one inference thread per loaded engine."""
        engine = self.engine()
        with self._lock:
            key = self._key
            if key not in self._batchers:
                self._batchers[key] = DynamicBatcher(
                    engine, max_batch=self.settings.batch_max, max_wait_ms=self.settings.batch_max_wait_ms,
                    on_batch=observe_batch,
                )
            return self._batchers[key]

    def cpu(self) -> CpuPool:
        """This process's pool for decoding and result building (worker.cpu), started on first use."""
        with self._lock:
            if self._cpu is None:
                self._cpu = CpuPool(self.settings.cpu_processes)
            return self._cpu

    def storage(self) -> Storage:
        """Where this process keeps and finds instance and result bytes (``PLEURA_STORAGE``)."""
        with self._lock:
            if self._storage is None:
                self._storage = open_storage(self.settings, self.ledger)
            return self._storage


def open_storage(settings: Settings, ledger: Ledger) -> Storage:
    """The configured storage; ValueError when it cannot work with this ledger."""
    if settings.storage == "database":
        return DatabaseStorage(ledger, settings.fetch_dir, settings.max_database_mb)
    return LocalStorage()


_current: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("no Pleura runtime in this process; start it with the pleura CLI")
    return _current
