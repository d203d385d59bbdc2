"""Prometheus metrics of a peer (``hivemarket rent --metrics-port`` and ``peer start --metrics-port``).

What an operator watches: how fast the peer trains, how its averaging rounds go, how long it waits for
data, and its GPUs' utilisation, power and temperature.

Why read the event log: the trainer runs in a child process (one per matched run, restarted when it
fails) and already writes every epoch to ``$HIVEMARKET_HOME/runs/RUN/events.jsonl`` (peer/events.py).
At each scrape this collector reads the lines appended since the last one, so the trainer needs no
second channel, and a trainer that restarts or a new run loses nothing. Only what was written after
this process started counts: counters start at zero with the process, as Prometheus expects. GPU
readings come from NVML at scrape time.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from peer.protocol.commands import bind_error, http_url
from peer.settings import PeerSettings

logger = logging.getLogger(__name__)

#: Outcomes of an epoch in which the peer's own round failed (peer/events.py).
FAILED_ROUNDS = ("redo", "caught_up", "skipped")
#: Upper bounds of the round-time histogram, in seconds.
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass
class _Totals:
    """What the events so far add up to."""

    samples: int = 0
    samples_per_second: float = float("nan")  # of the last epoch that trained
    epochs: dict[str, int] = field(default_factory=dict)
    data_wait: float = 0.0
    round_buckets: list[int] = field(default_factory=lambda: [0] * len(ROUND_BUCKETS))
    round_count: int = 0
    round_sum: float = 0.0

    def add(self, event: dict[str, Any]) -> None:
        if event.get("event") != "epoch":
            return
        outcome = str(event.get("outcome"))
        self.epochs[outcome] = self.epochs.get(outcome, 0) + 1
        self.data_wait += float(event.get("data_s") or 0.0)
        round_s = float(event.get("round_s") or 0.0)
        if outcome not in ("averaged", "alone"):
            return
        samples = int(event.get("samples") or 0)
        self.samples += samples
        took = float(event.get("compute_s") or 0.0) + round_s
        if samples and took > 0:
            self.samples_per_second = samples / took
        self.round_count += 1
        self.round_sum += round_s
        for i, bound in enumerate(ROUND_BUCKETS):
            if round_s <= bound:
                self.round_buckets[i] += 1


class PeerCollector:
    """A Prometheus collector over this peer's event logs and GPUs (see the module's docstring)."""

    def __init__(self, home: Path, gpu_uuids: Sequence[str]):
        self.runs_dir = home / "runs"
        self.gpu_uuids = list(gpu_uuids)
        self._totals = _Totals()
        self._lock = threading.Lock()  # scrapes may overlap
        # What exists now is history: counting starts after it.
        self._offsets = {path: path.stat().st_size for path in self._logs()}

    def _logs(self) -> list[Path]:
        return sorted(self.runs_dir.glob("*/events.jsonl"))

    def _read_new(self) -> None:
        for path in self._logs():
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError as e:
                logger.debug(f"Cannot read {path}: {e}")
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
            self._offsets[path] = offset + len(complete)
            for line in complete.splitlines():
                try:
                    self._totals.add(json.loads(line))
                except (ValueError, TypeError):
                    continue

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._read_new()
            t = self._totals
            yield CounterMetricFamily(
                "hivemarket_peer_samples", "Samples trained in epochs whose round completed", value=t.samples
            )
            yield GaugeMetricFamily(
                "hivemarket_peer_samples_per_second",
                "Samples per second of the last epoch that trained (compute and round)",
                value=t.samples_per_second,
            )
            epochs = CounterMetricFamily("hivemarket_peer_epochs", "Epochs by outcome", labels=["outcome"])
            for outcome, count in sorted(t.epochs.items()):
                epochs.add_metric([outcome], count)
            yield epochs
            yield CounterMetricFamily(
                "hivemarket_peer_round_failures",
                f"Epochs whose averaging round failed for this peer (outcome {', '.join(FAILED_ROUNDS)})",
                value=sum(t.epochs.get(outcome, 0) for outcome in FAILED_ROUNDS),
            )
            cumulative = [(f"{b:g}", n) for b, n in zip(ROUND_BUCKETS, t.round_buckets, strict=True)]
            yield HistogramMetricFamily(
                "hivemarket_peer_round_seconds",
                "Time an epoch blocked on its averaging round (matchmaking, all-reduce, state download)",
                buckets=[*cumulative, ("+Inf", t.round_count)],
                sum_value=t.round_sum,
            )
            yield CounterMetricFamily(
                "hivemarket_peer_data_wait_seconds",
                "Seconds the trainer waited for batches",
                value=t.data_wait,
            )
        yield from self._gpus()

    def _gpus(self) -> Iterator[Metric]:
        names = {
            "utilization_pct": ("hivemarket_peer_gpu_utilization_percent", "GPU busy, percent (NVML)"),
            "power_w": ("hivemarket_peer_gpu_power_watts", "GPU power draw, watts (NVML)"),
            "temperature_c": ("hivemarket_peer_gpu_temperature_celsius", "GPU temperature, Celsius (NVML)"),
        }
        families = {key: GaugeMetricFamily(name, doc, labels=["gpu"]) for key, (name, doc) in names.items()}
        from peer.hardware import read_nvml  # torch comes with it: not for commands that never serve metrics

        for index, reading in enumerate(read_nvml(self.gpu_uuids)):
            for key, family in families.items():
                if reading.get(key) is not None:
                    family.add_metric([str(index)], float(reading[key]))
        yield from families.values()


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``url`` has the real port when 0 was asked for."""

    url: str
    _server: Any

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(collector: PeerCollector, host: str, port: int) -> MetricsServer:
    """Serve the collector's metrics on ``host:port`` from a thread of its own (0 picks a free port); a
    port that cannot be bound is an InputError naming it."""
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise bind_error("--metrics-port", port, host, e) from None
    return MetricsServer(f"{http_url(host, server.server_port)}/metrics", server)


def start_peer_metrics(
    port: int | None, settings: PeerSettings, gpu_uuids: Sequence[str]
) -> MetricsServer | None:
    """``--metrics-port``: serve this peer's metrics and print where; nothing when the option is absent."""
    if port is None:
        return None
    server = serve_metrics(PeerCollector(settings.home, gpu_uuids), settings.metrics_host, port)
    click.echo(f"metrics  {server.url}")
    return server
