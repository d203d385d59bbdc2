"""The fast path's round commitments that reports forward, checked against each member's own report.

Every member of a fast-path round signs a commitment to the sketch of the update it sends
(:mod:`peer.protocol.commitment`), and every member's report carries the commitments its round gathered.
A member's update is the samples-weighted mean of its micro-batches' gradients, whose sketches its report
commits to and validators audit, so its committed update sketch must be their weighted mean. A member
that computes and reports honestly (every audit of its reports passes) but sends, and commits to,
another update fails that check: its epoch is failed like one caught by an audit (a failed audit row
with ``index`` -1, "the round": its pay is voided if still held, its reputation drops), and it is banned
at once rather than after the run's ``ban_after`` failed epochs, since every round it poisons before the
ban has been applied by everyone. The proof is its own two signatures (an honest member's commitment is
within float rounding of its report, about 2e-7 against a tolerance of 1e-3), so no forwarding peer can
frame it; commitments whose signature does not verify are refused with the report that carries them.

A commitment is checked once both it and its member's report are in, whichever comes second. Runs with
local updates send parameter changes, not gradients, into their rounds: nothing to check there.

A member that sends other than it committed to makes the round's own check fail on every member; they
then reveal what each put in and blame whoever revealed other than its commitment (:mod:`peer.collective`);
:func:`blame` fails that member's epoch the same way once most of the round's other members blame it.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
from collections.abc import Sequence

from coordinator import audit_store, verification
from coordinator.errors import BadRequest
from peer.protocol.commitment import Commitment, binding, claim_digest
from peer.protocol.run_schemas import BlameBody, ReportBody

ROUND_INDEX = -1  # the ``idx`` of the audit row a failed round check leaves (a micro-batch's is >= 0)


def record(
    conn: sqlite3.Connection, now: float, run: sqlite3.Row, account: str, body: ReportBody
) -> list[str]:
    """Store the commitments ``account``'s report of ``body.epoch`` forwards (after checking their
    signatures and epoch: a bad one is refused with the report), then check every commitment of that
    epoch whose member's report is in. Returns the accounts whose round check failed just now."""
    if json.loads(run["spec"]).get("averaging", {}).get("local_updates", False):
        return []
    for i, forwarded in enumerate(body.round):
        field = f"round[{i}].commitment"
        c = Commitment.decode(bytes.fromhex(forwarded.commitment))
        if c.epoch != body.epoch:
            raise BadRequest(
                f"{field} is for epoch {c.epoch}, not the report's epoch {body.epoch}", field=field
            )
        if not c.verifies(run["id"], forwarded.account):
            raise BadRequest(f"{field} is not signed by account {forwarded.account[:12]}...", field=field)
        conn.execute(
            """INSERT INTO round_commitments (run_id, epoch, account, version, update_sketch, claim)
               VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            (run["id"], body.epoch, forwarded.account, c.version, json.dumps(list(c.update)), c.claim.hex()),
        )
    members = {account, *(f.account for f in body.round)}
    return [m for m in sorted(members) if not _check(conn, now, run["id"], m, body.epoch)]


def _check(conn: sqlite3.Connection, now: float, run_id: str, account: str, epoch: int) -> bool:
    """Check ``account``'s unchecked commitments of ``epoch`` against its report (when it is in); False
    when one does not match, which fails the epoch. Only a commitment that names this very report (its
    claim digest) is evidence: one made for an attempt of the epoch that was never applied (a refused
    round, redone on other samples) is set aside."""
    report = conn.execute(
        "SELECT * FROM reports WHERE run_id = ? AND account = ? AND epoch = ?", (run_id, account, epoch)
    ).fetchone()
    if report is None:
        return True
    batches = json.loads(report["body"])["micro_batches"]
    micro = [(len(m["ids"]), m["sketch"]) for m in batches]
    claim = claim_digest([(m["ids"], m["sketch"]) for m in batches]).hex()
    conn.execute(
        """UPDATE round_commitments SET checked_at = ?
           WHERE run_id = ? AND epoch = ? AND account = ? AND checked_at IS NULL AND claim != ?""",
        (now, run_id, epoch, account, claim),
    )
    rows = conn.execute(
        """SELECT version, update_sketch FROM round_commitments
           WHERE run_id = ? AND epoch = ? AND account = ? AND checked_at IS NULL AND claim = ?""",
        (run_id, epoch, account, claim),
    ).fetchall()
    worst: tuple[float, int] | None = None
    for row in rows:
        ok, distance = binding(json.loads(row["update_sketch"]), micro)
        conn.execute(
            """UPDATE round_commitments SET checked_at = ?, distance = ?
               WHERE run_id = ? AND epoch = ? AND account = ? AND version = ? AND claim = ?""",
            (
                now,
                distance if math.isfinite(distance) else None,
                run_id,
                epoch,
                account,
                row["version"],
                claim,
            ),
        )
        if not ok and (worst is None or distance > worst[0]):
            worst = (distance, row["version"])
    if worst is None:
        return True
    distance, version = worst
    reason = (
        f"its round commitment (group version {version}) is {distance:.3g} from the weighted mean of its "
        f"reported micro-batches: it sent the round an update other than its audited work"
    )
    return not fail_round(conn, now, run_id, account, epoch, reason, distance)


def fail_round(
    conn: sqlite3.Connection,
    now: float,
    run_id: str,
    account: str,
    epoch: int,
    reason: str,
    distance: float | None = None,
) -> bool:
    """Fail ``account``'s ``epoch`` for what it put into a round, like a failed audit: a failed audit row
    with index -1 (once per epoch), its reputation, and its report's held pay voided if the report is in
    and still held (one that comes later is voided when its audits settle; one already paid, or never
    audited, keeps its pay). True when this failed it (not before)."""
    if conn.execute(
        "SELECT 1 FROM audits WHERE run_id = ? AND account = ? AND epoch = ? AND idx = ?",
        (run_id, account, epoch, ROUND_INDEX),
    ).fetchone():
        return False
    report = conn.execute(
        "SELECT samples FROM reports WHERE run_id = ? AND account = ? AND epoch = ?", (run_id, account, epoch)
    ).fetchone()
    conn.execute(
        """INSERT INTO audits (id, run_id, epoch, account, idx, samples, state, created_at, deadline,
                               distance, reason, decided_at)
           VALUES (?, ?, ?, ?, ?, ?, 'failed', ?, ?, ?, ?, ?)""",
        (
            f"audit-{secrets.token_hex(8)}",
            run_id,
            epoch,
            account,
            ROUND_INDEX,
            report["samples"] if report is not None else 0,
            now,
            now,
            distance if distance is not None and math.isfinite(distance) else None,
            reason[:300],
            now,
        ),
    )
    audit_store.count_verdict(conn, run_id, account, passed=False)
    if report is not None:
        audit_store.settle_report(conn, now, run_id, account, epoch)
    return True


def blame(
    conn: sqlite3.Connection, now: float, run_id: str, accuser: str, body: BlameBody, members: Sequence[str]
) -> list[str]:
    """Record ``accuser``'s blame of a round on the group version whose ``members`` are given, and fail the
    epoch of each accused that more than half of the round's other members have now blamed
    (:func:`coordinator.verification.blame_verdict`). Returns those failed just now."""
    for accused in body.accused:
        if accused == accuser or accused not in members:
            raise BadRequest(
                f"accused {accused[:12]}... is not another member of group version {body.version}",
                field="accused",
            )
    failed = []
    for accused in body.accused:
        conn.execute(
            """INSERT INTO round_blames (run_id, epoch, version, accuser, accused, reason, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            (run_id, body.epoch, body.version, accuser, accused, body.reason, now),
        )
        accusers = {
            row["accuser"]
            for row in conn.execute(
                "SELECT accuser FROM round_blames"
                " WHERE run_id = ? AND epoch = ? AND version = ? AND accused = ?",
                (run_id, body.epoch, body.version, accused),
            )
        }
        guilty, why = verification.blame_verdict(accusers, accused, members)
        reason = (
            f"what it put into the round of group version {body.version} is not what it committed to: {why}"
        )
        if guilty and fail_round(conn, now, run_id, accused, body.epoch, reason):
            failed.append(accused)
    return failed
