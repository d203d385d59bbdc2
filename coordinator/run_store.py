"""Persistence of runs: creation, joins, contribution reports and pay, the final model, and state changes.

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLiteStore` runs them inside one transaction with the request's nonce. Decisions
are :mod:`coordinator.runs`'s pure functions: this module gathers the state they need and writes what they
return, with the reason.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from coordinator import audit_store, ledger, runs, sql, verification
from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound
from peer.protocol import states
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units, to_units
from peer.protocol.schemas import (
    AuditResultBody,
    AuditTask,
    AuditView,
    JoinBody,
    MicroBatchView,
    ModelView,
    ReportBody,
    ReportView,
    RunBody,
    RunPeerView,
    RunView,
    check_run_spec,
)
from peer.protocol.spec import BatchSpec

logger = logging.getLogger(__name__)

# Appended to coordinator.store.MIGRATIONS (existing databases migrate on open). Runs created before specs
# were validated get no target (0) and the spec's default wait; their state dates from their creation.
MIGRATION = """
    ALTER TABLE runs ADD COLUMN state_since REAL;
    ALTER TABLE runs ADD COLUMN reason TEXT;
    ALTER TABLE runs ADD COLUMN target_samples INTEGER;
    ALTER TABLE runs ADD COLUMN wait_seconds REAL;
    ALTER TABLE runs ADD COLUMN model_sha256 TEXT;
    ALTER TABLE runs ADD COLUMN model_bytes INTEGER;
    ALTER TABLE runs ADD COLUMN model_by TEXT;
    ALTER TABLE runs ADD COLUMN model_at REAL;
    UPDATE runs SET
        state_since = created_at,
        reason = '',
        target_samples = CASE
            WHEN json_type(spec, '$.stop.samples') = 'integer' AND json_extract(spec, '$.stop.samples') > 0
            THEN json_extract(spec, '$.stop.samples') ELSE 0 END,
        wait_seconds = CASE
            WHEN json_type(spec, '$.peers.wait_seconds') IN ('integer', 'real')
                 AND json_extract(spec, '$.peers.wait_seconds') > 0
            THEN json_extract(spec, '$.peers.wait_seconds') ELSE 120.0 END;
    ALTER TABLE matches ADD COLUMN peer_id TEXT;
    ALTER TABLE matches ADD COLUMN maddrs TEXT;
    ALTER TABLE matches ADD COLUMN joined_at REAL;
    ALTER TABLE matches ADD COLUMN last_report_at REAL;
    CREATE INDEX matches_run_account ON matches (run_id, account);
    CREATE INDEX runs_state ON runs (state);
    CREATE TABLE reports (
        run_id TEXT NOT NULL,
        account TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        lease_id TEXT NOT NULL,
        samples INTEGER NOT NULL,
        loss REAL NOT NULL,
        seconds REAL NOT NULL,
        paid_units INTEGER NOT NULL,
        accepted_at REAL NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (run_id, account, epoch)
    )
"""

_STATUS_QUERY = """
    SELECT r.*,
           (SELECT COUNT(*) FROM matches m WHERE m.run_id = r.id AND m.state = 'active') AS active,
           (SELECT COALESCE(SUM(p.samples), 0) FROM reports p
            WHERE p.run_id = r.id AND p.pay_state = 'paid') AS done,
           (SELECT COUNT(*) FROM audits a WHERE a.run_id = r.id AND a.state = 'pending') AS audits_pending,
           (SELECT MAX(p.accepted_at) FROM reports p WHERE p.run_id = r.id) AS last_report_at,
           COALESCE((SELECT b.units FROM books b WHERE b.name = 'escrow:' || r.id), 0) AS escrow_units
    FROM runs r
"""


def get_run(conn: sqlite3.Connection, run_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise NotFound(f"run {run_id!r} does not exist", field="run_id")
    return row


# ------------------------------------------------------------------------------------------ state changes


def advance(
    conn: sqlite3.Connection, now: float, policy: runs.RunPolicy, run_ids: Sequence[str] | None = None
) -> list[tuple[str, runs.Transition]]:
    """Apply every transition :func:`coordinator.runs.advance` decides for the given runs (all live runs
    when ``run_ids`` is None); returns them, in order, with their run ids."""
    if run_ids is None:
        marks = ",".join("?" * len(states.LIVE))
        rows = conn.execute(f"{_STATUS_QUERY} WHERE r.state IN ({marks})", states.LIVE).fetchall()
    else:
        marks = ",".join("?" * len(run_ids))
        rows = conn.execute(f"{_STATUS_QUERY} WHERE r.id IN ({marks})", tuple(run_ids)).fetchall()
    applied = []
    for row in rows:
        status = runs.RunStatus(
            state=row["state"],
            state_since=row["state_since"],
            active=row["active"],
            samples=row["done"],
            escrow_units=row["escrow_units"],
            last_report_at=row["last_report_at"],
            model_uploaded=row["model_sha256"] is not None,
            audits_pending=row["audits_pending"],
        )
        config = runs.RunConfig(
            peers_min=row["peers_min"],
            target_samples=row["target_samples"] or 0,
            wait_seconds=row["wait_seconds"],
            settle_timeout=policy.settle_timeout,
            stall_timeout=policy.stall_timeout,
        )
        for step in runs.advance(now, status, config):
            set_state(conn, now, row["id"], row["owner"], step)
            logger.info(f"Run {row['id']} is {step.state}: {step.reason}")
            applied.append((row["id"], step))
    return applied


def set_state(conn: sqlite3.Connection, now: float, run_id: str, owner: str, step: runs.Transition) -> None:
    if step.state in states.ENDED:
        end_run(conn, now, run_id, owner, step)
        return
    conn.execute(
        "UPDATE runs SET state = ?, state_since = ?, reason = ? WHERE id = ?",
        (step.state, now, step.reason, run_id),
    )


def end_run(conn: sqlite3.Connection, now: float, run_id: str, owner: str, step: runs.Transition) -> None:
    """The one way a run ends (finished, failed, cancelled): expire its pending audits (their reports'
    held pay goes back to the escrow), refund what the escrow holds to the owner, release the active
    matches and free their leases, so the peers return to the open market."""
    audit_store.expire(conn, now, run_id, ending=True)
    sql.post(conn, ledger.refund(run_id, owner, sql.book(conn, ledger.escrow_book(run_id))), now)
    conn.execute(
        "UPDATE runs SET state = ?, state_since = ?, reason = ? WHERE id = ?",
        (step.state, now, step.reason, run_id),
    )
    conn.execute("UPDATE matches SET state = 'released' WHERE run_id = ? AND state = 'active'", (run_id,))
    conn.execute("UPDATE leases SET run_id = NULL, price_units = NULL WHERE run_id = ?", (run_id,))


# -------------------------------------------------------------------------------------------------- runs


def create_run(conn: sqlite3.Connection, now: float, env: Envelope, body: RunBody) -> RunView:
    sql.claim_nonce(conn, env)
    spec = check_run_spec(body.spec)
    run_id = f"run-{secrets.token_hex(6)}"
    budget = to_units(body.budget)
    conn.execute(
        """INSERT INTO runs (id, owner, name, state, spec, max_price_units, peers_min, peers_max,
                             min_vram_gb, budget_units, created_at, state_since, reason, target_samples,
                             wait_seconds, audit_key, audit_policy)
           VALUES (?, ?, ?, 'recruiting', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            run_id,
            env.account,
            spec.name,
            json.dumps(body.spec),
            to_units(body.max_price),
            body.peers_min,
            body.peers_max,
            body.min_vram_gb,
            budget,
            now,
            now,
            f"recruiting {body.peers_min} to {body.peers_max} peers",
            spec.stop.samples,
            spec.peers.wait_seconds,
            audit_store.new_key(),
            audit_store.policy_json(spec),
        ),
    )
    sql.post(conn, ledger.hold_escrow(env.account, run_id, budget), now)
    return run_view(conn, run_id)


def cancel_run(conn: sqlite3.Connection, now: float, env: Envelope, run_id: str) -> RunView:
    sql.claim_nonce(conn, env)
    run = get_run(conn, run_id)
    if run["owner"] != env.account:
        raise Forbidden(f"run {run_id!r} belongs to another account", field="run_id")
    if run["state"] in states.ENDED:
        raise Conflict(f"run {run_id!r} is already {run['state']}", code="run_ended", field="run_id")
    end_run(conn, now, run_id, run["owner"], runs.Transition("cancelled", "cancelled by its owner"))
    return run_view(conn, run_id)


def run_view(conn: sqlite3.Connection, run_id: str) -> RunView:
    return run_views(conn, [get_run(conn, run_id)], one=True)[0]


def run_views(conn: sqlite3.Connection, rows: Sequence[sqlite3.Row], *, one: bool = False) -> list[RunView]:
    """Views of ``rows``: one run (``one``) or every run, each aggregate gathered by one GROUP BY query
    over the run (or over all runs) rather than a query per run or per report."""
    if not rows:
        return []
    if one:
        run_id = rows[0]["id"]
        where, args = "WHERE run_id = ?", (run_id,)
        escrow_where, escrow_args = "= ?", (ledger.escrow_book(run_id),)
        held_where, held_args = "= ?", (ledger.held_book(run_id),)
    else:
        where, args = "", ()
        escrow_where, escrow_args = ">= 'escrow:' AND {col} < 'escrow;'", ()  # the 'escrow:' prefix range
        held_where, held_args = ">= 'held:' AND {col} < 'held;'", ()
    matches = defaultdict(list)
    for m in conn.execute(f"SELECT * FROM matches {where} ORDER BY matched_at, account", args):
        matches[m["run_id"]].append(m)
    per_match: dict[tuple[str, str], tuple[int, int, int | None]] = {
        (r["run_id"], r["lease_id"]): (r["samples"], r["paid"], r["epoch"])
        for r in conn.execute(
            "SELECT run_id, lease_id, SUM(CASE WHEN pay_state = 'paid' THEN samples ELSE 0 END) AS samples,"
            " SUM(CASE WHEN pay_state = 'paid' THEN paid_units ELSE 0 END) AS paid, MAX(epoch) AS epoch"
            f" FROM reports {where} GROUP BY run_id, lease_id",
            args,
        )
    }
    audited: dict[tuple[str, str], tuple[int, int]] = {
        (r["run_id"], r["account"]): (r["passed"], r["failed"])
        for r in conn.execute(
            "SELECT run_id, account, SUM(state = 'passed') AS passed, SUM(state = 'failed') AS failed"
            f" FROM audits {where} GROUP BY run_id, account",
            args,
        )
    }
    fees: dict[tuple[str, str], int] = {
        (r["run_id"], r["validator"]): r["fees"]
        for r in conn.execute(
            f"SELECT run_id, validator, SUM(fee_units) AS fees FROM audits {where}"
            " GROUP BY run_id, validator",
            args,
        )
    }
    latest = {
        r["run_id"]: (r["epoch"], r["loss"])
        for r in conn.execute(
            f"""SELECT p.run_id, p.epoch, AVG(p.loss) AS loss FROM reports p
                JOIN (SELECT run_id, MAX(epoch) AS epoch FROM reports {where} GROUP BY run_id) last
                  ON p.run_id = last.run_id AND p.epoch = last.epoch
                GROUP BY p.run_id""",
            args,
        )
    }
    totals = {
        r["run_id"]: r["samples"]
        for r in conn.execute(
            f"SELECT run_id, SUM(samples) AS samples FROM reports {where}"
            f" {'AND' if where else 'WHERE'} pay_state = 'paid' GROUP BY run_id",
            args,
        )
    }
    refunds = {
        r["debit"]: r["units"]
        for r in conn.execute(
            f"SELECT debit, SUM(units) AS units FROM entries WHERE debit {escrow_where.format(col='debit')}"
            " AND kind = 'refund' GROUP BY debit",
            escrow_args,
        )
    }
    books = {  # escrow:<run> and held:<run>
        r["name"]: r["units"]
        for r in conn.execute(
            f"SELECT name, units FROM books WHERE name {escrow_where.format(col='name')}"
            f" OR name {held_where.format(col='name')}",
            escrow_args + held_args,
        )
    }
    views = []
    for row in rows:
        book = ledger.escrow_book(row["id"])
        held = books.get(ledger.held_book(row["id"]), 0)
        refunded = refunds.get(book, 0)
        epoch_loss = latest.get(row["id"])
        views.append(
            RunView(
                id=row["id"],
                owner=row["owner"],
                name=row["name"],
                state=row["state"],
                reason=row["reason"] or "",
                state_since=row["state_since"] if row["state_since"] is not None else row["created_at"],
                spec=json.loads(row["spec"]),
                max_price=from_units(row["max_price_units"]),
                peers_min=row["peers_min"],
                peers_max=row["peers_max"],
                min_vram_gb=row["min_vram_gb"],
                budget=from_units(row["budget_units"]),
                escrow=from_units(books.get(book, 0)),
                held=from_units(held),
                # what left escrow and holds for peers and validators
                spent=from_units(row["budget_units"] - books.get(book, 0) - held - refunded),
                refunded=from_units(refunded),
                target_samples=row["target_samples"] or 0,
                samples=totals.get(row["id"], 0),
                epoch=0 if epoch_loss is None else epoch_loss[0] + 1,
                loss=None if epoch_loss is None else epoch_loss[1],
                peers=[
                    _peer_view(
                        m,
                        per_match.get((row["id"], m["lease_id"]), (0, 0, None)),
                        audited.get((row["id"], m["account"]), (0, 0)),
                        fees.get((row["id"], m["account"]), 0),
                    )
                    for m in matches[row["id"]]
                ],
                model=_model_view(row),
                created_at=row["created_at"],
            )
        )
    return views


def _peer_view(
    m: sqlite3.Row, work: tuple[int, int, int | None], audited: tuple[int, int], fee_units: int
) -> RunPeerView:
    return RunPeerView(
        account=m["account"],
        lease_id=m["lease_id"],
        price_per_hour=from_units(m["price_units"]),
        state=m["state"],
        matched_at=m["matched_at"],
        joined=m["joined_at"] is not None,
        joined_at=m["joined_at"],
        peer_id=m["peer_id"],
        maddrs=json.loads(m["maddrs"]) if m["maddrs"] else [],
        samples=work[0],
        paid=from_units(work[1]),
        last_report_at=m["last_report_at"],
        epoch=work[2],
        audits_passed=audited[0],
        audits_failed=audited[1],
        fees=from_units(fee_units),
    )


def _model_view(row: sqlite3.Row) -> ModelView | None:
    if row["model_sha256"] is None:
        return None
    return ModelView(
        sha256=row["model_sha256"],
        bytes=row["model_bytes"],
        uploaded_by=row["model_by"],
        uploaded_at=row["model_at"],
    )


# ----------------------------------------------------------------------------------------- joins, reports


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
    elif rows[0]["state"] == "left":
        message = f"{who} gave its place in run {run_id!r} back"
    elif rows[0]["state"] == "banned":
        message = f"{who} was banned from run {run_id!r}: its reports failed their audits"
    else:
        message = f"{who} was released from run {run_id!r} when the run ended"
    raise Forbidden(message, code="not_in_run", field="run_id")


def _refuse_unless(run: sqlite3.Row, allowed: Sequence[str], doing: str) -> None:
    state = run["state"]
    if state in allowed:
        return
    if state in states.ENDED:
        code = "run_ended"
    elif state in ("pending", "recruiting"):
        code = "run_not_started"
    else:
        code = f"run_{state}"
    raise Conflict(f"run {run['id']!r} is {state}; {doing}", code=code, field="run_id")


def join(conn: sqlite3.Connection, now: float, env: Envelope, run_id: str, body: JoinBody) -> RunView:
    """Record where a matched peer can be reached; a re-join updates the address but keeps ``joined_at``
    (pay counts from the first join)."""
    sql.claim_nonce(conn, env)
    run = get_run(conn, run_id)
    _refuse_unless(run, states.BIDDING, "peers join while it recruits, runs or is paused")
    match = active_match(conn, run_id, env.account)
    conn.execute(
        "UPDATE matches SET peer_id = ?, maddrs = ?, joined_at = COALESCE(joined_at, ?)"
        " WHERE run_id = ? AND lease_id = ?",
        (body.peer_id, json.dumps(body.maddrs), now, run_id, match["lease_id"]),
    )
    return run_view(conn, run_id)


def leave(
    conn: sqlite3.Connection, now: float, env: Envelope, run_id: str, policy: runs.RunPolicy
) -> RunView:
    """A matched peer gives up its place (it cannot train the run: a task it has not installed, say).

    The match becomes ``left``, not dropped: leaving is not a lapse and costs no reliability. The lease
    goes back to the open market, the run recruits a replacement (or pauses, below its minimum), and the
    market never pairs this peer with this run again.
    """
    sql.claim_nonce(conn, env)
    get_run(conn, run_id)
    _end_match(conn, run_id, active_match(conn, run_id, env.account), "left")
    advance(conn, now, policy, [run_id])
    return run_view(conn, run_id)


def _end_match(conn: sqlite3.Connection, run_id: str, match: sqlite3.Row, state: str) -> None:
    """End a peer's active match (``left``, ``banned``): its lease goes back to the open market, and the
    market leaves it out of this run's clearing while the run bids."""
    conn.execute(
        "UPDATE matches SET state = ? WHERE run_id = ? AND lease_id = ?", (state, run_id, match["lease_id"])
    )
    conn.execute(
        "UPDATE leases SET run_id = NULL, price_units = NULL WHERE id = ? AND run_id = ?",
        (match["lease_id"], run_id),
    )


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
    run = get_run(conn, run_id)
    _refuse_unless(run, states.REPORTING, "reports are accepted while it runs, is paused or settles")
    match = active_match(conn, run_id, env.account)
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
    conn.execute(
        "UPDATE matches SET last_report_at = ? WHERE run_id = ? AND lease_id = ?",
        (now, run_id, match["lease_id"]),
    )
    audit_store.expire(conn, now, run_id)  # a run with no other peer has nobody to audit the report
    advance(conn, now, policy, [run_id])
    row = conn.execute(
        "SELECT * FROM reports WHERE run_id = ? AND account = ? AND epoch = ?",
        (run_id, env.account, body.epoch),
    ).fetchone()
    return _report_view(row)


def reports(conn: sqlite3.Connection, run_id: str) -> list[ReportView]:
    get_run(conn, run_id)
    return [
        _report_view(row)
        for row in conn.execute("SELECT * FROM reports WHERE run_id = ? ORDER BY epoch, account", (run_id,))
    ]


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


# ------------------------------------------------------------------------------------------------- model


def accepts_model(conn: sqlite3.Connection, run_id: str) -> bool:
    """Whether an upload could be recorded now (settling, no model yet): a hint read before the transaction
    decides, so that an upload bound to fail never touches the run's model file."""
    row = conn.execute("SELECT state, model_sha256 FROM runs WHERE id = ?", (run_id,)).fetchone()
    return row is not None and row["state"] == "settling" and row["model_sha256"] is None


def check_uploader(conn: sqlite3.Connection, run_id: str, account: str) -> sqlite3.Row:
    """The run, if ``account`` may upload its model now: the run settles and the account is in it."""
    run = get_run(conn, run_id)
    if run["state"] != "settling":
        raise Conflict(
            f"run {run_id!r} is {run['state']}; a model is accepted only while the run settles",
            code="run_not_settling",
            field="run_id",
        )
    if run["model_sha256"] is not None:  # the run settles on, waiting for its last audits
        raise Conflict(
            f"run {run_id!r} already has its model ({run['model_sha256'][:12]}...)",
            code="model_exists",
            field="run_id",
        )
    active_match(conn, run_id, account)
    return run


def record_model(
    conn: sqlite3.Connection,
    now: float,
    env: Envelope,
    run_id: str,
    sha256: str,
    size: int,
    policy: runs.RunPolicy,
) -> RunView:
    """Record the final model of a settling run, uploaded by one of its active peers; the run finishes
    then, or once its last audits are decided (:func:`coordinator.runs.decide`)."""
    sql.claim_nonce(conn, env)
    check_uploader(conn, run_id, env.account)
    conn.execute(
        "UPDATE runs SET model_sha256 = ?, model_bytes = ?, model_by = ?, model_at = ? WHERE id = ?",
        (sha256, size, env.account, now, run_id),
    )
    advance(conn, now, policy, [run_id])
    return run_view(conn, run_id)


def model(conn: sqlite3.Connection, run_id: str) -> ModelView:
    view = _model_view(get_run(conn, run_id))
    if view is None:
        raise NotFound(f"run {run_id!r} has no model", code="no_model", field="run_id")
    return view


# ------------------------------------------------------------------------------------------------ audits


def claim_audits(
    conn: sqlite3.Connection, now: float, env: Envelope, run_id: str, limit: int, policy: runs.RunPolicy
) -> list[AuditTask]:
    """Audits for a validator: a peer with an active, joined match in the run (it holds the run's
    parameters), given other peers' micro-batches to recompute."""
    sql.claim_nonce(conn, env)
    run = get_run(conn, run_id)
    _refuse_unless(run, states.REPORTING, "audits are given out while it runs, is paused or settles")
    if active_match(conn, run_id, env.account)["joined_at"] is None:
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
    run = get_run(conn, run_id)
    active_match(conn, run_id, env.account)  # a validator that left, dropped or was banned has no say
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
            _end_match(conn, run_id, match, "banned")
            audit_store.forfeit(conn, now, run_id, audit["account"])
            logger.info(f"Peer {audit['account'][:12]}... is banned from run {run_id}: {why}")
    advance(conn, now, policy, [run_id])
    return audit_store.audit_view(conn, audit_id)


def audits(conn: sqlite3.Connection, run_id: str) -> list[AuditView]:
    get_run(conn, run_id)
    return audit_store.audit_views(conn, run_id)
