"""Leases and retries: who holds a ledger row's work and until when, and when a failed try is tried again.

A lease is owned by ``host:name:pid`` (:func:`owner`). It is certainly dead when its owner ran on
this host and its process is gone, or had this process's pid (a container restarted), or carried
the ``--name`` this worker was explicitly given (the same worker restarted, perhaps on another
host): :mod:`worker.assemble.recovery` takes those back at start. Deliveries and RIS
notifications share one claim-then-retry cycle (:func:`claimed`, :func:`retry_or_fail`): a try
claims a due row with a conditional UPDATE (a message sent twice does the work once), and a
failed try backs off, doubling up to a cap, until the delivery horizon.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session

from worker.ledger import Delivery, Notification
from worker.ledger.db import Ledger, utcnow
from worker.ledger.models import OutboundState
from worker.settings import Settings


@dataclass(frozen=True)
class Identity:
    """Who holds a lease: this host, a process name (``serve``, ``worker-NAME``), this pid."""

    host: str
    name: str
    pid: int
    explicit_name: bool = False

    def __str__(self) -> str:
        return f"{self.host}:{self.name}:{self.pid}"

    def is_predecessor(self, lease_owner: str) -> bool:
        """True when ``lease_owner`` is certainly a dead earlier process (see the module's text)."""
        if lease_owner == str(self):
            return False
        parts = lease_owner.rsplit(":", 2)
        host, name = parts[0], parts[1] if len(parts) == 3 else None
        try:
            pid = int(parts[-1])
        except ValueError:
            return False
        if host == self.host:
            return pid == self.pid or not _alive(pid)
        return self.explicit_name and name == self.name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_identity = Identity(socket.gethostname(), "pleura", os.getpid())


def owner() -> str:
    """This process's lease owner string."""
    return str(_identity)


def held_by_the_dead(holder: str) -> bool:
    """True when ``holder`` (an :func:`owner` string) is certainly a dead predecessor of this process."""
    return _identity.is_predecessor(holder)


def set_identity(name: str, explicit: bool = False) -> Identity:
    """Name this process (``serve``, ``worker-NAME``) for its leases; call before it claims anything."""
    global _identity
    _identity = Identity(socket.gethostname(), name, os.getpid(), explicit)
    return _identity


def identity() -> Identity:
    """This process's identity (:func:`set_identity`)."""
    return _identity


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """Delay after the ``attempts``-th failed try: doubling from the first delay, capped."""
    return min(settings.delivery_backoff_seconds * 2 ** min(attempts - 1, 60), settings.delivery_backoff_max_seconds)


def claim(s: Session, row: type[Delivery] | type[Notification], row_id: int, lease_seconds: float) -> bool:
    """Take row ``row_id`` for one try if it is due (``PENDING`` and its time has come) or its lease
    expired (``SENDING``); True when this process won it. Counts the try."""
    now = utcnow()
    return bool(s.execute(
        update(row)
        .where(row.id == row_id,
               or_(and_(row.state == OutboundState.PENDING, row.next_attempt_at <= now),
                   and_(row.state == OutboundState.SENDING, row.lease_expires_at < now)))
        .values(state=OutboundState.SENDING, attempts=row.attempts + 1, last_attempt_at=now,
                lease_owner=owner(), lease_expires_at=now + timedelta(seconds=lease_seconds))
    ).rowcount)


Row = TypeVar("Row", Delivery, Notification)
Read = TypeVar("Read")


def claimed(ledger: Ledger, row: type[Row], row_id: int, lease_seconds: float,
            read: Callable[[Session, Row], Read]) -> Read | None:
    """The start of one try: :func:`claim` the row and, in the same transaction, ``read`` from it what the
    try needs (the transaction ends before anything is sent). None when this process did not win it."""
    with ledger.session() as s:
        if not claim(s, row, row_id, lease_seconds):
            return None
        found = s.get(row, row_id)
        assert found is not None
        return read(s, found)


class Outbound(Protocol):
    """A delivery or notification row, as :func:`retry_or_fail` changes it."""

    state: str
    attempts: int
    next_attempt_at: datetime | None
    published_at: datetime | None


def retry_or_fail(row: Outbound, settings: Settings, started: datetime, refused: bool) -> float | None:
    """After a failed try: the seconds until the next one, with ``row`` set ``PENDING`` for then (the last
    try falls on the horizon); None with ``row`` set ``FAILED`` when the peer ``refused`` for good or
    the delivery horizon, counted from ``started``, has passed."""
    now = utcnow()
    deadline = started + timedelta(seconds=settings.delivery_horizon_seconds)
    if refused or now >= deadline:
        row.state = OutboundState.FAILED
        return None
    backoff = backoff_seconds(settings, row.attempts)
    row.state, row.published_at = OutboundState.PENDING, None
    row.next_attempt_at = min(now + timedelta(seconds=backoff), deadline)
    return backoff
