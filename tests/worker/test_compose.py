"""compose.yaml only names settings that exist and runs the roles the README describes."""

import yaml

from tests.support import ROOT
from worker.settings import Settings


def test_compose_stack_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "rabbitmq", "orthanc", "pleura-listen", "pleura-worker"} <= set(services)
    assert services["pleura-listen"]["command"] == ["pleura", "listen"]
    assert services["pleura-worker"]["command"] == ["pleura", "worker"]
    gpu = services["pleura-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("pleura-listen", "pleura-worker", "pleura-migrate"):
        for key in services[name]["environment"]:
            field = key.removeprefix("PLEURA_").lower()
            assert key.startswith("PLEURA_") and field in Settings.model_fields, key
