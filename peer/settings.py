"""Typed settings with environment overrides.

Every timeout and interval the peer uses lives here, so that an operator can tune a slow link with an
environment variable (``HIVEMARKET_<FIELD>``, e.g. ``HIVEMARKET_BOOTSTRAP_TIMEOUT=60``) instead of
editing code, and so that tests can shorten them without touching module globals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The cheats :mod:`peer.adversary` can play (named here so that reading settings never imports torch).
AdversaryKind = Literal[
    "free-rider",
    "random-gradient",
    "inflated-samples",
    "replay",
    "noisy-round",
    "poisoned-round",
    "capacity-liar",
    "lazy-validator",
]


class PeerSettings(BaseSettings):
    """Settings of a peer node; read from the environment each time :func:`load_settings` is called."""

    model_config = SettingsConfigDict(env_prefix="HIVEMARKET_", frozen=True)

    home: Path = Field(
        default_factory=lambda: Path.home() / ".hivemarket",
        description="Folder for the identity file and local state.",
    )
    model_dirs: str = Field(
        "",
        description="Folders of local transformers checkpoints (or folders of them), separated by ':', "
        "that a run may name as its base model by their digest (`hivemarket models` lists them).",
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
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address --metrics-port binds; 0.0.0.0 lets a Prometheus on another machine scrape it.",
    )
    bootstrap_wait: float = Field(
        120.0,
        gt=0,
        description="Seconds a matched peer waits for the run's first peer to join (behind a NAT: the first "
        "peer others can dial).",
    )
    reachability: Literal["auto", "public", "private"] = Field(
        "auto",
        description="Whether other peers can dial this one: auto asks the coordinator to dial it back at "
        "start; public and private skip the check (private: behind a NAT, dialed through relays).",
    )
    state_load_timeout: float = Field(
        60.0, gt=0, description="Seconds to download the training state from the run's other peers."
    )
    run_poll_interval: float = Field(
        1.0, gt=0, description="Seconds between looks at a paused or settling run."
    )
    view_refresh_interval: float = Field(
        0.25,
        gt=0,
        description="Seconds at least between a trainer's background fetches of its run's view: fetched "
        "after every epoch, a digits swarm's views were a third of the coordinator's CPU (each one "
        "aggregated the run's reports and audits; it now reads tallies kept as they are decided).",
    )
    state_announce_interval: float = Field(
        2.0,
        ge=0,
        description="Seconds at least between a trainer's announcements of its epoch in the DHT (whom "
        "joiners load the state from): announced after every epoch of a 4-peer digits swarm, the DHT "
        "stores kept its p2pd daemons at 0.28 of the machine's 2 cores.",
    )
    report_drain_timeout: float = Field(
        30.0, gt=0, description="Seconds a stopping trainer waits for its queued reports to be sent."
    )
    finish_timeout: float = Field(
        120.0, gt=0, description="Seconds a trainer of a settling run waits to upload or see the end."
    )
    trainer_stop_timeout: float = Field(
        30.0, gt=0, description="Seconds a trainer has to stop before it is killed."
    )
    trainer_restarts: int = Field(
        5, ge=0, description="Times a trainer that failed is started again for the same run."
    )
    chunk_deadline_floor: float = Field(
        2.0,
        gt=0,
        description="Shortest wait, in seconds, for a peer's next chunk of an all-reduce or state download "
        "before it counts as failed (peer.deadlines; the deadlines follow measured rounds above it).",
    )
    chunk_deadline_factor: float = Field(
        2.0, gt=0, description="The chunk wait is this many times the slowest recent all-reduce round."
    )
    fast_path: bool = Field(
        True,
        description="Offer this peer for runs' torch.distributed fast path (it advertises a reach address "
        "beside its DHT address); false keeps it on hivemind's averager (for example behind a firewall that "
        "lets the DHT's port through and nothing else).",
    )
    reach_timeout: float = Field(
        2.5,
        gt=0,
        description="Seconds a fast-path member waits for another member's reach address, per attempt (3). "
        "Longer than TCP's first SYN retransmission (1 s): with 1 s, one lost packet failed an attempt, and "
        "on the lab's 5% lossy links a group's build failed in about one trial of eight.",
    )
    report_backlog: int = Field(
        4,
        ge=1,
        description="Most reports a trainer lets wait for a slow coordinator before it waits too: a report "
        "acknowledged later than the validators keep its epoch (HIVEMARKET_AUDIT_WINDOW) is never paid.",
    )
    regroup_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds the survivors of a failed fast-path round wait for the coordinator's next group "
        "version before training the epoch again on what they have.",
    )
    train_threads: int = Field(
        0, ge=0, description="Threads torch uses for training on the CPU; 0 keeps torch's default."
    )
    device: str | None = Field(
        None, description="Training device, e.g. cuda:1 or cpu [default: cuda when available, else cpu]."
    )
    audit_window: int = Field(
        16,
        ge=1,
        description="Recent epochs whose start parameters a peer keeps (on the CPU) to audit others.",
    )
    audits_per_claim: int = Field(8, ge=1, le=64, description="Most audits a peer takes at once.")
    capacity_lie: float = Field(
        4.0,
        gt=0,
        description="Demonstrations and tests only: how many times its probed TFLOP/s a capacity-liar "
        "(HIVEMARKET_ADVERSARY=capacity-liar) claims in its offer.",
    )
    adversary: AdversaryKind | None = Field(
        None,
        description="Demonstrations and tests only: this peer cheats in the named way (peer.adversary) so "
        "that its audits fail (or, noisy-round and poisoned-round, the fast path's round checks catch it).",
    )


def load_settings() -> PeerSettings:
    """Read the settings from the environment now (tests change the environment between calls)."""
    return PeerSettings()
