"""Persistence of a run's training group (:mod:`coordinator.groups` decides it): the peers' check-ins, the
current version, and the rendezvous store through which the members of a version build their process group.

Everything is in tables, nothing in memory, so that coordinator replicas sharing a database agree. Every
function takes the connection of the write (or read) it is part of; the requests that check in and use the
rendezvous store are :mod:`coordinator.match_store`'s (they check the signer's place in the run first), and
:func:`refresh_group` is also called where a match ends (a leave, a ban, a lapse), so that a member that is
gone gives a new version without waiting for a check-in.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Sequence

from coordinator import groups
from coordinator.errors import Conflict, Forbidden
from peer.protocol.run_schemas import (
    CheckinBody,
    GroupMemberView,
    GroupView,
    RendezvousSetBody,
    RendezvousWritten,
)


def record_checkin(
    conn: sqlite3.Connection, now: float, run_id: str, match: sqlite3.Row, body: CheckinBody
) -> None:
    """Keep a peer's last check-in, under the match (``lease_id``) it was made in."""
    conn.execute(
        "INSERT INTO group_checkins"
        " (run_id, account, lease_id, address, version, failed_version, unreachable, at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, account) DO UPDATE SET"
        " lease_id = excluded.lease_id, address = excluded.address, version = excluded.version,"
        " failed_version = excluded.failed_version, unreachable = excluded.unreachable, at = excluded.at",
        (
            run_id,
            match["account"],
            match["lease_id"],
            body.address,
            body.version,
            body.failed_version,
            json.dumps(body.unreachable),
            now,
        ),
    )


def candidates(conn: sqlite3.Connection, run_id: str) -> list[groups.Candidate]:
    """The run's active, joined matches that checked in under that match, with their last check-in."""
    rows = conn.execute(
        """SELECT m.account, m.matched_at, c.address, c.at, c.version, c.failed_version, c.unreachable
           FROM group_checkins c JOIN matches m ON m.run_id = c.run_id AND m.lease_id = c.lease_id
           WHERE c.run_id = ? AND m.state = 'active' AND m.joined_at IS NOT NULL""",
        (run_id,),
    ).fetchall()
    return [
        groups.Candidate(
            account=r["account"],
            matched_at=r["matched_at"],
            address=r["address"],
            checked_in_at=r["at"],
            version=r["version"],
            failed_version=r["failed_version"],
            unreachable=frozenset(json.loads(r["unreachable"])),
        )
        for r in rows
    ]


def current(conn: sqlite3.Connection, run_id: str) -> groups.Group | None:
    row = conn.execute("SELECT * FROM run_groups WHERE run_id = ?", (run_id,)).fetchone()
    return None if row is None else _group(row)


def _group(row: sqlite3.Row) -> groups.Group:
    members = json.loads(row["members"])
    return groups.Group(
        version=row["version"],
        members=tuple(account for account, _ in members),
        path=row["path"],
        reason=row["reason"],
        formed_at=row["formed_at"],
        failed_at=row["failed_at"],
        failed_by=row["failed_by"],
        addresses=tuple(address for _, address in members),
        suspects=frozenset((account, address) for account, address in json.loads(row["suspects"])),
    )


def save(conn: sqlite3.Connection, run_id: str, group: groups.Group) -> None:
    """Write ``group`` as the run's current one; a new version deletes the older versions' rendezvous keys."""
    members = json.dumps([[m, a] for m, a in zip(group.members, group.addresses, strict=True)])
    conn.execute(
        "INSERT INTO run_groups"
        " (run_id, version, members, path, reason, formed_at, failed_at, failed_by, suspects)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET version = excluded.version,"
        " members = excluded.members, path = excluded.path, reason = excluded.reason,"
        " formed_at = excluded.formed_at, failed_at = excluded.failed_at, failed_by = excluded.failed_by,"
        " suspects = excluded.suspects",
        (
            run_id,
            group.version,
            members,
            group.path,
            group.reason,
            group.formed_at,
            group.failed_at,
            group.failed_by,
            json.dumps(sorted([account, address] for account, address in group.suspects)),
        ),
    )
    conn.execute("DELETE FROM rendezvous_keys WHERE run_id = ? AND version < ?", (run_id, group.version))


def refresh_group(
    conn: sqlite3.Connection, now: float, run_id: str, config: groups.GroupConfig
) -> groups.Group | None:
    """Decide the run's group from what is stored now, and write it only if the decision changed it."""
    before = current(conn, run_id)
    after = groups.decide(now, before, candidates(conn, run_id), config)
    if after is not None and after is not before:
        save(conn, run_id, after)
    return after


def refresh_failed(conn: sqlite3.Connection, now: float, config: groups.GroupConfig) -> None:
    """Settle the failed versions whose survivors may regroup by now (the sweep's part)."""
    due = now - config.regroup_seconds
    for (run_id,) in conn.execute(
        "SELECT run_id FROM run_groups WHERE failed_at IS NOT NULL AND failed_at <= ?", (due,)
    ).fetchall():
        refresh_group(conn, now, run_id, config)


def group_view(group: groups.Group) -> GroupView:
    return GroupView(
        version=group.version,
        path=group.path,
        members=[
            GroupMemberView(account=account, rank=rank, address=address)
            for rank, (account, address) in enumerate(zip(group.members, group.addresses, strict=True))
        ],
        reason=group.reason,
        formed_at=group.formed_at,
    )


def group_views(conn: sqlite3.Connection, run_ids: Sequence[str] | None = None) -> dict[str, GroupView]:
    """The current group of each of ``run_ids`` that has one (of every run when None)."""
    if run_ids is None:
        rows = conn.execute("SELECT * FROM run_groups").fetchall()
    else:
        marks = ",".join("?" * len(run_ids))
        rows = conn.execute(f"SELECT * FROM run_groups WHERE run_id IN ({marks})", tuple(run_ids)).fetchall()
    return {row["run_id"]: group_view(_group(row)) for row in rows}


# ------------------------------------------------------------------------------------------- rendezvous


def member_rank(conn: sqlite3.Connection, run_id: str, account: str, version: int) -> int:
    """The signer's rank in the run's current group, which must be ``version``: else 409 ``stale_version``
    or 403 ``not_in_group``."""
    group = current(conn, run_id)
    if group is None or group.version != version:
        now_on = "no group yet" if group is None else f"version {group.version}"
        raise Conflict(
            f"run {run_id!r} has {now_on}, not version {version}; check in for the current group",
            code="stale_version",
            field="version",
        )
    if account not in group.members:
        raise Forbidden(
            f"account {account[:12]}... is not a member of version {version} of run {run_id!r}'s group",
            code="not_in_group",
            field="version",
        )
    return group.members.index(account)


def rendezvous_set(
    conn: sqlite3.Connection, now: float, account: str, run_id: str, body: RendezvousSetBody
) -> RendezvousWritten:
    """Write a key for a member: a key ending in ``/<rank>`` is that rank's, and a key belongs to the member
    that wrote it first (it may write it again)."""
    rank = member_rank(conn, run_id, account, body.version)
    last = body.key.rsplit("/", 1)[-1]
    if last.isdigit() and int(last) != rank:
        raise Forbidden(
            f"key {body.key[:80]!r} is rank {int(last)}'s; account {account[:12]}... is rank {rank}",
            code="key_not_yours",
            field="key",
        )
    row = conn.execute(
        "SELECT writer FROM rendezvous_keys WHERE run_id = ? AND version = ? AND key = ?",
        (run_id, body.version, body.key),
    ).fetchone()
    if row is not None and row["writer"] != account:
        raise Forbidden(
            f"key {body.key[:80]!r} was written by {row['writer'][:12]}... first; only it may write it again",
            code="key_not_yours",
            field="key",
        )
    value = base64.b64decode(body.value, validate=True)
    conn.execute(
        "INSERT INTO rendezvous_keys (run_id, version, key, value, writer, written_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, version, key) DO UPDATE SET value = excluded.value,"
        " written_at = excluded.written_at",
        (run_id, body.version, body.key, value, account, now),
    )
    return RendezvousWritten(version=body.version, key=body.key, bytes=len(value))


def rendezvous_get(
    conn: sqlite3.Connection, run_id: str, account: str, version: int, keys: Sequence[str]
) -> dict[str, bytes]:
    """The values of ``keys`` that are written (for a member of the current ``version`` only)."""
    member_rank(conn, run_id, account, version)
    wanted = sorted(set(keys))
    marks = ",".join("?" * len(wanted))
    rows = conn.execute(
        f"SELECT key, value FROM rendezvous_keys WHERE run_id = ? AND version = ? AND key IN ({marks})",
        (run_id, version, *wanted),
    )
    return {row["key"]: bytes(row["value"]) for row in rows}
