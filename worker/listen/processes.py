"""Several listener processes on one port (``PLEURA_LISTEN_PROCESSES``), for ``pleura listen``.

pynetdicom serves each association in threads of one interpreter, which run Python one at a
time: past about one core of work, more associations do not go faster (bench.ingest). So the
listener binds its port once (:func:`dicom_node.scp.bind`) and forks, before it opens any
connection or starts any thread; every process, the first included, accepts on that socket and
keeps its own ledger connections. Only the first runs the sweepers and the HTTP endpoints.

A process that dies takes the group down: the first stops the others and exits non-zero, for the
service manager (compose, systemd) to restart the listener; a forked process whose first process
is gone stops on its own.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

#: Seconds a forked process waits between checks that the first process is still there.
PARENT_CHECK_SECONDS = 1.0


@dataclass
class Group:
    """This process's place in the group: ``parent`` is set in a forked process, ``children`` in the first."""

    parent: int | None = None
    children: list[int] = field(default_factory=list)

    @property
    def forked(self) -> bool:
        return self.parent is not None


def fork(extra: int) -> Group:
    """Fork ``extra`` more listener processes; call it before any thread or connection exists."""
    group = Group()
    for _ in range(extra):
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            return Group(parent=parent)
        group.children.append(pid)
    return group


def wait(group: Group) -> int:
    """Block until SIGINT/SIGTERM (0), the death of a forked process (1) or, in a forked process,
    the death of the first (0); the exit status this process should end with."""
    stop = threading.Event()
    status = 0

    def on_signal(*_: object) -> None:
        stop.set()

    def on_child(*_: object) -> None:
        nonlocal status
        for pid in group.children:
            try:
                ended, code = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                ended, code = pid, -1
            if ended:
                log.error("a listener process ended; stopping the others", pid=pid, wait_status=code)
                status = 1
                stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if group.forked:
        threading.Thread(target=_watch_parent, args=(group.parent, stop), name="pleura-parent-watch",
                         daemon=True).start()
    else:
        signal.signal(signal.SIGCHLD, on_child)
        on_child()  # one may have died before the handler was installed
    stop.wait()
    return status


def stop_children(group: Group, timeout: float = 20.0) -> None:
    """SIGTERM each forked process and reap it; SIGKILL any still there after ``timeout`` seconds."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pending = set()
    for pid in group.children:
        try:
            os.kill(pid, signal.SIGTERM)
            pending.add(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    while pending:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    pending.discard(pid)
            except ChildProcessError:
                pending.discard(pid)
        if pending and time.monotonic() > deadline:
            for pid in pending:
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)


def _watch_parent(parent: int | None, stop: threading.Event) -> None:
    while not stop.wait(PARENT_CHECK_SECONDS):
        if os.getppid() != parent:
            log.warning("the first listener process is gone; stopping")
            stop.set()
