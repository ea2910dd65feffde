"""Settings from LOREG_* environment variables (pydantic-settings). Built on demand, never at import."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


def default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "loreg"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOREG_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    database_url: str | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # let clients download whole files straight from S3 through presigned URLs (the API leaves the
    # data path); only when clients can reach the S3 endpoint the server uses
    s3_presign_downloads: bool = False
    s3_presign_expires_s: int = 900
    # let clients upload files straight to S3 (presigned multipart part URLs for a staging key); the
    # server then reads each staged file once to verify it and copies it to its blob key inside S3
    s3_presign_uploads: bool = False
    # the S3 endpoint as clients reach it, when it differs from s3_endpoint_url (URLs are signed per host)
    s3_presign_endpoint_url: str | None = None

    # limits: each answered with its own status before the whole body is read
    max_file_size: int = 4 * GiB
    max_config_size: int = 64 * 1024
    max_header_size: int = 8 * MiB
    max_card_size: int = 1 * MiB
    max_files_per_version: int = 64
    max_json_body: int = 1 * MiB
    max_metrics_per_request: int = 256

    header_timeout_s: float = 10.0  # a request's line and headers must arrive within this (slowloris)
    # a request body that sends nothing for this long is cut (408): a stalled upload holds a slot
    body_idle_timeout_s: float = Field(default=30.0, gt=0)
    # uploads stream through their own worker threads, this many at once; more wait (bounded, at most
    # body_idle_timeout_s) for a slot, then get 503 + Retry-After
    upload_concurrency: int = Field(default=16, ge=1)
    anonymous_read: bool = False
    auth_max_failures: int = 10
    auth_failure_window_s: float = 300.0
    # peers (CIDRs) whose X-Forwarded-For names the client; empty: the peer is the client
    trusted_proxies: Annotated[list[str], NoDecode] = []
    # GET /metrics without a token (a scraper inside a private network); else the admin token
    metrics_public: bool = False
    gc_grace_seconds: int = 24 * 3600
    export_concurrency: int = 1
    # "inprocess": `loreg serve` runs export workers as threads (the embedded default);
    # "external": only `loreg worker` processes merge (Postgres), the API just queues
    export_worker: str = "inprocess"
    export_lease_s: float = 60.0
    export_device: str = "auto"
    # |weight| of each adapter in an export: larger ones only write infinities (negative ones negate a task)
    max_export_weight: float = 100.0
    # queued + running exports one read-scoped token may have (a serving host that only consumes)
    max_queued_exports_per_token: int = 4
    work_dir: Path | None = None  # scratch space for merges (default: a temp folder)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _cidrs(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            for v in value:
                ipaddress.ip_network(str(v), strict=False)  # ValueError names the bad entry
        return value

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.database_url.startswith("sqlite")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'loreg.db'}"

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or (self.home / "store").as_uri()
