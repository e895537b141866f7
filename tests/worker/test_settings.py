from pathlib import Path

import pytest

from worker.destinations import Destination
from worker.settings import load_settings


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("PLEURA_"):
            monkeypatch.delenv(key)
    s = load_settings()
    assert s.ae_title == "PLEURA" and s.dicom_port == 11112 and s.model == "demo"
    assert s.embedded_broker and s.effective_broker_url == "memory://"
    assert s.effective_database_url.startswith("sqlite:///") and s.effective_database_url.endswith("var/pleura.db")
    assert s.destinations == []


def test_env_beats_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "pleura.toml"
    config.write_text('ae_title = "FROMFILE"\nstudy_quiet_seconds = 3\ndicom_port = 4242\n')
    monkeypatch.setenv("PLEURA_DICOM_PORT", "5555")
    monkeypatch.setenv("PLEURA_DESTINATIONS", "PACS@10.0.0.5:104, VIEWER@viewer:11112")
    s = load_settings(config)
    assert (s.ae_title, s.study_quiet_seconds, s.dicom_port) == ("FROMFILE", 3.0, 5555)
    assert s.destinations == [Destination("PACS", "10.0.0.5", 104), Destination("VIEWER", "viewer", 11112)]


def test_bad_destination_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEURA_DESTINATIONS", "PACS-without-port")
    with pytest.raises(ValueError, match="AET@host:port"):
        load_settings()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")
