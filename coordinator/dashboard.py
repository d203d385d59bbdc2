"""The web dashboard at ``/``: the market, offers, runs, peers and the ledger, as one HTML page.

Why server-rendered: the page shows what the API shows, read from the same store by the same process,
so there is one way to draw it (here, in Python) and no framework or chart library to vendor. Charts
are inline SVG drawn by :func:`line_chart`. Nothing is loaded from anywhere but the coordinator.

Live updates: a few lines of inline script fetch ``/?partial=1`` (the same view without the page's
frame) every ``HIVEMARKET_DASHBOARD_REFRESH`` seconds and swap in every element marked ``data-live``.
The offer filter is not one of them, so typing in it is never interrupted. With scripts off, the page
still works: the filter is a plain GET form and run names are links.

:func:`gather` reads the store (the edge); :func:`render` is a pure function of what it read.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from coordinator.app import Coordinator
from coordinator.errors import BadRequest
from coordinator.http import Context
from peer.protocol.money import fmt_money
from peer.protocol.run_schemas import LossPoint, RunView
from peer.protocol.schemas import ClearingRoundView, LedgerAuditView, OfferView, PeerView
from peer.protocol.states import LIVE


@dataclass(frozen=True)
class Board:
    """Everything one rendering of the dashboard shows, read at ``now``."""

    now: float
    refresh: float
    clearing_price: str
    supply: int
    demand: int
    rounds: list[ClearingRoundView]  # newest first, as the store keeps them
    q: str
    sort: str
    offers: list[OfferView]
    filter_error: str | None
    runs: list[RunView]
    run: RunView | None  # the run whose loss curve and peers are shown
    loss: list[LossPoint]
    peers: list[PeerView]
    ledger: LedgerAuditView


async def dashboard(coordinator: Coordinator, ctx: Context) -> web.Response:
    """The handler of ``GET /``: the whole page, or with ``partial`` only its live parts."""
    query = ctx.request.query
    board = await gather(coordinator, query.get("q", ""), query.get("sort", "price"), query.get("run"))
    html_page = render(board, partial="partial" in query)
    return web.Response(text=html_page, content_type="text/html", headers={"Cache-Control": "no-store"})


async def gather(coordinator: Coordinator, q: str, sort: str, run_id: str | None) -> Board:
    """Read what the page shows. A bad filter is shown on the page (the table then lists every offer)
    rather than refused, so a typo never blanks the dashboard."""
    store = coordinator.store
    market = await coordinator.market()
    filter_error = None
    try:
        offers = await coordinator.offers(q, sort)
    except BadRequest as e:
        filter_error = e.message
        offers = await coordinator.offers("", "price")
    runs = await store.runs()
    run = _selected(runs, run_id)
    loss = (await store.loss_curve(run.id)).points if run is not None else []
    return Board(
        now=coordinator.clock(),
        refresh=coordinator.settings.dashboard_refresh,
        clearing_price=fmt_money(market.clearing_price),
        supply=market.supply,
        demand=market.demand,
        rounds=market.rounds,
        q=q,
        sort=sort,
        offers=offers,
        filter_error=filter_error,
        runs=runs,
        run=run,
        loss=loss,
        peers=await store.peers(),
        ledger=await coordinator.ledger(incremental=False),  # the books alone: a read, on every refresh
    )


def _selected(runs: Sequence[RunView], run_id: str | None) -> RunView | None:
    """The run asked for (if it exists); else the newest live run; else the newest run."""
    asked = next((r for r in runs if r.id == run_id), None)
    if asked is not None:
        return asked
    live = [r for r in runs if r.state in LIVE]
    return (live or list(runs) or [None])[-1]


# ------------------------------------------------------------------------------------------------ render


def render(board: Board, *, partial: bool = False) -> str:
    """The page (or with ``partial`` only its live parts, for the script to swap in)."""
    live = "\n".join(
        [
            _market(board),
            _offers(board),
            _runs(board),
            _run_detail(board),
            _peers(board),
            _ledger(board),
            f'<p data-live id="updated">updated {_clock(board.now)}</p>',
        ]
    )
    if partial:
        return live
    return PAGE.format(
        refresh_ms=int(board.refresh * 1000),
        form=_filter_form(board),
        live=live,
        style=STYLE,
        script=SCRIPT,
    )


def _market(board: Board) -> str:
    priced = [(r.at, float(r.clearing_price)) for r in reversed(board.rounds) if r.clearing_price is not None]
    depth = list(reversed(board.rounds))
    return f"""<section data-live id="market"><h2>Market</h2>
<p class="figures"><span>clearing price <b id="clearing-price">{_e(board.clearing_price)}</b> per effective
TFLOP-hour</span> <span>supply <b>{board.supply}</b> open offers</span>
<span>demand <b>{board.demand}</b> peers wanted</span></p>
<div class="charts">
{line_chart([Series("clearing price", priced)], element_id="price-plot", title="Clearing price", x_time=True)}
{
        line_chart(
            [
                Series("supply", [(r.at, float(r.supply)) for r in depth]),
                Series("demand", [(r.at, float(r.demand)) for r in depth]),
            ],
            element_id="depth-plot",
            title="Supply and demand",
            x_time=True,
        )
    }
</div></section>"""


def _filter_form(board: Board) -> str:
    run = f'<input type="hidden" name="run" value="{_e(board.run.id)}">' if board.run else ""
    return f"""<form id="offer-filter" method="get" action="/">
<label>Offers where <input name="q" value="{_e(board.q)}" size="40"
placeholder="gpu=H100 vram_gb>=40 price<=2.5"></label>
<label>sorted by <input name="sort" value="{_e(board.sort)}" size="12"></label>{run}
<button type="submit">filter</button></form>"""


def _offers(board: Board) -> str:
    error = f'<p class="error" id="filter-error">{_e(board.filter_error)}</p>' if board.filter_error else ""
    rows = [
        [
            _account(o.account),
            _e(o.gpu if o.gpu_count <= 1 else f"{o.gpu} x{o.gpu_count}"),
            f"{o.vram_gb:.1f}",
            f"{o.tflops:.2f}",
            fmt_money(o.price_per_hour),
            f"{o.reliability:.3f}",
            _capacity(
                o.capacity_flag, o.tflops / o.claimed_tflops if o.claimed_tflops else None, o.capacity_reason
            ),
            _state(o.state),
        ]
        for o in board.offers
    ]
    table = _table(
        "offers-table",
        ["account", "GPU", "VRAM GB", "TFLOP/s", "price/h", "reliability", "capacity", "state"],
        rows,
    )
    return f'<section data-live id="offers"><h2>Offers ({len(rows)})</h2>{error}{table}</section>'


def _runs(board: Board) -> str:
    rows = []
    for r in board.runs:
        live = sum(1 for p in r.peers if p.state == "active")
        target = max(r.target_samples, 1)
        rows.append(
            [
                f'<a href="/?run={_e(r.id)}">{_e(r.id)}</a>',
                _e(r.name),
                _state(r.state),
                _e(r.reason if r.waiting_for is None else f"{r.reason}; not matched: {r.waiting_for}"),
                f'<progress max="{target}" value="{min(r.samples, target)}"></progress> '
                f"{r.samples}/{r.target_samples}",
                str(r.epoch),
                "-" if r.loss is None else f"{r.loss:.4f}",
                f"{live}/{r.peers_max}",
                f"{fmt_money(r.spent)} of {fmt_money(r.budget)}",
            ]
        )
    table = _table(
        "runs-table",
        ["run", "name", "state", "why", "progress", "epoch", "loss", "peers", "spent"],
        rows,
    )
    return f'<section data-live id="runs"><h2>Runs ({len(rows)})</h2>{table}</section>'


def _run_detail(board: Board) -> str:
    run = board.run
    if run is None:
        return '<section data-live id="run"><h2>Run</h2><p class="empty">no runs yet</p></section>'
    chart = line_chart(
        [Series("loss", [(float(p.epoch), p.loss) for p in board.loss])],
        element_id="loss-plot",
        title="Training loss per epoch",
    )
    rows = [
        [
            _account(p.account),
            _state(p.state),
            "yes" if p.joined else "no",
            "-" if p.epoch is None else str(p.epoch),
            str(p.samples),
            fmt_money(p.paid),
            f"{p.audits_passed}/{p.audits_failed}",
            fmt_money(p.fees),
            _capacity(p.capacity_flag, p.capacity_ratio, p.capacity_reason),
        ]
        for p in run.peers
    ]
    table = _table(
        "run-peers-table",
        [
            "account",
            "state",
            "joined",
            "epoch",
            "samples",
            "paid",
            "audits passed/failed",
            "audit fees",
            "capacity",
        ],
        rows,
    )
    group = run.group
    training = (
        ""
        if group is None
        else f' <span title="{_e(group.reason)}">group <b>v{group.version}</b> on the <b>{_e(group.path)}</b>'
        f" path, {len(group.members)} members</span>"
    )
    return f"""<section data-live id="run"><h2>Run {_e(run.id)} <small>{_e(run.name)}</small></h2>
<p class="figures"><span>state {_state(run.state)}</span>{training} <span>spent <b>{fmt_money(run.spent)}</b>
of {fmt_money(run.budget)}</span> <span>held <b>{fmt_money(run.held)}</b></span>
<span>refunded <b>{fmt_money(run.refunded)}</b></span></p>
<div class="charts">{chart}</div>{table}</section>"""


def _peers(board: Board) -> str:
    rows = []
    for p in board.peers:
        t = p.telemetry
        rows.append(
            [
                _account(p.account),
                _e(p.gpu if p.gpu_count <= 1 else f"{p.gpu} x{p.gpu_count}"),
                _state(p.state),
                f"{p.reliability:.3f}",
                str(p.samples),
                fmt_money(p.earned),
                f"{p.audits_passed}/{p.audits_failed}",
                _capacity(p.capacity_flag, None, None),
                _reading(t.power_w if t else None, "W"),
                _reading(t.temperature_c if t else None, "°C"),
                _reading(t.utilization_pct if t else None, "%"),
            ]
        )
    table = _table(
        "peers-table",
        [
            "account",
            "GPU",
            "state",
            "reliability",
            "verified samples",
            "earned",
            "audits",
            "capacity",
            "power",
            "temperature",
            "GPU busy",
        ],
        rows,
    )
    return f'<section data-live id="peers"><h2>Peers ({len(rows)})</h2>{table}</section>'


def _ledger(board: Board) -> str:
    ledger = board.ledger
    verdict = "conserved" if ledger.conserved else "NOT conserved"
    return f"""<section data-live id="ledger"><h2>Ledger audit</h2>
<p class="figures"><span id="ledger-verdict" class="{"ok" if ledger.conserved else "error"}">{verdict}</span>
<span>deposits <b>{fmt_money(ledger.deposits)}</b></span>
<span>holdings <b>{fmt_money(ledger.holdings)}</b> (balances, escrow, earnings, fees, withdrawn)</span></p>
</section>"""


def _table(element_id: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Cells are HTML already (escaped by whoever built them)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    if not rows:
        body = f'<tr class="empty"><td colspan="{len(headers)}">none</td></tr>'
    else:
        body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{element_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _account(account: str) -> str:
    return f'<code title="{_e(account)}">{_e(account[:12])}</code>'


def _state(state: str) -> str:
    return f'<span class="state state-{_e(state)}">{_e(state)}</span>'


def _capacity(flag: str | None, ratio: float | None, reason: str | None) -> str:
    """A peer's delivered capacity (:mod:`coordinator.capacity`): its flag and the ratio delivered over
    claimed ("short 0.25x"), or the measured ratio alone while unflagged, with the measurement behind it
    as the title, so that whoever rents or runs on it sees at a glance a claim its runs did not see
    delivered; "-" before any measurement."""
    if flag is None and ratio is None:
        return "-"
    text = " ".join(part for part in (flag, None if ratio is None else f"{ratio:.2f}x") if part)
    title = f' title="{_e(reason)}"' if reason else ""
    return f'<span class="capacity capacity-{_e(flag or "measured")}"{title}>{_e(text)}</span>'


def _reading(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.0f} {unit}"


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _e(text: str) -> str:
    return html.escape(text, quote=True)


# ------------------------------------------------------------------------------------------------ charts


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]


CHART_WIDTH, CHART_HEIGHT, MARGIN = 520, 200, 48


def line_chart(series: Sequence[Series], *, element_id: str, title: str, x_time: bool = False) -> str:
    """An SVG line chart of one or more series on shared axes, labelled at the ends of each axis.

    ``data-points`` on the ``<svg>`` counts the points drawn, so a test can tell a chart of real data
    from an empty one; with no points at all the chart says so in words.
    """
    points = [p for s in series for p in s.points]
    w, h, m = CHART_WIDTH, CHART_HEIGHT, MARGIN
    head = (
        f'<figure><figcaption>{_e(title)}</figcaption><svg id="{element_id}" class="chart" '
        f'viewBox="0 0 {w} {h}" width="{w}" height="{h}" data-points="{len(points)}" role="img" '
        f'aria-label="{_e(title)}">'
    )
    if not points:
        return head + f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle">no data yet</text></svg></figure>'
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (w - 1.5 * m)

    def sy(y: float) -> float:
        return h - m / 2 - (y - y0) / (y1 - y0) * (h - m)

    fmt_x = _clock if x_time else (lambda x: f"{x:g}")
    parts = [
        head,
        f'<line class="axis" x1="{m}" y1="{h - m / 2}" x2="{w - m / 2}" y2="{h - m / 2}"/>',
        f'<line class="axis" x1="{m}" y1="{m / 2}" x2="{m}" y2="{h - m / 2}"/>',
        f'<text x="{m - 4}" y="{sy(y1) + 4}" text-anchor="end">{y1:.4g}</text>',
        f'<text x="{m - 4}" y="{sy(y0) + 4}" text-anchor="end">{y0:.4g}</text>',
        f'<text x="{m}" y="{h - 4}" text-anchor="start">{_e(fmt_x(x0))}</text>',
        f'<text x="{w - m / 2}" y="{h - 4}" text-anchor="end">{_e(fmt_x(x1))}</text>',
    ]
    for i, s in enumerate(series):
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        parts.append(
            f'<polyline class="series series-{i}" data-series="{_e(s.name)}" points="{coords}"/>'
            + "".join(
                f'<circle class="series-{i}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"/>'
                for x, y in s.points[-1:]
            )
        )
        if len(series) > 1:
            parts.append(
                f'<text class="legend series-{i}" x="{w - m / 2}" y="{m / 2 + 14 * i}" '
                f'text-anchor="end">{_e(s.name)}</text>'
            )
    return "".join(parts) + "</svg></figure>"


# ------------------------------------------------------------------------------------------------ frame

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #1d232b; background: #fbfbfa; }
header { display: flex; align-items: baseline; gap: 2em; border-bottom: 1px solid #ddd; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #eee; white-space: nowrap; }
th { background: #f1f3f5; font-weight: 600; }
tr.empty td { color: #888; font-style: italic; }
.figures span { margin-right: 1.5em; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; } figcaption { color: #555; font-size: .9em; }
svg.chart { background: #fff; border: 1px solid #e4e4e4; }
svg text { font-size: 11px; fill: #555; }
.axis { stroke: #999; stroke-width: 1; }
polyline { fill: none; stroke-width: 2; }
.series-0 { stroke: #2b6cb0; fill: #2b6cb0; } .series-1 { stroke: #c05621; fill: #c05621; }
polyline.series-0, polyline.series-1 { fill: none; }
.state { padding: 0 .4em; border-radius: 3px; background: #edf2f7; }
.state-running, .state-matched, .state-active, .state-finished, .ok { background: #c6f6d5; }
.state-paused, .state-settling, .state-recruiting { background: #fefcbf; }
.state-offline, .state-failed, .state-cancelled, .state-dropped, .state-banned, .error {
  background: #fed7d7; }
.error { padding: .2em .5em; }
.capacity { padding: 0 .4em; border-radius: 3px; }
.capacity-short { background: #fed7d7; } .capacity-throttled { background: #fefcbf; }
form label { margin-right: 1em; }
"""

# Swaps in the live parts every refresh; a failed fetch (a coordinator restarting) just waits for the next.
SCRIPT = """
const every = Number(document.body.dataset.refreshMs);
async function refresh() {
  const url = new URL(location.href);
  url.searchParams.set("partial", "1");
  try {
    const response = await fetch(url, {cache: "no-store"});
    if (response.ok) {
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const part of fresh.querySelectorAll("[data-live]")) {
        const old = document.getElementById(part.id);
        if (old) old.replaceWith(part);
      }
      document.body.dataset.updates = Number(document.body.dataset.updates || 0) + 1;
    }
  } catch (e) { /* unreachable for now: try again next time */ }
  setTimeout(refresh, every);
}
setTimeout(refresh, every);
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hivemarket</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body data-refresh-ms="{refresh_ms}">
<header><h1>hivemarket</h1><nav><a href="/v1/market">market</a> · <a href="/v1/offers">offers</a> ·
<a href="/v1/runs">runs</a> · <a href="/v1/peers">peers</a> · <a href="/metrics">metrics</a> ·
<a href="/openapi.json">API</a></nav></header>
{form}
<main>
{live}
</main>
<script>{script}</script>
</body></html>
"""
