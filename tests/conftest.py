"""Shared fixtures: real data, real services (PostgreSQL, RabbitMQ), DCMTK, free ports."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from sqlalchemy import create_engine, text

from tests.support import (
    AMQP_URL,
    NIH,
    PG_ADMIN_URL,
    REAL_CR,
    REDIS_URL,
    claim_redis_url,
    errors_and_warnings,
    rabbitmqctl,
    reachable,
    require_tool,
    worker_amqp_url,
)

#: Under pytest-xdist (``--dist loadfile``, pyproject.toml) a test file runs whole on one worker and
#: files go out in collection order: the long ones first (the longest measured, then any file with a
#: ``slow`` test, then the end-to-end and reliability suites), so that the run does not end with one
#: of them alone on one worker while the others idle.
_LONGEST = ("tests/reliability/test_soak.py", "tests/e2e/test_results_validate.py",
            "tests/e2e/test_reports_monitor.py", "tests/e2e/test_heads_serve.py", "tests/e2e/test_production.py")
_LONG = ("tests/e2e/", "tests/reliability/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        here = (_LONGEST.index(path) - len(_LONGEST) if path in _LONGEST else 1 if item.get_closest_marker("slow")
                else 2 if path.startswith(_LONG) else 3)
        rank[path] = min(rank.get(path, 3), here)
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])  # stable: each file's order is kept


@pytest.fixture
def real_cr() -> Path:
    if not REAL_CR.is_file():
        pytest.skip(f"real CR {REAL_CR} absent: the shared data folder is not beside the repo")
    return REAL_CR


@pytest.fixture
def nih() -> Path:
    if not (NIH / "labels.csv").is_file():
        pytest.skip(f"NIH sample {NIH} absent: the shared data folder is not beside the repo")
    return NIH


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if not reachable("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    name = f"pleura_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def _worker_vhost() -> Iterator[str]:
    """The shared RabbitMQ on a vhost of this test process's own, dropped when the session ends."""
    url = worker_amqp_url(AMQP_URL)
    yield url
    vhost = unquote(urlsplit(url).path[1:])
    if url != AMQP_URL and vhost:
        rabbitmqctl(["delete_vhost", vhost], check=False)


@pytest.fixture(scope="session")
def _worker_redis() -> Iterator[str]:
    """The shared Redis on a database of this test process's own, emptied at the start."""
    url, release = claim_redis_url(REDIS_URL)
    yield url
    release()


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> str:
    """The machine's RabbitMQ, on this worker's own vhost."""
    if not reachable("127.0.0.1", 5672):
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    return request.getfixturevalue("_worker_vhost")


@pytest.fixture(params=["rabbitmq", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """RabbitMQ (the production default) and Redis (the documented alternative), each this worker's own."""
    if request.param == "rabbitmq":
        return request.getfixturevalue("amqp_url")
    if not reachable("127.0.0.1", 6379):
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    return request.getfixturevalue("_worker_redis")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both ledger back-ends through the same models and migrations."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def dciodvfy() -> Callable[[Path], tuple[list[str], list[str]]]:
    """Run dicom3tools dciodvfy on a file; returns (error lines, warning lines)."""
    binary = require_tool("dciodvfy")

    def run(path: Path) -> tuple[list[str], list[str]]:
        done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60,
                              check=False)
        return errors_and_warnings(done.stdout + done.stderr)

    return run


@pytest.fixture(scope="session")
def dsrdump() -> Callable[[Path], subprocess.CompletedProcess]:
    """Run DCMTK dsrdump on a file."""
    binary = require_tool("dsrdump")

    def run(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60,
                              check=False)

    return run


@pytest.fixture(scope="session")
def pixelmed_sr() -> Iterator[Callable[[list[Path]], dict[Path, tuple[list[str], list[str]]]]]:
    """pixelmed's DicomSRValidator (Debian pixelmed-apps) over SR files: one JVM per session.

    Each call returns, per file, its (error lines, warning lines). The XPath limits are lifted
    as the validator needs on JDK 17.
    """
    java = require_tool("java")
    jar = Path("/usr/share/java/pixelmed.jar")
    if not jar.is_file():
        pytest.skip(f"{jar} absent (bash .ci/run installs pixelmed-apps with apt-get)")
    source = Path(__file__).with_name("tools") / "PixelmedValidate.java"
    limits = [f"-Djdk.xml.{name}=0" for name in
              ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")]
    validator = subprocess.Popen([java, *limits, "-cp", str(jar), str(source)], text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert validator.stdin is not None and validator.stdout is not None
    stdin, stdout = validator.stdin, validator.stdout

    def run(paths: list[Path]) -> dict[Path, tuple[list[str], list[str]]]:
        stdin.write("".join(f"{path}\n" for path in paths) + "\n")
        stdin.flush()
        reports: dict[Path, list[str]] = {}
        current: list[str] = []
        for line in iter(stdout.readline, ""):
            line = line.rstrip("\n")
            if line == "### END":
                break
            if line.startswith("### "):
                current = reports.setdefault(Path(line[4:]), [])
            else:
                current.append(line)
        missing = [path for path in paths if Path(path) not in reports]
        assert not missing, f"pixelmed did not report on {missing} (exit {validator.poll()})"
        return {Path(path): errors_and_warnings("\n".join(reports[Path(path)])) for path in paths}

    yield run
    stdin.close()
    validator.wait(30)
