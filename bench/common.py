"""Pieces the benchmarks share: free ports, processes with a log and their ports, throw-away
PostgreSQL databases and RabbitMQ virtual hosts, the host record."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``args`` running with its output in ``log``, in a session of its own; SIGTERM to the whole group
    afterwards (a listener of several processes included), SIGKILL after 20 s."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until 127.0.0.1:``port`` accepts connections; fails with the end of ``log`` if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited early ({proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not open after {timeout} s")


@contextmanager
def postgres_db(admin_url: str, prefix: str = "pleura_bench") -> Iterator[str]:
    """A fresh database on an existing server, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def rabbitmq_vhost(host: str) -> Iterator[str]:
    """A fresh virtual host on the local RabbitMQ node (guest allowed), deleted afterwards."""
    name = f"pleura_bench_{uuid.uuid4().hex[:10]}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
        yield f"amqp://guest:guest@{host}/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60, check=False)


def host() -> dict[str, Any]:
    """The machine a benchmark ran on, with its load when it started."""
    return {"name": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average_1m_at_start": os.getloadavg()[0]}
