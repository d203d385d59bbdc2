"""Persistence of a peer's place in a run (its match, made by a clearing round): the check that the signer
holds one, joining the run (where its peers reach it), checking in with the run's training group and using its
rendezvous store (:mod:`coordinator.group_store`), leaving it, ending a match (a leave, a ban) so that its
lease returns to the open market, and ending a lease with the match it holds (a lapse, a withdrawn offer).

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLStore` runs them inside one transaction with the request's nonce. The run's
own record, its state gate and its state changes are :mod:`coordinator.run_store`'s.
"""

from __future__ import annotations

import json
import sqlite3

from coordinator import group_store, run_store, runs, sql
from coordinator.errors import Conflict, Forbidden
from peer.protocol import states
from peer.protocol.envelope import Envelope
from peer.protocol.run_schemas import (
    CheckinBody,
    GroupView,
    JoinBody,
    RendezvousGetBody,
    RendezvousSetBody,
    RendezvousWritten,
    RunView,
)


def active_match(conn: sqlite3.Connection, run_id: str, account: str) -> sqlite3.Row:
    """The signer's active match in the run, or 403 ``not_in_run`` saying what became of its last one."""
    rows = conn.execute(
        "SELECT * FROM matches WHERE run_id = ? AND account = ? ORDER BY matched_at DESC", (run_id, account)
    ).fetchall()
    for row in rows:
        if row["state"] == "active":
            return row
    who = f"account {account[:12]}..."
    if not rows:
        message = f"{who} was never matched to run {run_id!r}"
    elif rows[0]["state"] == "dropped":
        message = (
            f"{who} was dropped from run {run_id!r} when its lease lapsed; nothing is paid after a drop "
            "(post the offer again to be matched anew)"
        )
    elif rows[0]["state"] == "withdrawn":
        message = f"{who} withdrew its offer, and with it its place in run {run_id!r}"
    elif rows[0]["state"] == "left":
        message = f"{who} gave its place in run {run_id!r} back"
    elif rows[0]["state"] == "banned":
        message = f"{who} was banned from run {run_id!r}: its reports failed their audits"
    else:
        message = f"{who} was released from run {run_id!r} when the run ended"
    raise Forbidden(message, code="not_in_run", field="run_id")


def join(conn: sqlite3.Connection, now: float, env: Envelope, run_id: str, body: JoinBody) -> RunView:
    """Record where a matched peer can be reached; a re-join updates the address but keeps ``joined_at``
    (pay counts from the first join)."""
    sql.claim_nonce(conn, env)
    run = run_store.get_run(conn, run_id)
    run_store.refuse_unless(run, states.BIDDING, "peers join while it recruits, runs or is paused")
    match = active_match(conn, run_id, env.account)
    conn.execute(
        "UPDATE matches SET peer_id = ?, maddrs = ?, joined_at = COALESCE(joined_at, ?)"
        " WHERE run_id = ? AND lease_id = ?",
        (body.peer_id, json.dumps(body.maddrs), now, run_id, match["lease_id"]),
    )
    return run_store.run_view(conn, run_id)


def leave(
    conn: sqlite3.Connection, now: float, env: Envelope, run_id: str, policy: runs.RunPolicy
) -> RunView:
    """A matched peer gives up its place (it cannot train the run: a task it has not installed, say).

    The match becomes ``left``, not dropped: leaving is not a lapse and costs no reliability. The lease
    goes back to the open market, the run recruits a replacement (or pauses, below its minimum), and the
    market never pairs this peer with this run again.
    """
    sql.claim_nonce(conn, env)
    run_store.get_run(conn, run_id)
    end_match(conn, run_id, active_match(conn, run_id, env.account), "left")
    group_store.refresh_group(conn, now, run_id, policy.group)
    run_store.advance(conn, now, policy, [run_id])
    return run_store.run_view(conn, run_id)


def checkin(
    conn: sqlite3.Connection,
    now: float,
    env: Envelope,
    run_id: str,
    body: CheckinBody,
    policy: runs.RunPolicy,
) -> GroupView:
    """Record a joined peer's check-in with the run's group, decide the group anew (a new version when it
    changed) and answer the current one, which the peer may not (yet, or any more) be a member of."""
    sql.claim_nonce(conn, env)
    run_store.get_run(conn, run_id)
    match = active_match(conn, run_id, env.account)
    if match["joined_at"] is None:
        raise Conflict(
            f"account {env.account[:12]}... has not joined run {run_id!r}; join before checking in",
            code="not_joined",
            field="run_id",
        )
    group_store.record_checkin(conn, now, run_id, match, body)
    group = group_store.refresh_group(conn, now, run_id, policy.group)
    assert group is not None  # the signer is a candidate now, so there is a group
    return group_store.group_view(group)


def rendezvous_set(
    conn: sqlite3.Connection, now: float, env: Envelope, run_id: str, body: RendezvousSetBody
) -> RendezvousWritten:
    """A member of the run's current group version writes a key of its rendezvous store."""
    sql.claim_nonce(conn, env)
    _rendezvous_run(conn, run_id)
    return group_store.rendezvous_set(conn, now, env.account, run_id, body)


def rendezvous_get(
    conn: sqlite3.Connection, account: str, run_id: str, body: RendezvousGetBody
) -> dict[str, bytes]:
    """The keys of the rendezvous store written so far, for a member of the current version (a read: the
    signature says who reads, and a replay reads no more than the reader could)."""
    _rendezvous_run(conn, run_id)
    return group_store.rendezvous_get(conn, run_id, account, body.version, body.keys)


def _rendezvous_run(conn: sqlite3.Connection, run_id: str) -> None:
    run_store.refuse_unless(
        run_store.get_run(conn, run_id), states.LIVE, "its group's rendezvous store is open while it lives"
    )


def end_match(conn: sqlite3.Connection, run_id: str, match: sqlite3.Row, state: str) -> None:
    """End a peer's active match (``left``, ``banned``): its lease goes back to the open market, and the
    market leaves it out of this run's clearing while the run bids."""
    conn.execute(
        "UPDATE matches SET state = ? WHERE run_id = ? AND lease_id = ?", (state, run_id, match["lease_id"])
    )
    conn.execute(
        "UPDATE leases SET run_id = NULL, price_units = NULL WHERE id = ? AND run_id = ?",
        (match["lease_id"], run_id),
    )


def end_lease(conn: sqlite3.Connection, lease_id: str, lease_state: str, match_state: str) -> list[str]:
    """End a lease (``lapsed``: its peer went silent; ``released``: its peer withdrew the offer) and the
    active match it holds (``dropped``, ``withdrawn``): nothing is paid under the match after this, and the
    run goes on with its other peers. Returns the runs whose match ended; the caller decides their groups
    anew (:func:`coordinator.group_store.refresh_group`) once every lease it ends is ended, so that peers
    leaving together change a group once."""
    run_ids = [
        row[0]
        for row in conn.execute(
            "SELECT run_id FROM matches WHERE lease_id = ? AND state = 'active'", (lease_id,)
        ).fetchall()
    ]
    conn.execute("UPDATE leases SET state = ? WHERE id = ?", (lease_state, lease_id))
    conn.execute(
        "UPDATE matches SET state = ? WHERE lease_id = ? AND state = 'active'", (match_state, lease_id)
    )
    return run_ids
