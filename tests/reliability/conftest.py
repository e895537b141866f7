"""Fixtures shared by the reliability tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.services import PrivateRabbitMQ


@pytest.fixture
def broker() -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of the test's own, which it may stop and restart (see ``ingest.production_env``)."""
    node = PrivateRabbitMQ()
    yield node
    node.close()
