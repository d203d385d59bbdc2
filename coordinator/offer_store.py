"""Persistence of offers and the leases they open: posting an offer, renewing its lease by heartbeat,
withdrawing it, the book of offers, the peers behind them, and the standing the market prices each peer by.

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLStore` runs them inside one transaction with the request's nonce. Decisions
(credited uptime, reliability, lapses) are :mod:`coordinator.leases`'s pure functions; this module reads the
state they need and writes what they return.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator import capacity, group_store, leases, match_store, run_store, runs, sql, verification
from coordinator.errors import ApiError, Conflict, Forbidden, NotFound
from coordinator.leases import LeaseConfig
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units, to_units
from peer.protocol.schemas import LeaseView, OfferBody, OfferResponse, OfferView, PeerView, Telemetry

OFFER_QUERY = """
    SELECT o.*, l.state AS lease_state, l.run_id, l.last_heartbeat, l.price_units AS lease_price_units,
           p.uptime, p.lapses, p.audits_passed, p.audits_failed, p.verdicts_overturned, p.shortfalls
    FROM offers o JOIN leases l ON l.id = o.lease_id JOIN peers p ON p.account = o.account
"""


def standing_of(conn: sqlite3.Connection, account: str) -> float:
    row = conn.execute("SELECT * FROM peers WHERE account = ?", (account,)).fetchone()
    return standing(row) if row else leases.reliability(0.0, 0)


def standing(row: Mapping[str, Any]) -> float:
    """A peer's reliability as the market prices it: uptime against lapses, times its audit reputation; a
    capacity shortfall no throttling explained (:mod:`coordinator.capacity`) weighs as a failed audit."""
    return leases.reliability(row["uptime"], row["lapses"]) * verification.reputation(
        row["audits_passed"], row["audits_failed"] + row["verdicts_overturned"] + row["shortfalls"]
    )


def lease_view(row: Mapping[str, Any], times: LeaseConfig) -> LeaseView:
    return LeaseView(
        id=row["id"],
        account=row["account"],
        state=row["state"],
        heartbeat_interval=times.heartbeat_interval,
        expires_at=row["last_heartbeat"] + times.ttl,
        run_id=row["run_id"],
        price_per_hour=None if row["price_units"] is None else from_units(row["price_units"]),
    )


def offer_view(row: Mapping[str, Any]) -> OfferView:
    state = {"active": "matched" if row["run_id"] else "open", "released": "withdrawn"}.get(
        row["lease_state"], "offline"
    )
    return OfferView(
        account=row["account"],
        price_per_hour=from_units(row["price_units"]),
        gpu=row["gpu"],
        gpu_count=row["gpu_count"],
        vram_gb=row["vram_gb"],
        tflops=row["tflops"],
        reliability=standing(row),
        roles=json.loads(row["roles"]),
        min_lease_seconds=row["min_lease_seconds"],
        state=state,
        claimed_tflops=row["claimed_tflops"],
        capacity_flag=row["capacity_flag"],
        capacity_reason=row["capacity_reason"],
        power_w=row["probe_power_w"],
        thermal_headroom_c=row["thermal_headroom_c"],
        watts_per_tflop=capacity.watts_per_tflop(row["probe_power_w"], row["tflops"]),
        lease_id=row["lease_id"],
        peer_id=row["peer_id"],
        maddrs=json.loads(row["maddrs"]),
        updated_at=row["updated_at"],
    )


def post_offer(
    conn: sqlite3.Connection,
    now: float,
    env: Envelope,
    body: OfferBody,
    times: LeaseConfig,
) -> OfferResponse:
    """Post (or replace) the account's offer, renewing its active lease or opening one. One read, sent
    with the nonce's claim (one round trip on PostgreSQL): the peer's standing and its active lease; the
    answer is built from them and the body, not read back (a second round trip)."""
    account = env.account
    settle_claim = sql.send_claims(conn, [env])
    conn.execute("INSERT INTO peers (account) VALUES (?) ON CONFLICT DO NOTHING", (account,))
    row = conn.execute(
        "SELECT p.uptime, p.lapses, p.audits_passed, p.audits_failed, p.verdicts_overturned, p.shortfalls,"
        " o.tflops AS rated_tflops, o.claimed_tflops, o.capacity_flag, o.capacity_reason,"
        " l.id, l.last_heartbeat, l.run_id, l.price_units"
        " FROM peers p LEFT JOIN offers o ON o.account = p.account"
        " LEFT JOIN leases l ON l.id = o.lease_id AND l.state = 'active'"
        " WHERE p.account = ?",
        (account,),
    ).fetchone()
    (replayed,) = settle_claim([None])
    if replayed is not None:
        raise replayed
    peer = dict(row)
    if row["id"] is not None:
        lease = {"id": row["id"], "account": account, "state": "active", "last_heartbeat": now}
        lease |= {"run_id": row["run_id"], "price_units": row["price_units"]}
        peer["uptime"] += _renew(conn, lease, row["last_heartbeat"], now, times.ttl)
    else:
        lease = {"id": secrets.token_hex(8), "account": account, "state": "active", "last_heartbeat": now}
        lease |= {"run_id": None, "price_units": None}
        conn.execute(
            "INSERT INTO leases (id, account, state, created_at, last_heartbeat)"
            " VALUES (?, ?, 'active', ?, ?)",
            (lease["id"], account, now, now),
        )
    hw = body.hardware
    # An offer flagged short keeps its measured capacity, claim and flag when its peer posts it again
    # (``rent`` re-posts after a lapse): a claim a run did not see delivered is not taken back at its word.
    # One re-rated for throttling is rated on the fresh probe it posts (after cooling down), its flag cleared.
    short = row["capacity_flag"] == "short"
    tflops = min(hw.tflops, row["rated_tflops"]) if short else hw.tflops
    offer = {
        "account": account,
        "price_units": to_units(body.price_per_hour),
        "gpu": hw.gpu,
        "gpu_count": hw.gpu_count,
        "vram_gb": hw.vram_gb,
        "tflops": tflops,
        "ram_gb": hw.ram_gb,
        "cpu_cores": hw.cpu_cores,
        "roles": json.dumps(sorted(set(body.roles))),
        "min_lease_seconds": body.min_lease_seconds,
        "peer_id": body.peer_id,
        "maddrs": json.dumps(body.maddrs),
        "lease_id": lease["id"],
        "updated_at": now,
        "probe_power_w": hw.power_w,
        "thermal_headroom_c": hw.thermal_headroom_c,
        "claimed_tflops": row["claimed_tflops"] if short else None,
        "capacity_flag": row["capacity_flag"] if short else None,
        "capacity_reason": row["capacity_reason"] if short else None,
    }
    conn.execute(
        f"INSERT INTO offers ({', '.join(offer)}) VALUES ({', '.join('?' * len(offer))})"
        " ON CONFLICT (account) DO UPDATE SET "
        + ", ".join(f"{column} = excluded.{column}" for column in offer if column != "account"),
        tuple(offer.values()),
    )
    view = offer_view({**peer, **offer, "lease_state": "active", "run_id": lease["run_id"]})
    return OfferResponse(offer=view, lease=lease_view(lease, times))


def _renew(conn: sqlite3.Connection, lease: Mapping[str, Any], last: float, now: float, ttl: float) -> float:
    """Renew ``lease`` (last heard from at ``last``) at ``now``; the uptime credited to its peer."""
    uptime = leases.credited_uptime(now, last, ttl)
    conn.execute("UPDATE leases SET last_heartbeat = ? WHERE id = ?", (now, lease["id"]))
    conn.execute("UPDATE peers SET uptime = uptime + ? WHERE account = ?", (uptime, lease["account"]))
    return uptime


def withdraw(
    conn: sqlite3.Connection,
    now: float,
    env: Envelope,
    lease_id: str,
    times: LeaseConfig,
    policy: runs.RunPolicy,
) -> OfferResponse:
    """Withdraw the signer's offer (``rent`` on Ctrl-C, a volunteer node that stops): its lease ends
    ``released`` and its match in a run, if it holds one, ends ``withdrawn``, the way a lapse drops a match:
    the run's group forms anew without the peer and the run goes on with its other peers (or pauses below
    its minimum). Unlike a lapse it costs no reliability: a peer that says it leaves is not one that
    vanished. The request proves the peer was up until now, so it credits that uptime as a heartbeat
    would. Refused as a heartbeat is: a lease that does not exist (404), is another account's (403), or
    has ended (409 ``lease_lapsed``, ``lease_released``)."""
    sql.claim_nonce(conn, env)
    found = conn.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
    _check_lease(found, lease_id, env.account)
    lease = dict(found)
    _renew(conn, lease, lease["last_heartbeat"], now, times.ttl)
    for run_id in match_store.end_lease(conn, lease_id, "released", "withdrawn"):
        group_store.refresh_group(conn, now, run_id, policy.group)
        run_store.advance(conn, now, policy, [run_id])
    lease |= {"state": "released", "last_heartbeat": now}
    offer = conn.execute(OFFER_QUERY + " WHERE o.account = ?", (env.account,)).fetchone()
    return OfferResponse(offer=offer_view(offer), lease=lease_view(lease, times))


@dataclass(frozen=True)
class Heartbeat:
    """One signed heartbeat: the lease it renews, when it arrived, the GPUs' telemetry if it carried any."""

    now: float
    env: Envelope
    lease_id: str
    telemetry: Telemetry | None = None


def heartbeats(
    conn: sqlite3.Connection, beats: list[Heartbeat], times: LeaseConfig
) -> list[LeaseView | ApiError]:
    """Renew the leases of many heartbeats at once (a :data:`coordinator.db.Batched` kind): one insert of
    their nonces and one read of their leases (one round trip for both), then one update per table,
    whatever their number.

    Each heartbeat is decided as if it ran alone, in order: a replayed nonce refuses it first, then a lease
    that does not exist, is another account's, or is no longer active; a refused heartbeat's nonce is
    recorded with its refusal and it changes nothing. Two heartbeats of one lease credit uptime in turn.
    """
    settle_claims = sql.send_claims(conn, [beat.env for beat in beats])
    ids = sorted({beat.lease_id for beat in beats})
    found = conn.execute(f"SELECT * FROM leases WHERE id IN ({','.join('?' * len(ids))})", ids)
    lease_rows = {row["id"]: dict(row) for row in found}  # one round trip for the claims and the leases
    checked: list[ApiError | None] = []
    for beat in beats:
        try:
            _check_lease(lease_rows.get(beat.lease_id), beat.lease_id, beat.env.account)
            checked.append(None)
        except ApiError as e:
            checked.append(e)
    replays = settle_claims([None if e is None else sql.refusal(e) for e in checked])
    renewed: dict[str, float] = {}  # lease -> its last heartbeat
    uptime: dict[str, float] = {}  # account -> uptime credited
    telemetry: dict[str, tuple[float | None, float | None, float | None, float]] = {}  # account -> last
    throttling: dict[str, tuple[float | None, float | None]] = {}  # account -> (clock ratio, since) or None
    outcomes: list[LeaseView | ApiError] = []
    for beat, error, replay in zip(beats, checked, replays, strict=True):
        if replay is not None or error is not None:
            outcomes.append(replay or error)  # type: ignore[arg-type]
            continue
        lease = lease_rows[beat.lease_id]
        credit = leases.credited_uptime(beat.now, lease["last_heartbeat"], times.ttl)
        uptime[lease["account"]] = uptime.get(lease["account"], 0.0) + credit
        lease["last_heartbeat"] = renewed[lease["id"]] = beat.now
        if beat.telemetry is not None:
            t = beat.telemetry
            telemetry[lease["account"]] = (t.power_w, t.temperature_c, t.utilization_pct, beat.now)
            if t.throttled is not None:  # None: the GPU does not say, which changes nothing
                throttled = (t.clock_ratio or 1.0, beat.now)
                throttling[lease["account"]] = throttled if t.throttled else (None, None)
        outcomes.append(lease_view(lease, times))
    if renewed:
        conn.execute(
            "UPDATE leases SET last_heartbeat = v.column2"
            f" FROM (VALUES {sql.value_rows(len(renewed), 2)}) AS v WHERE leases.id = v.column1",
            [value for item in renewed.items() for value in item],
        )
        conn.execute(
            "UPDATE peers SET uptime = uptime + v.column2"
            f" FROM (VALUES {sql.value_rows(len(uptime), 2)}) AS v WHERE peers.account = v.column1",
            [value for item in uptime.items() for value in item],
        )
    if telemetry:
        # NULL telemetry is typed, or PostgreSQL would take a column of NULLs for text
        number = "CAST(? AS DOUBLE PRECISION)"
        marks = ",".join([f"(?, {number}, {number}, {number}, ?)"] * len(telemetry))
        conn.execute(
            "UPDATE offers SET power_w = v.column2, temperature_c = v.column3, utilization_pct = v.column4,"
            f" telemetry_at = v.column5 FROM (VALUES {marks}) AS v WHERE offers.account = v.column1",
            [value for account, values in telemetry.items() for value in (account, *values)],
        )
    for account, (ratio, at) in throttling.items():  # rare: only heartbeats that report throttling
        conn.execute(
            "UPDATE offers SET clock_ratio = ?, throttled_at = COALESCE(?, throttled_at) WHERE account = ?",
            (ratio, at, account),
        )
        if ratio is not None:  # its match keeps the lowest: throttling explains no more than that
            conn.execute(
                "UPDATE matches SET throttled_clock_ratio = CASE WHEN throttled_clock_ratio IS NULL"
                " OR throttled_clock_ratio > ? THEN ? ELSE throttled_clock_ratio END"
                " WHERE account = ? AND state = 'active'",
                (ratio, ratio, account),
            )
    return outcomes


def _check_lease(lease: Mapping[str, Any] | None, lease_id: str, account: str) -> None:
    """Refuse a heartbeat for a lease that does not exist, is another account's, or is no longer active."""
    if lease is None:
        raise NotFound(f"lease {lease_id!r} does not exist", field="lease_id")
    if lease["account"] != account:
        raise Forbidden(f"lease {lease_id!r} belongs to another account", field="lease_id")
    if lease["state"] != "active":
        ended = "was released: its offer was withdrawn" if lease["state"] == "released" else "has lapsed"
        raise Conflict(
            f"lease {lease_id!r} {ended}; post your offer again for a new lease",
            code=f"lease_{lease['state']}",
            field="lease_id",
        )


def offers(conn: sqlite3.Connection) -> list[OfferView]:
    return [offer_view(row) for row in conn.execute(OFFER_QUERY + " ORDER BY o.account")]


def peers(conn: sqlite3.Connection) -> list[PeerView]:
    """Every peer with an offer: its standing, the samples of its paid reports, what it earned and
    its last telemetry (one query, for the dashboard)."""
    query = (
        "SELECT q.*, (SELECT COALESCE(SUM(r.samples), 0) FROM reports r"
        " WHERE r.account = q.account AND r.pay_state = 'paid') AS verified,"
        " COALESCE((SELECT b.units FROM books b WHERE b.name = 'earned:' || q.account), 0) AS earned"
        f" FROM ({OFFER_QUERY}) q"
    )
    return [_peer_view(row) for row in conn.execute(query + " ORDER BY q.account")]


def _peer_view(row: sqlite3.Row) -> PeerView:
    offer = offer_view(row)
    telemetry = (
        Telemetry(
            power_w=row["power_w"],
            temperature_c=row["temperature_c"],
            utilization_pct=row["utilization_pct"],
        )
        if row["telemetry_at"] is not None
        else None
    )
    return PeerView(
        account=offer.account,
        gpu=offer.gpu,
        gpu_count=offer.gpu_count,
        state=offer.state,
        reliability=offer.reliability,
        samples=row["verified"],
        earned=from_units(row["earned"]),
        audits_passed=row["audits_passed"],
        audits_failed=row["audits_failed"],
        capacity_flag=offer.capacity_flag,
        run_id=row["run_id"] if offer.state == "matched" else None,
        telemetry=telemetry,
        telemetry_at=row["telemetry_at"],
    )
