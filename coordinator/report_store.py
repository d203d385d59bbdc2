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

from coordinator import (
    audit_store,
    capacity,
    group_store,
    ledger,
    match_store,
    round_store,
    run_store,
    runs,
    sql,
    verification,
)
from coordinator.errors import BadRequest, Conflict
from peer.protocol import states
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units
from peer.protocol.run_schemas import (
    AuditResultBody,
    AuditTask,
    AuditView,
    BlameBody,
    BlameView,
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
    pay = _delivered_pay(conn, match, pay, body.samples, min(body.seconds, max(0.0, now - since)), policy)
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
    for account in round_store.record(conn, now, run, env.account, body):
        # at once: its own two signatures prove it, and each round until a ban is applied by everyone
        _ban(
            conn, now, run_id, account, policy, f"its round commitment of epoch {body.epoch} is not its work"
        )
    audit_store.expire(conn, now, run_id)  # a run with no other peer has nobody to audit the report
    run_store.advance(conn, now, policy, [run_id])
    row = conn.execute(
        "SELECT * FROM reports WHERE run_id = ? AND account = ? AND epoch = ?",
        (run_id, env.account, body.epoch),
    ).fetchone()
    return _report_view(row)


def _delivered_pay(
    conn: sqlite3.Connection,
    match: sqlite3.Row,
    pay: runs.Pay,
    samples: int,
    billed: float,
    policy: runs.RunPolicy,
) -> runs.Pay:
    """Count a report in its match's tallies, measure the match's delivered capacity against the run's
    other active matches and cut the report's pay to what it delivered (:mod:`coordinator.capacity`);
    re-rate and flag the peer's offer, and count a shortfall against its reputation, when the verdict says
    so (the first time for a match). Matches made before the tallies existed carry no TFLOP/s and are left
    alone. The report's energy is its peer's last reported power times its billed seconds."""
    run_id, lease_id, account = match["run_id"], match["lease_id"], match["account"]
    offer = conn.execute("SELECT power_w FROM offers WHERE account = ?", (account,)).fetchone()
    power = offer["power_w"] if offer is not None else None
    conn.execute(
        """UPDATE matches SET billed_reports = billed_reports + 1, billed_samples = billed_samples + ?,
               billed_seconds = billed_seconds + ?, energy_j = energy_j + ?,
               energy_samples = energy_samples + ?
           WHERE run_id = ? AND lease_id = ?""",
        (samples, billed, (power or 0.0) * billed, samples if power is not None else 0, run_id, lease_id),
    )
    if match["tflops"] is None:
        conn.execute(
            "UPDATE matches SET billed_units = billed_units + ? WHERE run_id = ? AND lease_id = ?",
            (pay.units, run_id, lease_id),
        )
        return pay
    deliveries = [
        capacity.Delivery(
            r["lease_id"], r["tflops"], r["billed_reports"], r["billed_samples"], r["billed_seconds"]
        )
        for r in conn.execute(
            # the active ones: a dropped or banned match no longer speaks for the run's pace, nor one whose
            # work failed an audit (a free-rider's seconds are next to nothing: it would look very fast)
            "SELECT lease_id, tflops, billed_reports, billed_samples, billed_seconds FROM matches m"
            " WHERE run_id = ? AND tflops IS NOT NULL AND state = 'active' AND (lease_id = ? OR NOT EXISTS"
            " (SELECT 1 FROM audits a WHERE a.run_id = m.run_id AND a.account = m.account"
            " AND a.state = 'failed' AND a.canary_of IS NULL))",
            (run_id, lease_id),
        )
    ]
    # throttling explains a shortfall only beyond the clock ratio the match was already priced at
    throttled = match["throttled_clock_ratio"]
    clock = None if throttled is None else throttled / (match["priced_clock_ratio"] or 1.0)
    verdict = capacity.assess(deliveries, lease_id, clock, policy.capacity)
    entitled = capacity.entitled_units(
        match["price_units"], match["billed_seconds"] + billed, verdict.pay_factor
    )
    units = capacity.capped_units(pay.units, entitled, match["billed_units"])
    first_flag = verdict.flag is not None and match["capacity_flag"] is None
    conn.execute(
        """UPDATE matches SET billed_units = billed_units + ?, capacity_ratio = ?,
               capacity_flag = COALESCE(capacity_flag, ?), capacity_reason = ?
           WHERE run_id = ? AND lease_id = ?""",
        (
            units,
            None if verdict.delivered_tflops is None else verdict.ratio,
            verdict.flag,
            None if verdict.delivered_tflops is None else verdict.reason,
            run_id,
            lease_id,
        ),
    )
    if verdict.flag is not None and verdict.delivered_tflops is not None:
        conn.execute(
            """UPDATE offers SET claimed_tflops = COALESCE(claimed_tflops, tflops), tflops = ?,
                   capacity_flag = ?, capacity_reason = ?
               WHERE account = ?""",
            (verdict.delivered_tflops, verdict.flag, f"run {run_id}: {verdict.reason}", account),
        )
    if first_flag and verdict.flag == "short":
        conn.execute("UPDATE peers SET shortfalls = shortfalls + 1 WHERE account = ?", (account,))
        logger.info(f"Peer {account[:12]}... falls short of its claim in run {run_id}: {verdict.reason}")
    if units == pay.units and verdict.flag is None:
        return pay
    cut = (
        f"; cut to {units} units: {verdict.pay_factor.numerator / verdict.pay_factor.denominator:.3f} of "
        f"its hourly price entitles its match to {entitled} units, {match['billed_units']} given before"
        if units < pay.units
        else ""
    )
    return runs.Pay(units, f"{pay.reason}; {verdict.reason}{cut}")


def reports(conn: sqlite3.Connection, run_id: str) -> list[ReportView]:
    run = run_store.get_run(conn, run_id)
    hidden = canary_sources_from(run)
    # a canary handed out stays unanswered a while (its validator answers its claims an epoch or so
    # later): its source's claims stay hidden until it is decided, whatever the window
    canaries = {
        (r["account"], r["epoch"])
        for r in conn.execute(
            "SELECT account, epoch FROM audits"
            " WHERE run_id = ? AND canary_of IS NOT NULL AND state = 'pending'",
            (run_id,),
        )
    }
    return [
        _report_view(row, hidden, (row["account"], row["epoch"]) in canaries)
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


def canary_sources_from(run: sqlite3.Row) -> int | None:
    """The first epoch whose reports may still be drawn as canaries (the run's last ``canary_window``
    epochs while it takes reports, in a run with canaries), or None: their claims stay hidden, else a
    validator could answer a canary with the claim of its source instead of recomputing it."""
    policy = audit_store.policy_of(run)
    if policy.rate <= 0 or policy.canary_rate <= 0 or run["last_epoch"] is None:
        return None
    if run["state"] not in states.REPORTING:
        return None
    return run["last_epoch"] - policy.canary_window + 1


def _report_view(row: sqlite3.Row, hidden_from: int | None = None, canary: bool = False) -> ReportView:
    """A report as the API shows it: the claimed losses and sketches hidden while its audits are pending,
    while it may serve as a canary's source (epochs from ``hidden_from``) and while a canary drawn from it
    is pending (``canary``)."""
    extra: dict[str, Any] = json.loads(row["body"])
    hidden = canary or row["pay_state"] == "held" or (hidden_from is not None and row["epoch"] >= hidden_from)
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
            if hidden
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
    return audit_store.claim(
        conn, now, run, env.account, limit, policy.audit_claim_timeout, policy.audit_timeout
    )


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
        _ban_if_due(conn, now, run, audit["account"], policy)
    run_store.advance(conn, now, policy, [run_id])
    return audit_store.audit_view(conn, audit_id)


def blame_round(
    conn: sqlite3.Connection, now: float, env: Envelope, run_id: str, body: BlameBody, policy: runs.RunPolicy
) -> BlameView:
    """Record a member's blame of a fast-path round on the run's current group version
    (:func:`coordinator.round_store.blame`). An accused whose epoch fails is banned at once, not after
    ``ban_after`` failed epochs: no round with it in the group is applied, so the run would stay at that
    epoch. A blame of another version is refused (409 ``stale_version``): its members are no longer known."""
    sql.claim_nonce(conn, env)
    run = run_store.get_run(conn, run_id)
    run_store.refuse_unless(run, states.REPORTING, "rounds are blamed while it runs, is paused or settles")
    match_store.active_match(conn, run_id, env.account)
    group = group_store.current(conn, run_id)
    if group is None or group.version != body.version or env.account not in group.members:
        current = None if group is None else group.version
        raise Conflict(
            f"group version {body.version} is not the run's current version with this member (current: "
            f"{current})",
            code="stale_version",
            field="version",
        )
    last = run["last_epoch"]  # a refused round is at the epoch after the last one applied
    lowest, highest = (0, 1) if last is None else (last, last + 2)
    if not lowest <= body.epoch <= highest:
        raise BadRequest(
            f"epoch {body.epoch} is not a round the run is at (its last reported epoch: {last})",
            field="epoch",
        )
    failed = round_store.blame(conn, now, run_id, env.account, body, group.members)
    for account in failed:  # at once: every round with it would be refused, at the same epoch, forever
        _ban(conn, now, run_id, account, policy, f"most of its round blamed it at epoch {body.epoch}")
    run_store.advance(conn, now, policy, [run_id])
    return BlameView(failed=failed)


def _ban_if_due(
    conn: sqlite3.Connection, now: float, run: sqlite3.Row, account: str, policy: runs.RunPolicy
) -> None:
    """Ban ``account`` from the run once its failed epochs reach the run's ``ban_after``."""
    run_id = run["id"]
    why = verification.banned(audit_store.failed_epochs(conn, run_id, account), audit_store.policy_of(run))
    if why is not None:
        _ban(conn, now, run_id, account, policy, why)


def _ban(
    conn: sqlite3.Connection, now: float, run_id: str, account: str, policy: runs.RunPolicy, why: str
) -> None:
    """End ``account``'s match in the run as banned (its lease returns to the market, its reports are
    refused, the pay still held for its reports is forfeit) and form the group without it."""
    match = conn.execute(
        "SELECT * FROM matches WHERE run_id = ? AND account = ? AND state = 'active'", (run_id, account)
    ).fetchone()
    if match is not None:
        match_store.end_match(conn, run_id, match, "banned")
        group_store.refresh_group(conn, now, run_id, policy.group)
        audit_store.forfeit(conn, now, run_id, account)
        logger.info(f"Peer {account[:12]}... is banned from run {run_id}: {why}")


def audits(conn: sqlite3.Connection, run_id: str) -> list[AuditView]:
    run_store.get_run(conn, run_id)
    return audit_store.audit_views(conn, run_id)
