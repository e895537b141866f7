"""A private PostgreSQL 16 cluster with the pgvector extension, from the ``pgserver`` wheel (test extra).

The machine's PostgreSQL has no pgvector and Debian packages none for it; pgserver ships a
relocatable PostgreSQL build with pgvector under ``pgserver/pginstall``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.reliability.services import PrivatePostgres


def pgserver_bin() -> Path:
    """pgserver's server binaries, found without importing the package (its import sets up data dirs)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pgserver is not installed (pip install -e '.[test]'): it provides PostgreSQL 16 with "
                    "pgvector for the pgvector tests")
    bin_dir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    if not (bin_dir / "pg_ctl").is_file():
        pytest.skip(f"pgserver is installed but {bin_dir} holds no pg_ctl")
    return bin_dir


def pgvector_postgres() -> PrivatePostgres:
    """A started private cluster whose server offers the ``vector`` extension; the caller closes it."""
    return PrivatePostgres(bin_dir=pgserver_bin())
