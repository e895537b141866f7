"""Settings from secret files (Docker/Compose secrets): one file per setting, named after its variable."""

import os
from pathlib import Path

import pytest

from worker import settings as settings_module
from worker.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("PLEURA_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(settings_module, "DEFAULT_SECRETS_DIR", tmp_path / "absent")


def test_secret_files_fill_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pleura_database_url").write_text("postgresql+psycopg2://pleura:s3cret@db:5432/pleura\n")
    (secrets / "PLEURA_BROKER_URL").write_text("amqp://pleura:s3cret@mq:5672//")
    (secrets / "unrelated_password").write_text("ignored")
    monkeypatch.setenv("PLEURA_SECRETS_DIR", str(secrets))
    s = load_settings()
    assert s.database_url == "postgresql+psycopg2://pleura:s3cret@db:5432/pleura"  # trailing newline stripped
    assert s.broker_url == "amqp://pleura:s3cret@mq:5672//"
    assert not s.embedded_broker


def test_environment_beats_secret_file_beats_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pleura_ae_title").write_text("FROMSECRET")
    (secrets / "pleura_database_url").write_text("sqlite:///from-secret.db")
    config = tmp_path / "pleura.toml"
    config.write_text('ae_title = "FROMFILE"\nbroker_url = "redis://from-toml:6379/0"\n')
    monkeypatch.setenv("PLEURA_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("PLEURA_DATABASE_URL", "sqlite:///from-env.db")
    s = load_settings(config)
    assert (s.database_url, s.ae_title, s.broker_url) == (
        "sqlite:///from-env.db", "FROMSECRET", "redis://from-toml:6379/0",
    )


def test_default_folder_is_read_only_when_it_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_secrets = tmp_path / "run-secrets"
    monkeypatch.setattr(settings_module, "DEFAULT_SECRETS_DIR", run_secrets)
    assert load_settings().database_url is None  # absent folder: no warning, no error, defaults
    run_secrets.mkdir()
    (run_secrets / "pleura_database_url").write_text("postgresql+psycopg2://pleura:x@postgres/pleura")
    assert load_settings().database_url == "postgresql+psycopg2://pleura:x@postgres/pleura"


def test_missing_secrets_dir_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PLEURA_SECRETS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="PLEURA_SECRETS_DIR=.*nowhere is not a directory"):
        load_settings()
