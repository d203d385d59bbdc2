"""Persistence of the market: the live book a clearing round reads (asks from open offers, bids from live
runs), the matches and the round it records, and the history and depth of the book.

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLStore` runs them inside one transaction with the request's nonce. Who trades
at what price, and why a run is short of peers, is :func:`coordinator.market.clear_round`'s pure decision;
an ask's reliability is the peer's standing (:func:`coordinator.offer_store.standing`), and the runs a round
fills move on through :func:`coordinator.run_store.advance`.
"""

from __future__ import annotations

import json
import sqlite3

from coordinator import market, offer_store, quotes, run_store, runs, sql
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units, to_units
from peer.protocol.run_schemas import QuoteBody, QuoteView, check_run_spec
from peer.protocol.schemas import ClearingRoundView
from peer.protocol.spec import RunSpec

_ASKS_QUERY = """
    SELECT l.id AS lease_id, o.account, o.price_units, o.tflops, o.claimed_tflops, o.clock_ratio, o.vram_gb,
           p.uptime, p.lapses, p.audits_passed, p.audits_failed, p.verdicts_overturned, p.shortfalls
    FROM leases l JOIN offers o ON o.lease_id = l.id JOIN peers p ON p.account = o.account
    WHERE l.state = 'active' AND l.run_id IS NULL AND o.roles LIKE '%"trainer"%'
      -- a peer that gave a run its place back (it cannot train it) or was banned from it sits out
      -- while that run bids: the market would otherwise pick it for the run again and again
      AND o.account NOT IN (
        SELECT m.account FROM matches m JOIN runs r ON r.id = m.run_id
        WHERE m.state IN ('left', 'banned') AND r.state IN ('recruiting', 'running', 'paused'))
"""
_BIDS_QUERY = """
    SELECT r.id, r.max_price_units, r.peers_max, r.min_vram_gb,
           (SELECT COUNT(*) FROM matches m WHERE m.run_id = r.id AND m.state = 'active') AS active
    FROM runs r WHERE r.state IN ('recruiting', 'running', 'paused')
"""


def clear(
    conn: sqlite3.Connection,
    now: float,
    env: Envelope | None,
    config: market.MarketConfig,
    policy: runs.RunPolicy,
) -> ClearingRoundView | None:
    """One clearing round over the live book, decided by :func:`coordinator.market.clear_round`.

    A scheduled round (no ``env``) over an empty side of the book is skipped and returns None, so the
    history only holds rounds that could have traded; an admin's round is always recorded.
    """
    if env is not None:
        sql.claim_nonce(conn, env)
    bids = _bids(conn)
    if env is None and not bids:  # nothing to clear, and reading every ask would hold the writer for nothing
        _record_shortfalls(conn, {})
        return None
    asks, lease_of, clock_of = _asks(conn)
    result, shortfalls = market.clear_round(asks, bids, config)
    _record_shortfalls(conn, shortfalls)
    if env is None and not asks:
        return None
    tflops = {ask.account: ask.tflops for ask in asks}
    for match in result.matches:
        units = to_units(match.price_per_hour)
        conn.execute(
            "INSERT INTO matches (run_id, lease_id, account, price_units, state, matched_at, tflops,"
            " priced_clock_ratio) VALUES (?, ?, ?, ?, 'active', ?, ?, ?)",
            (
                match.run_id,
                lease_of[match.account],
                match.account,
                units,
                now,
                tflops[match.account],
                clock_of[match.account],
            ),
        )
        conn.execute(
            "UPDATE leases SET run_id = ?, price_units = ? WHERE id = ?",
            (match.run_id, units, lease_of[match.account]),
        )
    run_store.advance(conn, now, policy)  # recruiting or paused runs may now run
    price = None if result.clearing_price is None else to_units(result.clearing_price)
    row = conn.execute(
        "INSERT INTO rounds (at, clearing_price_units, trades, supply, demand, reason)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING *",
        (now, price, len(result.matches), result.supply, result.demand, result.reason),
    ).fetchone()
    return _round_view(row)


def quote(
    conn: sqlite3.Connection,
    body: QuoteBody,
    config: market.MarketConfig,
    quote_config: quotes.QuoteConfig,
    history: int,
) -> QuoteView:
    """The quote of :func:`coordinator.quotes.quote` over the live book and this market's measurements of
    the task: the epoch seconds of the last ``history`` accepted reports of runs with the same task,
    options and ``batch.target``."""
    spec = check_run_spec(body.spec)
    bid = market.Bid(quotes.QUOTE_RUN, body.max_price, body.peers_max, body.min_vram_gb)
    same = sorted(
        row["id"] for row in conn.execute("SELECT id, spec FROM runs") if _trains_like(row["spec"], spec)
    )
    measured = (
        [
            row["seconds"]
            for row in conn.execute(
                f"SELECT seconds FROM reports WHERE run_id IN ({','.join('?' * len(same))})"
                " AND pay_state != 'voided' ORDER BY accepted_at DESC LIMIT ?",
                (*same, history),
            )
        ]
        if same
        else []
    )
    asks, _, _ = _asks(conn)
    return quotes.quote(asks, _bids(conn), bid, spec, measured, body.flops_per_sample, quote_config, config)


def _trains_like(stored: str, spec: RunSpec) -> bool:
    """Whether a run's stored spec trains what ``spec`` would: the same task, options and batch.target."""
    stored_spec = json.loads(stored)
    if not isinstance(stored_spec, dict) or stored_spec.get("task") != spec.task:  # cheap, before validating
        return False
    try:
        other = check_run_spec(stored_spec)
    except ValueError:  # a run created before specs were validated
        return False
    return (other.task, other.options, other.batch.target) == (spec.task, spec.options, spec.batch.target)


def _record_shortfalls(conn: sqlite3.Connection, reasons: dict[str, str | None]) -> None:
    """Each bidding run's reason for being short of peers (None: it got them); a run that no longer bids
    has none. Written only where it changed, so a quiet market does not rewrite every run each round."""
    stale = conn.execute("SELECT id FROM runs WHERE market_reason IS NOT NULL").fetchall()
    for run_id, reason in [
        *((row["id"], None) for row in stale if row["id"] not in reasons),
        *reasons.items(),
    ]:
        conn.execute(
            "UPDATE runs SET market_reason = ? WHERE id = ? AND market_reason IS DISTINCT FROM ?",
            (reason, run_id, reason),
        )


def _asks(conn: sqlite3.Connection) -> tuple[list[market.Ask], dict[str, str], dict[str, float]]:
    """The book's asks, each ask's lease and the clock ratio it is weighed by (kept with a match: throttling
    explains a shortfall only beyond the clock ratio it was priced at, :mod:`coordinator.capacity`)."""
    asks, lease_of, clock_of = [], {}, {}
    for row in conn.execute(_ASKS_QUERY):
        # a GPU whose heartbeats report its clocks held down is priced on what it runs at now, unless a run
        # re-rated its offer: its tflops are then what it delivered, throttled, and are not cut twice
        clock_ratio = 1.0 if row["claimed_tflops"] is not None else (row["clock_ratio"] or 1.0)
        asks.append(
            market.Ask(
                account=row["account"],
                price_per_hour=from_units(row["price_units"]),
                tflops=row["tflops"] * clock_ratio,
                vram_gb=row["vram_gb"],
                reliability=offer_store.standing(row),
            )
        )
        lease_of[row["account"]] = row["lease_id"]
        clock_of[row["account"]] = clock_ratio
    return asks, lease_of, clock_of


def _bids(conn: sqlite3.Connection) -> list[market.Bid]:
    return [
        market.Bid(
            run_id=row["id"],
            max_price=from_units(row["max_price_units"]),
            units=row["peers_max"] - row["active"],
            min_vram_gb=row["min_vram_gb"],
        )
        for row in conn.execute(_BIDS_QUERY)
        if row["peers_max"] > row["active"]
    ]


def _round_view(row: sqlite3.Row) -> ClearingRoundView:
    price = row["clearing_price_units"]
    return ClearingRoundView(
        at=row["at"],
        clearing_price=None if price is None else from_units(price),
        trades=row["trades"],
        supply=row["supply"],
        demand=row["demand"],
        reason=row["reason"],
    )


def rounds(conn: sqlite3.Connection, limit: int) -> list[ClearingRoundView]:
    return [
        _round_view(row) for row in conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT ?", (limit,))
    ]


def depth(conn: sqlite3.Connection) -> tuple[int, int]:
    """(supply, demand): open trainer offers with a live lease, and peers wanted by live runs."""
    return len(_asks(conn)[0]), sum(bid.units for bid in _bids(conn))
