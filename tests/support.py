"""Helpers for tests: paths to the shared real data, service URLs, ports, tools."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PLEURA_SHARED_DATA", ROOT.parent / "shared" / "data"))
REAL_CR = SHARED_DATA / "dicom" / "RG1_J2KI.dcm"
NIH = SHARED_DATA / "nih-cxr14-sample"
PG_ADMIN_URL = os.environ.get("PLEURA_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
#: The machine's shared RabbitMQ and Redis. Tests get them through the ``amqp_url`` and ``broker_url``
#: fixtures, which give each test process (pytest-xdist worker) a vhost / database of its own
#: (:func:`worker_amqp_url`, :func:`claim_redis_url`): Celery's queue names are fixed, and a test that
#: clears or consumes the ``pleura`` queue must not take another test's messages.
AMQP_URL = os.environ.get("PLEURA_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("PLEURA_TEST_REDIS", "redis://127.0.0.1:6379/0")
#: This process's pytest-xdist worker ("gw0", "gw1", ...), "main" when the suite runs in one process.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


def worker_index() -> int:
    """0 for the first pytest-xdist worker (and a run without xdist), 1 for the next, ..."""
    return int(XDIST_WORKER[2:]) if XDIST_WORKER.startswith("gw") else 0


def claim_redis_url(base: str = REDIS_URL) -> tuple[str, Callable[[], None]]:
    """``base`` on a database (1-15) no other test process holds, and the function that gives it back.

    Test processes (pytest-xdist workers, and those of another run on this machine) claim a database
    with a lock key in database 0 (SET NX, gone after 2 h should a process die holding it); the
    database is emptied when claimed. No free one: ``base`` itself (no isolation).
    """
    import redis

    prefix = base.rpartition("/")[0]
    locks = redis.Redis.from_url(f"{prefix}/0")
    try:
        for db in range(1, 16):
            key = f"pleura-test-db-lock:{db}"
            if locks.set(key, os.getpid(), nx=True, ex=7200):
                url = f"{prefix}/{db}"
                client = redis.Redis.from_url(url)
                client.flushdb()
                client.close()

                def release(key: str = key) -> None:
                    done = redis.Redis.from_url(f"{prefix}/0")
                    if done.get(key) == str(os.getpid()).encode():
                        done.delete(key)
                    done.close()

                return url, release
    finally:
        locks.close()
    return base, lambda: None


def worker_amqp_url(base: str = AMQP_URL) -> str:
    """``base`` on a fresh vhost of this test process's own (``pleura-test-<pid>``), with all permissions for
    the URL's user; vhosts that processes now dead left behind are dropped first.

    Named after the process, not the xdist worker: two runs on one machine (each with a gw0) must not
    share or drop each other's vhost. It needs ``rabbitmqctl`` and a broker on this machine; otherwise
    ``base`` itself (no isolation).
    """
    parts = urlsplit(base)
    ctl = shutil.which("rabbitmqctl")
    if ctl is None or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return base
    listed = rabbitmqctl(["list_vhosts", "name"], check=False).stdout.split()
    for name in listed:
        pid = name.removeprefix("pleura-test-")
        if name.startswith("pleura-test-") and pid.isdigit() and not _alive(int(pid)):
            rabbitmqctl(["delete_vhost", name], check=False)
    vhost = f"pleura-test-{os.getpid()}"
    rabbitmqctl(["delete_vhost", vhost], check=False)
    rabbitmqctl(["add_vhost", vhost])
    rabbitmqctl(["set_permissions", "-p", vhost, unquote(parts.username or "guest"), ".*", ".*", ".*"])
    return urlunsplit(parts._replace(path=f"/{quote(vhost, safe='')}"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rabbitmqctl(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    ctl = shutil.which("rabbitmqctl") or "rabbitmqctl"
    return subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=120, check=check)


#: free_port hands out ports below the kernel's ephemeral range (ip_local_port_range, 32768-60999 on
#: Linux), a block of its own to each pytest-xdist worker: the kernel never gives them to another
#: process's bind(0) or outgoing connection, and two workers never pick the same one, so a port stays
#: ours between free_port() and the bind of the process it is for (bind(0) ports were taken in that
#: gap when tests ran in parallel). Each is checked free before it is handed out.
_PORT_BASE, _PORTS_PER_WORKER = 20000, 1500
_port_offset = itertools.count(random.randrange(_PORTS_PER_WORKER))


def free_port() -> int:
    first = _PORT_BASE + worker_index() * _PORTS_PER_WORKER
    if first + _PORTS_PER_WORKER <= 32768:
        for _ in range(_PORTS_PER_WORKER):
            port = first + next(_port_offset) % _PORTS_PER_WORKER
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:  # in use, or in TIME_WAIT from an earlier test
                    continue
                return port
    with socket.socket() as sock:  # more workers than blocks, or none free: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (bash .ci/run installs it with apt-get)")
    return path



def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def errors_and_warnings(output: str) -> tuple[list[str], list[str]]:
    """dciodvfy's error and warning lines."""
    lines = output.splitlines()
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])
