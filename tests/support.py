"""Helpers for tests: paths to the shared real data, service URLs, ports, tools."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PLEURA_SHARED_DATA", ROOT.parent / "shared" / "data"))
REAL_CR = SHARED_DATA / "dicom" / "RG1_J2KI.dcm"
NIH = SHARED_DATA / "nih-cxr14-sample"
PG_ADMIN_URL = os.environ.get("PLEURA_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("PLEURA_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("PLEURA_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as sock:
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
