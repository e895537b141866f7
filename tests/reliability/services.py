"""Private PostgreSQL, RabbitMQ and Redis instances that a test may stop and restart.

The machine's shared services serve every test running at the same time and are never
touched; these run on free ports in their own directories and are removed afterwards.
PostgreSQL and RabbitMQ run as their own system users (PostgreSQL refuses root), so their
directories live in a fresh /tmp folder owned by that user rather than in pytest's tmp_path
(which those users cannot enter).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support import free_port, reachable, wait_for


def _as_user(user: str, args: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", *args], check=True, capture_output=True, text=True,
                          timeout=120, **kwargs)  # type: ignore[arg-type]


def _owned_dir(prefix: str, user: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.chown(path, user)
    return path


def _runs_as(user: str, binary: Path) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(binary)], check=False).returncode == 0


def _reachable_copy(bin_dir: Path, into: Path) -> Path:
    """A copy the ``postgres`` user can run of a relocatable install it cannot reach (pgserver's in a virtual
    environment under /root, mode 0700): ``bin``, ``lib``, ``share``, and the wheel's ``<package>.libs`` at the
    place its RPATH names (pgserver: ``$ORIGIN/../../../pgserver.libs``)."""
    install = bin_dir.parent
    package = install.parent
    copy = into / "install" / package.name / install.name
    for part in ("bin", "lib", "share"):
        shutil.copytree(install / part, copy / part, symlinks=True)
    libs = package.with_name(f"{package.name}.libs")
    if libs.is_dir():
        shutil.copytree(libs, into / "install" / libs.name)
    return copy / "bin"


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl as ``postgres``); ``url`` names its database.

    ``bin_dir`` picks the server binaries (e.g. pgserver's build, which has pgvector); by default
    the newest Debian ones (/usr/lib/postgresql/*/bin).
    """

    def __init__(self, bin_dir: Path | None = None) -> None:
        if shutil.which("runuser") is None:
            pytest.skip("runuser is not installed (PostgreSQL refuses to run as root)")
        if bin_dir is None:
            bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
            if not bins:
                pytest.skip("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed")
            bin_dir = bins[-1].parent
        self.bin = bin_dir
        self.dir = _owned_dir("pleura-pg-", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        try:
            if not _runs_as("postgres", bin_dir / "postgres"):
                self.bin = _reachable_copy(bin_dir, self.dir)
            _as_user("postgres", [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                  "--no-sync"])
            self.start()
            _as_user("postgres", [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "pleura"])
        except BaseException:
            self.close()
            raise
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/pleura"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        _as_user("postgres", [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"),
                              "-o", options, "-w", "start"])

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash as far as clients see it: connections cut, recovery at start."""
        _as_user("postgres", [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def close(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data),
                        "-m", "immediate", "stop"], capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbitMQ:
    """A RabbitMQ node of our own (own node name, ports, Mnesia and log directories, no plugins).

    It starts in about 6 s here, which keeps the production broker in the restart test.
    """

    def __init__(self) -> None:
        if shutil.which("rabbitmq-server") is None:
            pytest.skip("rabbitmq-server is not installed")
        self.dir = _owned_dir("pleura-rmq-", "rabbitmq")
        self.port, dist_port = free_port(), free_port()
        (self.dir / "plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = {self.port}\n")
        self.env = {
            **os.environ,
            # unique among the nodes of tests running at once (pytest-xdist workers): the pid, and a port now ours
            "RABBITMQ_NODENAME": f"pleura{os.getpid()}-{self.port}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def start(self) -> None:
        with open(self.dir / "server.log", "ab") as log:
            subprocess.Popen(["rabbitmq-server"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        wait_for(lambda: reachable("127.0.0.1", self.port), 90, "the private RabbitMQ node")

    def stop(self) -> None:
        pid = self._pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not _alive(pid), 60, "the private RabbitMQ node to stop")

    def _pid(self) -> int | None:
        try:
            return int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server of our own, without persistence (the ledger, not the broker, is durable)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        with open(workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                          str(workdir), "--save", "", "--appendonly", "no"],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: reachable("127.0.0.1", self.port), 30, "the private redis-server")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


# --- a Pleura production stack over those services, and what a test asks of it -------------------


def pleura_env(tmp_path: Path, db_url: str, broker_url: str, port: int, destinations: str,
               **settings: object) -> dict[str, str]:
    """Production settings with short timings (quiet period, sweep, lease) for fault tests."""
    env = {
        "PLEURA_DATA_DIR": str(tmp_path / "var"),
        "PLEURA_DATABASE_URL": db_url,
        "PLEURA_BROKER_URL": broker_url,
        "PLEURA_DICOM_PORT": str(port),
        "PLEURA_DESTINATIONS": destinations,
        "PLEURA_STUDY_QUIET_SECONDS": "2",
        "PLEURA_SWEEP_INTERVAL_SECONDS": "0.25",
        "PLEURA_LEASE_SECONDS": "5",
        # Redis keeps a killed worker's reserved messages for an hour: the sweeper's backstop re-sends them
        "PLEURA_REPUBLISH_SECONDS": "5",
        "PLEURA_WORKER_CONCURRENCY": "4",
        "PLEURA_MIN_FREE_DISK_MB": "20",  # CI disks can be nearly full; the watermark has its own test
    }
    env.update({f"PLEURA_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def synth_studies(nih: Path, out: Path, count: int, skip: int = 0) -> list[Path]:
    """``count`` one-image studies (distinct synthetic patients) from the NIH sample."""
    from worker.synth.studies import png_to_dataset, read_labels

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in read_labels(nih / "labels.csv")[skip:skip + count]:
        path = out / f"{Path(row['image']).stem}.dcm"
        png_to_dataset(nih / "images" / row["image"], row).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def received_by_study(folder: Path) -> dict[str, dict[str, int]]:
    """What a storescp (``-uf``, every object its own file) holds: per study, SOP UID -> copies."""
    from pydicom import dcmread

    held: dict[str, dict[str, int]] = {}
    for path in folder.iterdir():
        ds = dcmread(path, stop_before_pixels=True)
        copies = held.setdefault(str(ds.StudyInstanceUID), {})
        copies[str(ds.SOPInstanceUID)] = copies.get(str(ds.SOPInstanceUID), 0) + 1
    return held


def sr_count(folder: Path, study_uid: str) -> int:
    """SR objects (files) a storescp received for one study."""
    from pydicom import dcmread
    from pydicom.uid import Comprehensive3DSRStorage

    return sum(1 for p in folder.iterdir()
               if (ds := dcmread(p, stop_before_pixels=True)).StudyInstanceUID == study_uid
               and ds.SOPClassUID == Comprehensive3DSRStorage)
