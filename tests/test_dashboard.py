"""The dashboard and the metrics of a running ``hivemarket demo``, as a user sees them: in a real headless
Chromium, and scraped the way Prometheus scrapes. And the delivered-capacity flag of a peer that claims
more than it delivers (coordinator.capacity), on the offers, run-peers and peers tables, on both stores.

The screenshot is kept in tests/artifacts/dashboard.png (ignored by git) for people to look at.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from pathlib import Path

import pytest

from coordinator.dashboard import _capacity
from tests.browser import Browser
from tests.conftest import Databases
from tests.harness import DemoProcess, group_members, kill_group, prometheus_series, wait_until
from tests.test_capacity_api import LIE, Pace, RatedPeer
from tests.test_runs_api import H100, own_market, peer_of

SCREENSHOT = Path(__file__).parent / "artifacts" / "dashboard.png"

# What the page shows right now: rows of each table, points of each chart, live updates so far.
PAGE_STATE = """
const rows = id => document.querySelectorAll(`#${id} tbody tr:not(.empty)`).length;
const points = id => Number(document.getElementById(id)?.dataset.points || 0);
return {
  offers: rows("offers-table"), runs: rows("runs-table"), run_peers: rows("run-peers-table"),
  peers: rows("peers-table"), loss: points("loss-plot"), price: points("price-plot"),
  loss_line: document.querySelector("#loss-plot polyline")?.getAttribute("points") || "",
  updates: Number(document.body.dataset.updates || 0),
  ledger: document.getElementById("ledger-verdict")?.textContent || "",
  filter_error: document.getElementById("filter-error")?.textContent || null,
};
"""


# Each table's capacity cells by the account of their row: the marker's text and its title (the reason).
CAPACITY_CELLS = """
const cells = id => Object.fromEntries([...document.querySelectorAll(`#${id} tbody tr`)].map(row => [
  row.querySelector("code")?.title,
  {text: row.querySelector(".capacity")?.textContent ?? null,
   title: row.querySelector(".capacity")?.getAttribute("title") ?? null},
]));
return {offers: cells("offers-table"), run_peers: cells("run-peers-table"), peers: cells("peers-table")};
"""


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return prometheus_series(response.read().decode())


@pytest.mark.timeout(600)
def test_dashboard_and_metrics_of_a_running_demo(tmp_path: Path) -> None:
    # --stay: the demo keeps its coordinator and peers up after the run, so that nothing below races the
    # run's end (on an idle machine the digits run trains for about 4 s); --no-drop: every peer's metrics
    # stay up.
    demo = DemoProcess(tmp_path, "--peers", "3", "--no-drop", "--stay")
    browser = None
    try:
        (url,) = wait_until(lambda: demo.printed(r"^dashboard (http://\S+)/ "), 120, "the dashboard's URL")
        browser = Browser()
        browser.get(url + "/")  # loaded early: the run's epochs reach it through live updates
        peer_metrics = wait_until(lambda: demo.printed(r"^peer-\d+\s+metrics (http://\S+)"), 180, "metrics")
        assert len(peer_metrics) == 3, peer_metrics
        wait_until(lambda: demo.printed(r"^staying "), 300, "the run to finish and the demo to stay up")

        def trained() -> dict | None:
            state = browser.run(PAGE_STATE)
            return state if state["loss"] >= 3 and state["updates"] >= 1 else None

        state = wait_until(trained, 60, "the loss plot to show 3 epochs through live updates", interval=0.5)
        coordinator = _scrape(url + "/metrics")
        assert coordinator.get('hivemarket_audits_total{verdict="passed"}', 0) > 0, coordinator
        peers = [_scrape(u) for u in peer_metrics]
        peer = max(peers, key=lambda s: s["hivemarket_peer_samples_total"])
        assert peer["hivemarket_peer_samples_total"] > 0, peers

        # The page drew real data: the run, its peers and the market, and a loss line through the points.
        assert state["runs"] == 1 and state["run_peers"] >= 2, state
        assert state["offers"] >= 3 and state["peers"] >= 3, state
        assert state["price"] >= 1, state  # the clearing round that matched the run
        assert len(state["loss_line"].split()) == state["loss"], state
        assert state["ledger"] == "conserved", state

        # Live values of the named series, the coordinator's and a peer's.
        assert coordinator["hivemarket_live_peers"] >= 2, coordinator
        assert sum(v for k, v in coordinator.items() if k.startswith("hivemarket_runs{")) == 1, coordinator
        assert coordinator["hivemarket_clearing_price"] > 0, coordinator  # NaN before any trade
        assert "hivemarket_lapsed_leases_total" in coordinator, coordinator
        assert coordinator['hivemarket_http_request_seconds_count{route="/v1/runs/{run_id}/reports"}'] > 0
        assert peer['hivemarket_peer_epochs_total{outcome="averaged"}'] > 0, peer
        assert peer["hivemarket_peer_round_seconds_count"] > 0, peer
        assert peer["hivemarket_peer_samples_per_second"] > 0, peer
        assert "hivemarket_peer_data_wait_seconds_total" in peer, peer

        # The offer filter: a filter keeps the cheapest peer only; a bad one is named on the page.
        browser.get(url + "/?q=price<=1.05")
        assert browser.run(PAGE_STATE)["offers"] == 1
        browser.get(url + "/?q=vram>=40")
        assert "'vram>=40'" in browser.run(PAGE_STATE)["filter_error"]

        browser.get(url + "/")
        wait_until(lambda: browser.run(PAGE_STATE)["loss"] >= 3, 30, "the page to draw the loss again")
        png = browser.screenshot(SCREENSHOT)
        assert png.startswith(b"\x89PNG") and len(png) > 20_000, len(png)  # a rendered page, not a blank

        demo.proc.send_signal(signal.SIGTERM)  # a staying demo ends normally when told to
        demo.proc.wait(timeout=120)
        assert demo.proc.returncode == 0, "".join(demo.lines)[-4000:]
    finally:
        if browser is not None:
            browser.close()
        kill_group(demo.proc.pid)
    assert not group_members(demo.proc.pid), "the demo left processes behind"
    assert not group_members(browser.proc.pid), "chromium left processes behind"


@pytest.mark.timeout(180)
async def test_dashboard_flags_a_peer_short_of_its_claim(tmp_path: Path, databases: Databases) -> None:
    """Three peers of a run, one claiming 4x an H100, report the same work at the same pace: the page shows
    the liar's flag and ratio ("short 0.25x") with the measurement as the title, in the offers, run-peers
    and peers tables, and nothing against the honest peers (the browser runs in a thread, so that the
    peers' heartbeats go on meanwhile)."""
    async with own_market(tmp_path, databases, "100") as market:
        url = market.server.url
        async with RatedPeer(url) as a, RatedPeer(url) as b, RatedPeer(url, H100.tflops * LIE) as liar:
            run = await market.launch(peers=(3, 3), target=1000)
            await market.clear()
            pace = Pace(market, run.id)
            await pace.join(a, b, liar)
            for epoch in range(3):
                for p in (a, b, liar):
                    view = await pace.report(p, epoch)
            reason = peer_of(view, liar.account).capacity_reason
            assert peer_of(view, liar.account).capacity_flag == "short" and reason is not None

            browser = await asyncio.to_thread(Browser)
            try:
                await asyncio.to_thread(browser.get, f"{url}/?run={run.id}")
                cells = await asyncio.to_thread(browser.run, CAPACITY_CELLS)
            finally:
                await asyncio.to_thread(browser.close)
            assert cells["offers"][liar.account]["text"] == f"short {1 / LIE:.2f}x", cells
            assert cells["offers"][liar.account]["title"] == f"run {run.id}: {reason}", cells
            assert cells["run_peers"][liar.account] == {"text": f"short {1 / LIE:.2f}x", "title": reason}
            assert cells["peers"][liar.account]["text"] == "short", cells
            for p in (a, b):
                assert cells["offers"][p.account]["text"] is None, cells  # "-": never re-rated
                assert cells["run_peers"][p.account]["text"] == "1.00x", cells  # measured, not flagged
                assert cells["peers"][p.account]["text"] is None, cells
            await market.conserved()
        assert not group_members(browser.proc.pid), "chromium left processes behind"


def test_capacity_marker_escapes_its_reason() -> None:
    cell = _capacity("short", 0.25, 'run r: <script>alert("x")</script> & more')
    assert cell == (
        '<span class="capacity capacity-short" title="run r: &lt;script&gt;alert(&quot;x&quot;)'
        '&lt;/script&gt; &amp; more">short 0.25x</span>'
    )
    assert _capacity(None, None, None) == "-"
