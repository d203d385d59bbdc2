"""Typed settings with environment overrides.

Every timeout and interval the peer uses lives here, so that an operator can tune a slow link with an
environment variable (``HIVEMARKET_<FIELD>``, e.g. ``HIVEMARKET_BOOTSTRAP_TIMEOUT=60``) instead of
editing code, and so that tests can shorten them without touching module globals.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PeerSettings(BaseSettings):
    """Settings of a peer node; read from the environment each time :func:`load_settings` is called."""

    model_config = SettingsConfigDict(env_prefix="HIVEMARKET_", frozen=True)

    home: Path = Field(
        default_factory=lambda: Path.home() / ".hivemarket",
        description="Folder for the identity file and local state.",
    )
    record_ttl: float = Field(60.0, gt=0, description="Seconds a capability record lives in the DHT.")
    record_refresh: float = Field(
        20.0, gt=0, description="Seconds between re-publications of the record; well under record_ttl."
    )
    bootstrap_timeout: float = Field(
        30.0, gt=0, description="Seconds to start p2pd and reach the initial peers before giving up."
    )
    shutdown_timeout: float = Field(5.0, gt=0, description="Seconds to wait for the DHT process to stop.")
    dht_request_timeout: float = Field(5.0, gt=0, description="Seconds one DHT RPC may take.")
    probe_seconds: float = Field(
        2.0, gt=0, description="Seconds of benchmark the hardware probe runs before a peer posts its record."
    )
    status_interval: float = Field(2.0, gt=0, description="Seconds between status-file updates.")


def load_settings() -> PeerSettings:
    """Read the settings from the environment now (tests change the environment between calls)."""
    return PeerSettings()
