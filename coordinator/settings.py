"""Typed settings of the coordinator service, with ``HIVEMARKET_*`` environment overrides.

Every timeout, interval and limit lives here rather than as a literal in code, so operators tune them
with environment variables and tests shorten them without patching modules.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """The coordinator service (``hivemarket coordinator serve``)."""

    model_config = SettingsConfigDict(env_prefix="HIVEMARKET_", frozen=True)

    home: Path = Field(
        default_factory=lambda: Path.home() / ".hivemarket",
        description="Folder of the database (coordinator.db) and models, unless --db or MODEL_DIR says else.",
    )
    max_body_bytes: int = Field(1 << 20, gt=0, description="Larger request bodies get 413.")
    signature_window: float = Field(
        300.0, gt=0, description="Seconds a signed timestamp may differ from the server's clock."
    )
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between a lease's heartbeats (H).")
    lapse_after_heartbeats: float = Field(3.0, gt=1, description="A lease lapses after this many missed H.")
    clearing_interval: float = Field(3.0, gt=0, description="Seconds between market clearing rounds.")
    sweep_interval: float = Field(1.0, gt=0, description="Seconds between checks for lapsed leases.")
    reach_check_timeout: float = Field(
        2.5,
        gt=0,
        description="Seconds the coordinator waits to connect back to a peer that asks whether it can be "
        "reached (TCP's first SYN retry is at 1 s).",
    )
    rate_limit_per_second: float = Field(50.0, gt=0, description="Sustained signed requests per account.")
    rate_limit_burst: float = Field(100.0, gt=0, description="Requests an account may send at once.")
    write_batch_max: int = Field(512, gt=0, description="Most writes committed in one database transaction.")
    market_history: int = Field(50, gt=0, description="Clearing rounds kept for /v1/market.")
    dashboard_refresh: float = Field(
        2.0, gt=0, description="Seconds between the web dashboard's live updates."
    )
    settle_timeout: float = Field(
        60.0, gt=0, description="Seconds a settling run waits for its model before it finishes without one."
    )
    stall_timeout: float = Field(
        600.0,
        gt=0,
        description="A running run with live peers but no accepted report for this long fails (refunded).",
    )
    audit_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds an audit waits for a validator; then it expires and the report is unpaid.",
    )
    audit_claim_timeout: float = Field(
        30.0, gt=0, description="Seconds a validator holds an audit before it goes to another validator."
    )
    model_dir: Path = Field(
        default_factory=lambda data: Path(data["home"]) / "models",
        description="Where final models are kept [default: $HIVEMARKET_HOME/models].",
    )
    max_model_bytes: int = Field(256 << 20, gt=0, description="Larger model uploads get 413.")
    quote_round_seconds: float = Field(
        0.2,
        gt=0,
        description="launch --dry-run, before this market has measured a task: the seconds one averaging "
        "round adds to a step (measured: digits on 2 loopback peers, 2 cores: 0.1 s a step idle, 0.4 s "
        "with the test suite on the other core).",
    )
    quote_efficiency: float = Field(
        0.3, gt=0, le=1, description="launch --dry-run: the share of its probe's TFLOP/s a peer delivers."
    )
    quote_spread: float = Field(
        3.0, ge=1, description="launch --dry-run: the probe's estimate ranges from mid / this to mid * this."
    )
    group_regroup_seconds: float = Field(
        0.5,
        gt=0,
        description="Seconds the survivors of a failed training-group version wait for its other members to "
        "check in again before a new version forms without them.",
    )
    rendezvous_poll_interval: float = Field(
        0.005,
        gt=0,
        description="Seconds between looks at the rendezvous store while a read waits for its keys.",
    )
    quote_history: int = Field(
        200, gt=0, description="launch --dry-run: recent accepted reports of the task that it measures."
    )
    leader_check_interval: float = Field(
        1.0,
        gt=0,
        description="Seconds between a replica's checks that it leads (PostgreSQL): a replica that dies "
        "hands clearing and sweeps to another within about this long.",
    )
    db_readers: int = Field(
        4, gt=0, description="PostgreSQL connections per replica that serve reads (writes use one more)."
    )
    stale_upload_seconds: float = Field(
        600.0,
        gt=0,
        description="A partial model upload untouched this long is removed (replicas share the model folder, "
        "so one may only remove the uploads that no replica is still writing).",
    )

    capacity_tolerance: float = Field(
        1.1,
        ge=1,
        description="Pay follows delivered capacity: a match is paid its hourly price times min(1, delivered "
        "/ claimed * this), so run-to-run noise between honest peers costs them nothing "
        "(coordinator.capacity).",
    )
    capacity_flag_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A peer delivering less than this share of the capacity it claimed (against the median "
        "of the run's other peers) is re-rated and flagged; short of it beyond what the clock ratio it "
        "reported throttled explains, it loses reputation.",
    )
    capacity_min_reports: int = Field(
        2, ge=1, description="Reports of a match before its delivered capacity can flag it."
    )

    @property
    def lease_ttl(self) -> float:
        return self.heartbeat_interval * self.lapse_after_heartbeats
