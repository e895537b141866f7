"""Settings from the environment (prefix ``PLEURA_``) and an optional TOML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.destinations import Destination, DicomWebDestination, Hl7Peer, fhir_base, parse_destination

#: Secret files are read from here when ``PLEURA_SECRETS_DIR`` is unset and the folder exists
#: (Docker and Compose mount secrets there).
DEFAULT_SECRETS_DIR = Path("/run/secrets")

class Settings(BaseSettings):
    """Everything Pleura reads at start-up. Environment beats secret files beat the TOML file beats defaults.

    A secret file is named after the variable (``pleura_database_url``, any case) and holds the
    value; see :func:`secrets_dir` for where they are looked for.
    """

    model_config = SettingsConfigDict(env_prefix="PLEURA_", extra="forbid")
    toml_file: ClassVar[Path | None] = None

    data_dir: Path = Path("./var")
    database_url: str | None = None
    broker_url: str | None = None
    ae_title: str = "PLEURA"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    #: DICOMweb STOW-RS in (``POST /dicom-web/studies``, dicom_node.stow) on this HTTP port; unset: off
    dicomweb_port: int | None = Field(None, ge=0, le=65535)
    dicomweb_host: str = "0.0.0.0"
    #: bearer tokens STOW-RS clients must send, one a line, each optionally named ``name:token`` (the
    #: name, at most 16 characters, is recorded as the sender); required with PLEURA_DICOMWEB_PORT
    dicomweb_token_file: Path | None = None
    #: largest STOW-RS request body (MB); a larger one gets 413
    dicomweb_max_mb: int = Field(2048, gt=0)
    #: seconds a STOW-RS client may stay silent mid-body before it is answered 408
    dicomweb_timeout_seconds: float = Field(60.0, gt=0)
    #: HTTPS on the DICOMweb port (the DICOM TLS certificate settings)
    dicomweb_tls: bool = False
    #: where results go: ``AET@host:port[+tls]`` (C-STORE) or a DICOMweb base URL (STOW-RS), comma-separated
    destinations: Annotated[list[Destination | DicomWebDestination], NoDecode] = Field(default_factory=list)
    #: a file holding the bearer token sent to DICOMweb destinations (read at every send: it may be rotated)
    destination_token_file: Path | None = None
    study_quiet_seconds: float = 10.0
    #: a study whose associations all ended with an A-RELEASE is complete this long after its last
    #: instance (worker.assemble.completion); negative: that rule is off and the quiet period decides
    study_settle_seconds: float = 0.5
    study_max_wait_seconds: float = Field(600.0, gt=0)
    prepare_on_arrival: bool = True
    #: A chest X-ray study the gate refuses for a chest-domain reason (view, age, photometric
    #: interpretation, undecodable pixels) gets a not-analysed SR saying so; false: nothing.
    notify_not_analysed: bool = True
    model: str = "demo"
    #: PEM Ed25519 public keys (comma-separated paths): set, only bundles signed by one of them load
    trusted_keys: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    models_dir: Path | None = None
    backend: str = "auto"
    worker_concurrency: int = Field(4, ge=1)
    #: processes that decode images and build SR/SC off the worker's GIL (worker.cpu); 0: in its
    #: threads
    cpu_processes: int = Field(2, ge=0)
    batch_max: int = Field(32, ge=1)
    batch_max_wait_ms: float = Field(5.0, ge=0)
    sweep_interval_seconds: float = 2.0
    lease_seconds: float = 60.0
    republish_seconds: float = Field(120.0, gt=0)
    max_attempts: int = 3
    delivery_backoff_seconds: float = 2.0
    delivery_backoff_max_seconds: float = Field(300.0, gt=0)
    delivery_horizon_seconds: float = Field(86400.0, gt=0)
    #: RIS peers that get an HL7 v2.5.1 ORU^R01 per analysed result over MLLP: host:port[+tls], comma-separated
    notify_hl7: Annotated[list[Hl7Peer], NoDecode] = Field(default_factory=list)
    #: FHIR R4 servers (base URLs, comma-separated) that get a transaction Bundle per analysed result
    notify_fhir: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: a file holding the bearer token sent to the FHIR servers (read at every send: it may be rotated)
    notify_fhir_token_file: Path | None = None
    #: seconds to connect, send and get the peer's answer (an MLLP ACK, an HTTP response)
    notify_timeout_seconds: float = Field(10.0, gt=0)
    #: reports in (worker.reports): the MLLP port for HL7 v2 ORU^R01 final reports; unset: not listening
    hl7_port: int | None = Field(None, ge=0, le=65535)
    hl7_host: str = "0.0.0.0"
    #: HL7 over TLS (the DICOM TLS certificate settings: PLEURA_TLS_CERT_FILE, _KEY_FILE, _CA_FILE)
    hl7_tls: bool = False
    #: who may send reports: ``APP`` (MSH-3 sending application, from any host) or ``APP@host``; empty: anyone
    hl7_allowed_senders: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: largest HL7 message accepted (KiB); a bigger one gets a NACK and its connection is closed
    hl7_max_message_kb: int = Field(256, gt=0)
    #: seconds a sender may take to complete a message (and may stay silent between messages)
    hl7_timeout_seconds: float = Field(30.0, gt=0)
    #: a file holding the bearer token FHIR clients must send to POST DiagnosticReports; unset: FHIR reports off
    reports_token_file: Path | None = None
    #: the report labeler (module:attribute); unset: the rule-based default (worker.reports.rules)
    report_labeler: str | None = None
    #: days per concordance window (worker.monitor)
    monitor_window_days: float = Field(30.0, gt=0)
    #: findings that flag a study for the worklist when positive; unset: those the bundle's manifest marks
    triage_findings: Annotated[list[str] | None, NoDecode] = None
    #: where instance and result bytes live (worker.storage): ``local`` (this host's spool and outbox) or
    #: ``database`` (the ledger's PostgreSQL: listeners and workers on different hosts share no filesystem)
    storage: Literal["local", "database"] = "local"
    #: hours after a finished study's last activity that its bytes are removed (worker.storage.retention);
    #: unset: kept
    retention_hours: float | None = Field(None, gt=0)
    #: with ``storage`` database: C-STORE answers 0xA700 once the ledger's database is this large (MB)
    max_database_mb: int | None = Field(None, gt=0)
    min_free_disk_mb: int = 500
    #: a Deflated Explicit VR Little Endian data set that inflates beyond this (MiB) is refused with 0xC000
    #: before it is read (dicom_node.deflate): a deflate bomb never fills the listener's memory
    max_inflated_mb: int = Field(512, gt=0)
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_associations: int = Field(10, ge=1)
    listen_processes: int = Field(1, ge=1)
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_require_peer_cert: bool = True
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    search_ef_search: int = Field(400, ge=1, le=1000)
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(None, ge=0, le=65535)
    #: HTTPS on the HTTP port (the DICOM TLS certificate settings; a client certificate is checked
    #: against PLEURA_TLS_CA_FILE when one is presented)
    http_tls: bool = False

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> list[Destination | DicomWebDestination]:
        return [i if isinstance(i, Destination | DicomWebDestination) else parse_destination(i) for i in _items(value)]

    @field_validator("notify_hl7", mode="before")
    @classmethod
    def _parse_notify_hl7(cls, value: Any) -> list[Hl7Peer]:
        return [i if isinstance(i, Hl7Peer) else Hl7Peer.parse(i) for i in _items(value)]

    @field_validator("notify_fhir", mode="before")
    @classmethod
    def _parse_notify_fhir(cls, value: Any) -> list[str]:
        return [fhir_base(i) for i in _items(value)]

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _parse_trusted_keys(cls, value: Any) -> list[Path]:
        return [Path(i.strip()) if isinstance(i, str) else i for i in _items(value)]

    @field_validator("hl7_allowed_senders", mode="before")
    @classmethod
    def _parse_hl7_senders(cls, value: Any) -> list[str]:
        return [i.strip() for i in _items(value)]

    @field_validator("triage_findings", mode="before")
    @classmethod
    def _parse_triage(cls, value: Any) -> list[str] | None:
        return None if value is None else [i.strip() for i in _items(value)]

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _parse_allowed(cls, value: Any) -> list[str]:
        if value is None or value == "":
            return []
        items = value.split(",") if isinstance(value, str) else value
        return [i.strip() for i in items if i.strip()]

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        if not 0 < len(value) <= 16 or "\\" in value:
            raise ValueError("AE title must be 1-16 characters without backslash")
        return value

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def fetch_dir(self) -> Path:
        """Private copies of bytes read from the database storage, removed after each use."""
        return self.data_dir / "fetched"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def effective_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'pleura.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        """True when no broker is configured: Celery runs in this process (``memory://``)."""
        return not self.broker_url or self.broker_url.startswith("memory://")

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "memory://"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        folder = secrets_dir()
        if folder is not None:
            sources.append(SecretsSettingsSource(settings_cls, secrets_dir=folder))
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)


def secrets_dir() -> Path | None:
    """The folder of secret files: ``$PLEURA_SECRETS_DIR``, else :data:`DEFAULT_SECRETS_DIR` if it exists."""
    configured = os.environ.get("PLEURA_SECRETS_DIR")
    if configured:
        if not Path(configured).is_dir():
            raise ValueError(f"PLEURA_SECRETS_DIR={configured} is not a directory")
        return Path(configured)
    return DEFAULT_SECRETS_DIR if DEFAULT_SECRETS_DIR.is_dir() else None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Load settings; ``config`` is a TOML file whose keys are the field names (no prefix)."""
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"config file {config} does not exist")

    class _FromFile(Settings):
        toml_file = config

    return _FromFile(**overrides)


def _items(value: Any) -> list[Any]:
    """A comma-separated string's non-blank items, or a list's items."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [i for i in items if not isinstance(i, str) or i.strip()]
