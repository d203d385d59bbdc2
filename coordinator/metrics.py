"""Prometheus metrics of one coordinator (a registry per app, so several can live in one process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class CoordinatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "hivemarket_http_requests", "HTTP requests served", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "hivemarket_http_request_seconds",
            "Time to serve an HTTP request",
            ["route"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.runs = Gauge("hivemarket_runs", "Runs by state", ["state"], registry=r)
        self.live_peers = Gauge("hivemarket_live_peers", "Peers holding an active lease", registry=r)
        self.lapsed_leases = Counter("hivemarket_lapsed_leases", "Leases that lapsed", registry=r)
        self.clearing_price = Gauge(
            "hivemarket_clearing_price",
            "Last clearing price per effective TFLOP-hour (NaN before any trade)",
            registry=r,
        )
        self.clearing_price.set(float("nan"))
        self.clearing_rounds = Counter("hivemarket_clearing_rounds", "Market clearing rounds", registry=r)
        self.trades = Counter("hivemarket_trades", "Peers matched to runs", registry=r)
        self.audits = Counter(
            "hivemarket_audits", "Contribution audits decided, by verdict", ["verdict"], registry=r
        )
        self.leader = Gauge(
            "hivemarket_leader", "1 while this replica clears the market and sweeps leases", registry=r
        )
        self.ledger_conserved = Gauge(
            "hivemarket_ledger_conserved", "1 when the last audit balanced", registry=r
        )
