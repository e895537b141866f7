"""Bounded soak (issue 5 item 13), short: 160 instances from 4 senders at once into production mode.

The scenario and its checks are :mod:`tests.reliability.soak`'s (a worker killed -9 mid-inference
while instances arrive, then restarted; every study delivered exactly once). The long soak, the
same code with 1,000 instances, is ``python -m bench.soak`` (bench/README.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.figures import save
from tests.reliability import soak
from tests.reliability.services import PrivateRabbitMQ

#: a tenth of the studies is processed before the kill, so that the victim has work to die in
CI = soak.Soak(studies=16, per_study=10)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_soak_with_a_worker_killed(pg_url: str, broker: PrivateRabbitMQ, nih: Path, tmp_path: Path) -> None:
    soak.run(CI, pg_url, broker.url, nih, tmp_path, record=lambda figures: save("soak", figures))
