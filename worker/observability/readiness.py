"""``/readyz``: can this process do its work now? Each check answers within a few seconds.

``database`` (all roles): ``SELECT 1``. ``broker`` (all roles): a connection to the configured
broker; the embedded in-process broker is always ready. ``spool`` (roles that listen): free
space above ``PLEURA_MIN_FREE_DISK_MB``. ``model`` (roles that process): the engine is loaded
and passed its parity gate (the probe never loads it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kombu import Connection
from sqlalchemy import Engine, create_engine, text

from worker.settings import Settings
from worker.web.server import Handler, Response

TIMEOUT_SECONDS = 2


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def probe_engine(url: str) -> Engine:
    """A small engine of its own for probes and scrapes, with short timeouts, apart from the ledger's pool."""
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": TIMEOUT_SECONDS, "check_same_thread": False})
    return create_engine(url, pool_size=1, max_overflow=2, pool_pre_ping=True, connect_args={
        "connect_timeout": TIMEOUT_SECONDS, "options": f"-c statement_timeout={TIMEOUT_SECONDS * 1000}"})


def database(engine: Engine) -> Check:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means not ready; its first line says why
        return Check("database", False, _reason(exc))
    return Check("database", True, f"{engine.dialect.name} answered")


def broker(settings: Settings) -> Check:
    if settings.embedded_broker:
        return Check("broker", True, "embedded (in-process)")
    try:
        with Connection(settings.effective_broker_url, connect_timeout=TIMEOUT_SECONDS) as conn:
            conn.ensure_connection(max_retries=0, timeout=TIMEOUT_SECONDS)
    except Exception as exc:
        return Check("broker", False, _reason(exc))
    return Check("broker", True, f"{settings.effective_broker_url.split('://')[0]} answered")


def spool(settings: Settings) -> Check:
    folder = settings.spool_dir
    while not folder.exists() and folder != folder.parent:  # not created yet: the disk it will be on
        folder = folder.parent
    free_mb = shutil.disk_usage(Path(folder)).free // (1024 * 1024)
    return Check("spool", free_mb > settings.min_free_disk_mb,
                 f"{free_mb} MB free, minimum {settings.min_free_disk_mb} MB")


def model(rt: Any) -> Check:
    engine = rt.loaded_engine()
    if engine is None:
        return Check("model", False, "not loaded")
    parity = engine.parity
    name = f"{engine.bundle.name} {engine.bundle.version} on {engine.backend}"
    if parity is None or not parity.passed:
        return Check("model", False, f"{name}: parity gate not passed")
    return Check("model", True, f"{name}: parity {parity.describe()}")


def checks_for(role: str, rt: Any, engine: Engine) -> list[Callable[[], Check]]:
    """The checks of a ``serve``, ``listen`` or ``worker`` process."""
    settings: Settings = rt.settings
    checks: list[Callable[[], Check]] = [lambda: database(engine), lambda: broker(settings)]
    if role in ("serve", "listen"):
        checks.append(lambda: spool(settings))
    if role in ("serve", "worker"):
        checks.append(lambda: model(rt))
    return checks


def page(checks: list[Callable[[], Check]]) -> Handler:
    """200 when every check passes, else 503; the body lists them as JSON."""

    def handler(_query: object) -> Response:
        results = [check() for check in checks]
        ready = all(r.ok for r in results)
        body = json.dumps({"ready": ready, "checks": [asdict(r) for r in results]}, indent=1) + "\n"
        return Response(200 if ready else 503, "application/json", body.encode())

    return handler


def _reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else 'no detail'}"
