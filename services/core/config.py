"""All service configuration, read from CLINFUSE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The one place configuration is read. Nothing else reads os.environ."""

    model_config = SettingsConfigDict(env_prefix="CLINFUSE_", extra="ignore")

    environment: Literal["demo", "development", "production"] = "demo"
    #: SQLAlchemy URL. SQLite is the embedded default; PostgreSQL for deployments.
    database_url: str = "sqlite:///clinfuse.db"
    data_dir: Path = Path("clinfuse-data")
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Public base URL used in RetrieveURLs; defaults to the request's own.
    public_base_url: str | None = None
    #: Largest accepted request body (STOW-RS, FHIR, HL7 over HTTP); larger ones get 413.
    max_upload_bytes: int = 512 * 1024 * 1024
    #: DIMSE C-STORE SCP, started with the service when enabled.
    dicom_scp_enabled: bool = False
    dicom_ae_title: str = "CLINFUSE"
    dicom_port: int = 11112
    #: Calling AE titles allowed to associate; empty means none is allowed.
    dicom_allowed_aets: list[str] = []

    @property
    def dicom_storage_dir(self) -> Path:
        return self.data_dir / "dicom"


@lru_cache
def get_settings() -> Settings:
    return Settings()
