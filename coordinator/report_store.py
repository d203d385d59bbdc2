"""Persistence of the work a run's peers report and its checks: an epoch's contribution report and its pay
(held until the report's audits are decided), the run's loss curve, and the run's side of audits: giving
them out to validators in the run, taking their verdicts, and banning a peer whose reports fail.

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLStore` runs them inside one transaction with the request's nonce. The pay
rule is :func:`coordinator.runs.report_pay` and the audit decisions are :mod:`coordinator.verification`'s;
the audits' own records, and the pay they release or void, are :mod:`coordinator.audit_store`'s. This module
checks first that the caller is in the run (:mod:`coordinator.match_store`), and moves the run on
(:func:`coordinator.run_store.advance`) from what it wrote.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

from coordinator import audit_store, group_store, ledger, match_store, run_store, runs, sql, verification
from coordinator.errors import BadRequest, Conflict
from peer.protocol import states
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units
from peer.protocol.run_schemas import (
    AuditResultBody,
    AuditTask,
    AuditView,
    LossCurve,
    LossPoint,
    MicroBatchView,
    ReportBody,
    ReportView,
)
from peer.protocol.spec import BatchSpec

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- reports


def add_report(
    conn: sqlite3.Connection,
    now: float,
    env: Envelope,
    run_id: str,
    body: ReportBody,
    policy: runs.RunPolicy,
) -> ReportView:
    """Accept an epoch's contribution, price it (:func:`coordinator.runs.report_pay`) and draw its audits
    (:func:`coordinator.verification.choose_audits`): the pay is held until they pass, or paid at once
    when the run audits nothing. Then move the run on (target reached or escrow empty: settling). A
    dropped or banned peer has no active match and is refused, so nothing is paid after either."""
    sql.claim_nonce(conn, env)
    run = run_store.get_run(conn, run_id)
    run_store.refuse_unless(run, states.REPORTING, "reports are accepted while it runs, is paused or settles")
    match = match_store.active_match(conn, run_id, env.account)
    stored = json.loads(run["spec"]).get("batch", {})
    target = stored.get("target", BatchSpec.model_fields["target"].default)
    if isinstance(target, int) and body.samples > target:
        raise BadRequest(
            f"samples ({body.samples}) exceeds the run's batch.target ({target}): one epoch's share "
            "cannot be larger than the whole step",
            field="samples",
        )
    if match["joined_at"] is None:
        raise Conflict(
            f"account {env.account[:12]}... has not joined run {run_id!r}; join before reporting",
            code="not_joined",
            field="run_id",
        )
    if conn.execute(
        "SELECT 1 FROM reports WHERE run_id = ? AND account = ? AND epoch = ?",
        (run_id, env.account, body.epoch),
    ).fetchone():
        raise Conflict(
            f"epoch {body.epoch} of run {run_id!r} is already reported by this account",
            code="report_exists",
            field="epoch",
        )
    since = max(match["joined_at"], match["last_report_at"] or match["joined_at"])
    escrow = sql.book(conn, ledger.escrow_book(run_id))
    pay = runs.report_pay(now, match["price_units"], since, body.seconds, escrow)
    audits = audit_store.open_audits(conn, now, run, env.account, body, policy.audit_timeout)
    if audits:
        sql.post(conn, ledger.hold_pay(run_id, pay.units), now)
        pay_state, pay_reason = "held", f"{pay.reason}; held for {audits} audits"
    else:
        if pay.units:
            sql.post(conn, ledger.payout(run_id, env.account, pay.units), now)
        pay_state, pay_reason = "paid", f"{pay.reason}; not audited"
    extra = {
        "group_size": body.group_size,
        "param_sketch": body.param_sketch,
        "micro_batches": [b.model_dump(mode="json") for b in body.micro_batches],
        "device": body.device,
    }
    conn.execute(
        """INSERT INTO reports (run_id, account, epoch, lease_id, samples, loss, seconds, paid_units,
                                accepted_at, body, pay_state, pay_reason)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            run_id,
            env.account,
            body.epoch,
            match["lease_id"],
            body.samples,
            body.loss,
            body.seconds,
            pay.units,
            now,
            json.dumps(extra),
            pay_state,
            pay_reason,
        ),
    )
    if pay_state == "paid":
        audit_store.count_paid(conn, run_id, match["lease_id"], body.samples, pay.units)
    conn.execute(
        """UPDATE matches SET last_report_at = ?,
               last_epoch = CASE WHEN last_epoch IS NULL OR last_epoch < ? THEN ? ELSE last_epoch END
           WHERE run_id = ? AND lease_id = ?""",
        (now, body.epoch, body.epoch, run_id, match["lease_id"]),
    )
    # the run's last epoch and the losses reported at it (its view's epoch and loss)
    conn.execute(
        """UPDATE runs SET
               last_loss_sum = CASE WHEN last_epoch = ? THEN last_loss_sum + ? ELSE ? END,
               last_loss_count = CASE WHEN last_epoch = ? THEN last_loss_count + 1 ELSE 1 END,
               last_epoch = ?
           WHERE id = ? AND (last_epoch IS NULL OR last_epoch <= ?)""",
        (body.epoch, body.loss, body.loss, body.epoch, body.epoch, run_id, body.epoch),
    )
    audit_store.expire(conn, now, run_id)  # a run with no other peer has nobody to audit the report
    run_store.advance(conn, now, policy, [run_id])
    row = conn.execute(
        "SELECT * FROM reports WHERE run_id = ? AND account = ? AND epoch = ?",
        (run_id, env.account, body.epoch),
    ).fetchone()
    return _report_view(row)


def reports(conn: sqlite3.Connection, run_id: str) -> list[ReportView]:
    run_store.get_run(conn, run_id)
    return [
        _report_view(row)
        for row in conn.execute("SELECT * FROM reports WHERE run_id = ? ORDER BY epoch, account", (run_id,))
    ]


def loss_curve(conn: sqlite3.Connection, run_id: str) -> LossCurve:
    """Each epoch's mean reported loss, weighted by samples: what a run's loss plot draws."""
    run_store.get_run(conn, run_id)  # 404 for a run that does not exist
    rows = conn.execute(
        "SELECT epoch, SUM(loss * samples) / SUM(samples) AS loss, SUM(samples) AS samples"
        " FROM reports WHERE run_id = ? GROUP BY epoch ORDER BY epoch",
        (run_id,),
    )
    return LossCurve(
        run_id=run_id,
        points=[LossPoint(epoch=r["epoch"], loss=r["loss"], samples=r["samples"]) for r in rows],
    )


def _report_view(row: sqlite3.Row) -> ReportView:
    extra: dict[str, Any] = json.loads(row["body"])
    return ReportView(
        run_id=row["run_id"],
        account=row["account"],
        epoch=row["epoch"],
        samples=row["samples"],
        loss=row["loss"],
        seconds=row["seconds"],
        group_size=extra["group_size"],
        paid=from_units(row["paid_units"]),
        pay_state=row["pay_state"],
        pay_reason=row["pay_reason"],
        accepted_at=row["accepted_at"],
        param_sketch=extra["param_sketch"],
        # what a validator must recompute stays hidden until the report's audits are decided, or a lazy
        # validator could send the claim back instead of recomputing it
        micro_batches=[
            MicroBatchView(ids=b["ids"], loss=None, sketch=None)
            if row["pay_state"] == "held"
            else MicroBatchView.model_validate(b)
            for b in extra["micro_batches"]
        ],
    )


# ------------------------------------------------------------------------------------------------ audits


def claim_audits(
    conn: sqlite3.Connection, now: float, env: Envelope, run_id: str, limit: int, policy: runs.RunPolicy
) -> list[AuditTask]:
    """Audits for a validator: a peer with an active, joined match in the run (it holds the run's
    parameters), given other peers' micro-batches to recompute."""
    sql.claim_nonce(conn, env)
    run = run_store.get_run(conn, run_id)
    run_store.refuse_unless(run, states.REPORTING, "audits are given out while it runs, is paused or settles")
    if match_store.active_match(conn, run_id, env.account)["joined_at"] is None:
        raise Conflict(
            f"account {env.account[:12]}... has not joined run {run_id!r}; join before auditing",
            code="not_joined",
            field="run_id",
        )
    return audit_store.claim(conn, now, run_id, env.account, limit, policy.audit_claim_timeout)


def submit_audit(
    conn: sqlite3.Connection,
    now: float,
    env: Envelope,
    run_id: str,
    audit_id: str,
    body: AuditResultBody,
    policy: runs.RunPolicy,
) -> AuditView:
    """Record a validator's recomputation; a peer whose failed epochs reach the run's ``ban_after`` is
    banned from the run (its match ends, its lease returns to the market, its reports are refused, and
    the pay still held for its other reports is forfeit: back to the escrow)."""
    sql.claim_nonce(conn, env)
    run = run_store.get_run(conn, run_id)
    # a validator that left, dropped or was banned has no say
    match_store.active_match(conn, run_id, env.account)
    audit = audit_store.submit(conn, now, run, env.account, audit_id, body)
    if audit["state"] == "failed":
        why = verification.banned(
            audit_store.failed_epochs(conn, run_id, audit["account"]), audit_store.policy_of(run)
        )
        match = conn.execute(
            "SELECT * FROM matches WHERE run_id = ? AND account = ? AND state = 'active'",
            (run_id, audit["account"]),
        ).fetchone()
        if why is not None and match is not None:
            match_store.end_match(conn, run_id, match, "banned")
            group_store.refresh_group(conn, now, run_id, policy.group)
            audit_store.forfeit(conn, now, run_id, audit["account"])
            logger.info(f"Peer {audit['account'][:12]}... is banned from run {run_id}: {why}")
    run_store.advance(conn, now, policy, [run_id])
    return audit_store.audit_view(conn, audit_id)


def audits(conn: sqlite3.Connection, run_id: str) -> list[AuditView]:
    run_store.get_run(conn, run_id)
    return audit_store.audit_views(conn, run_id)
