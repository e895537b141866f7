"""Association limits and timeouts on the real listener (started as `pleura listen` starts it)."""

from __future__ import annotations

import json
import select as io_select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicom_node.scp import StorageSCP
from tests.figures import save
from tests.support import free_port, wait_for
from worker.cli.processes import _start_listener
from worker.ledger import Association, Event
from worker.ledger.db import Ledger, upgrade
from worker.runtime import Runtime
from worker.settings import Settings


@contextmanager
def listener(pg_url: str, tmp_path: Path, **overrides: Any) -> Iterator[tuple[StorageSCP, Ledger]]:
    """The listener of `pleura listen` on a free local port, recording in ``pg_url``."""
    upgrade(pg_url)
    ledger = Ledger(pg_url)
    settings = Settings(data_dir=tmp_path / "var", database_url=pg_url, dicom_host="127.0.0.1",
                        dicom_port=free_port(), min_free_disk_mb=1, **overrides)
    scp = _start_listener(Runtime(settings, ledger, lambda *_: None), None)
    try:
        yield scp, ledger
    finally:
        scp.stop()
        ledger.close()


def rejections(ledger: Ledger, at_least: int = 0) -> list[dict]:
    """The ``association_rejected`` events, waiting until there are ``at_least`` of them (the
    listener records a rejection after sending it, so a peer may learn of it first)."""

    def read() -> list[dict]:
        with ledger.session() as s:
            rows = s.scalars(select(Event).where(Event.kind == "association_rejected").order_by(Event.id)).all()
            return [json.loads(e.detail) for e in rows]

    if at_least == 0:
        return read()
    return wait_for(lambda: events if len(events := read()) >= at_least else None, 15,
                    f"{at_least} association_rejected events")


def echo_ae(calling: str = "MODALITY") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def closed_by_peer(sock: socket.socket, within: float) -> float:
    """Seconds until the peer closed ``sock`` (EOF or reset); fails if it stays open ``within`` seconds."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError as exc:
        raise AssertionError(f"the server kept the connection open for {within} s") from exc
    return time.monotonic() - start


def test_over_the_limit_is_rejected_with_a_reason_and_room_frees_up(pg_url: str, tmp_path: Path) -> None:
    limit = 3
    with listener(pg_url, tmp_path, max_associations=limit) as (scp, ledger):
        host, port = scp.address
        held = [echo_ae().associate(host, port, ae_title="PLEURA") for _ in range(limit)]
        assert all(a.is_established for a in held)
        extra = echo_ae().associate(host, port, ae_title="PLEURA")
        assert extra.is_rejected and not extra.is_established
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
        assert all(a.is_established and a.send_c_echo().Status == 0 for a in held)  # the others are untouched
        (event,) = rejections(ledger, at_least=1)
        assert event["calling_ae"] == "MODALITY" and event["peer_host"] == "127.0.0.1"
        assert event["reason"] == f"association limit reached ({limit} of {limit} open)"

        held.pop().release()

        def admitted() -> bool:
            assoc = echo_ae().associate(host, port, ae_title="PLEURA")
            established = assoc.is_established
            if established:
                assoc.release()
            return established

        wait_for(admitted, 20, "a freed slot to admit a new association")
        for assoc in held:
            assoc.release()
        recorded = len(rejections(ledger))
    save("security-association-limit", {"max_associations": limit, "held_open": limit, "extra_tried": 1,
                                        "extra_rejected": int(extra.is_rejected), "rejection_events": recorded})


def test_idle_association_is_aborted_after_the_network_timeout(pg_url: str, tmp_path: Path) -> None:
    timeout = 1.5
    with listener(pg_url, tmp_path, network_timeout_seconds=timeout) as (scp, ledger):
        assoc = echo_ae().associate(*scp.address, ae_title="PLEURA")
        assert assoc.is_established
        start = time.monotonic()
        wait_for(lambda: assoc.is_aborted, 30, "the server to abort the idle association", interval=0.05)
        took = time.monotonic() - start
        assert took >= timeout * 0.9

        def end_reason() -> str | None:
            with ledger.session() as s:
                return s.scalars(select(Association.end_reason)).one_or_none()

        assert wait_for(end_reason, 10, "the end to be recorded") == "aborted: network timeout"
    save("security-idle-timeout", {"network_timeout_s": timeout, "aborted_after_s": round(took, 2)})


def _trickle(sock: socket.socket, data: bytes, every: float) -> tuple[int, float]:
    """Send ``data`` a byte at a time until the peer closes; return (bytes sent, seconds until closed)."""
    start = time.monotonic()
    for sent, byte in enumerate(data):
        try:
            sock.sendall(bytes([byte]))
            readable, _, _ = io_select.select([sock], [], [], every)
            if readable and not sock.recv(4096):
                return sent + 1, time.monotonic() - start
        except (BrokenPipeError, ConnectionResetError):
            return sent, time.monotonic() - start
    raise AssertionError(f"the server kept a trickling peer for {time.monotonic() - start:.0f} s")


def test_silent_and_slow_loris_peers_are_dropped_after_the_acse_timeout(pg_url: str, tmp_path: Path) -> None:
    timeout = 1.5
    with listener(pg_url, tmp_path, acse_timeout_seconds=timeout) as (scp, ledger):
        silent = socket.create_connection(scp.address)
        silent_closed = closed_by_peer(silent, within=timeout + 15)
        silent.close()

        # The start of a real A-ASSOCIATE-RQ (type 0x01, 2 KB declared), then zeros, 5 bytes a second.
        pdu = struct.pack(">BBLHH", 0x01, 0x00, 2048, 1, 0) + b"PLEURA".ljust(16) + bytes(2048)
        loris = socket.create_connection(scp.address)
        sent, loris_closed = _trickle(loris, pdu[:100], every=0.2)
        loris.close()
        assert timeout * 0.9 <= loris_closed < timeout + 15

        assoc = echo_ae().associate(*scp.address, ae_title="PLEURA")  # the listener still serves
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    save("security-acse-timeout", {"acse_timeout_s": timeout, "silent_closed_after_s": round(silent_closed, 2),
                                   "slow_loris_closed_after_s": round(loris_closed, 2),
                                   "slow_loris_bytes_sent_before_close": sent})


def test_peer_stalled_inside_a_pdu_is_dropped_after_the_network_timeout(pg_url: str, tmp_path: Path) -> None:
    timeout = 1.5
    with listener(pg_url, tmp_path, network_timeout_seconds=timeout) as (scp, ledger):
        assoc = echo_ae().associate(*scp.address, ae_title="PLEURA")
        assert assoc.is_established
        # Half a P-DATA-TF: 1 KB declared, 16 bytes sent, then nothing.
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0x00, 1024) + bytes(16))
        start = time.monotonic()

        def end_reason() -> str | None:
            with ledger.session() as s:
                return s.scalars(select(Association.end_reason)).one_or_none()

        reason = wait_for(end_reason, timeout + 20, "the server to drop the stalled association", interval=0.05)
        took = time.monotonic() - start
        assert reason.startswith("aborted") and took >= timeout * 0.9
        assoc.abort()
    save("security-stalled-pdu", {"network_timeout_s": timeout, "dropped_after_s": round(took, 2)})
