"""What the dashboard draws and what a peer's metrics count, without processes: the pure parts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from coordinator.dashboard import Board, Series, line_chart, render
from peer.metrics import ROUND_BUCKETS, PeerCollector
from peer.protocol.run_schemas import LossPoint
from peer.protocol.schemas import LedgerAuditView
from tests.harness import peer_view, prometheus_series, run_view

HOSTILE = '<script>alert("x")</script>'


def _board(**changes: object) -> Board:
    run = run_view([peer_view("cd" * 32, samples=64)], name=HOSTILE, reason=HOSTILE, samples=250, loss=0.5)
    fields: dict[str, object] = dict(
        now=0.0,
        refresh=2.0,
        clearing_price="-",
        supply=0,
        demand=0,
        rounds=[],
        q=HOSTILE,
        sort="price",
        offers=[],
        filter_error=None,
        runs=[run],
        run=run,
        loss=[LossPoint(epoch=0, loss=2.3, samples=64), LossPoint(epoch=1, loss=1.1, samples=64)],
        peers=[],
        ledger=LedgerAuditView(conserved=True, deposits="5", holdings="5"),
    )
    return Board(**(fields | changes))  # type: ignore[arg-type]


def test_the_page_escapes_what_users_typed() -> None:
    page = render(_board())
    assert HOSTILE not in page  # a run's name, its reason and the filter box are all someone's input
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own refresh script


def test_the_loss_plot_draws_every_epoch_and_says_when_there_is_none() -> None:
    page = render(_board(), partial=True)
    assert 'id="loss-plot"' in page and 'data-points="2"' in page
    assert "<html" not in page  # the live parts only, for the script to swap in
    empty = line_chart([Series("loss", [])], element_id="x", title="t")
    assert 'data-points="0"' in empty and "no data yet" in empty and "<polyline" not in empty


def test_a_chart_maps_points_inside_its_frame() -> None:
    svg = line_chart(
        [Series("a", [(0.0, 1.0), (10.0, 3.0)]), Series("b", [(5.0, 2.0)])], element_id="c", title="t"
    )
    assert svg.count("<polyline") == 2 and 'data-points="3"' in svg
    for coords in re.findall(r'<polyline[^>]* points="([^"]*)"', svg):
        for pair in coords.split():
            x, y = map(float, pair.split(","))
            assert 0 <= x <= 520 and 0 <= y <= 200


def _scrape(collector: PeerCollector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return prometheus_series(generate_latest(registry).decode())


def _epoch(
    log: Path, outcome: str, samples: int, round_s: float, data_s: float = 0.1, end: str = "\n"
) -> None:
    event = {
        "event": "epoch",
        "outcome": outcome,
        "samples": samples,
        "compute_s": 1.0,
        "round_s": round_s,
        "data_s": data_s,
    }
    with log.open("a") as out:
        out.write(json.dumps(event) + end)


def test_peer_metrics_count_the_epochs_written_after_start(tmp_path: Path) -> None:
    log = tmp_path / "runs" / "run-1" / "events.jsonl"
    log.parent.mkdir(parents=True)
    _epoch(log, "averaged", 999, 0.5)  # history from before this process: not counted
    collector = PeerCollector(tmp_path, gpu_uuids=[])
    assert _scrape(collector)["hivemarket_peer_samples_total"] == 0

    _epoch(log, "averaged", 100, 0.5)
    _epoch(log, "redo", 100, 15.0)
    _epoch(log, "caught_up", 0, 3.0)
    second = tmp_path / "runs" / "run-2" / "events.jsonl"  # a new run's trainer
    second.parent.mkdir(parents=True)
    _epoch(second, "alone", 50, 0.0)
    _epoch(second, "averaged", 70, 1.0, end="")  # still being written: read at the next scrape
    series = _scrape(collector)
    assert series["hivemarket_peer_samples_total"] == 150
    assert series['hivemarket_peer_epochs_total{outcome="redo"}'] == 1
    assert series["hivemarket_peer_round_failures_total"] == 2  # redo and caught_up
    assert series["hivemarket_peer_round_seconds_count"] == 2  # rounds that completed
    assert series['hivemarket_peer_round_seconds_bucket{le="0.5"}'] == 2
    assert math.isclose(series["hivemarket_peer_data_wait_seconds_total"], 0.4)
    assert series["hivemarket_peer_samples_per_second"] == 50.0  # 50 samples in 1 s of compute

    with second.open("a") as out:
        out.write("\n")
    series = _scrape(collector)
    assert series["hivemarket_peer_samples_total"] == 220
    assert series[f'hivemarket_peer_round_seconds_bucket{{le="{ROUND_BUCKETS[-1]:g}"}}'] == 3
    assert not any(name.startswith("hivemarket_peer_gpu_") and "{" in name for name in series)  # no GPUs
