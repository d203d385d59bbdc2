"""Persistence of audits: drawn when a report arrives, claimed by validators, decided, expired; and the
pay of the audited report, held until its audits are decided.

The decisions are :mod:`coordinator.verification`'s pure functions; this module reads what they need and
writes what they return. Functions take the connection of the transaction they are part of;
:mod:`coordinator.report_store` calls them (checking first that the caller is in the run) and bans and
moves runs on from what they return; :mod:`coordinator.run_store` expires a run's audits when it ends.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from typing import Any

from coordinator import ledger, sql, verification
from coordinator.errors import Conflict, Forbidden, NotFound
from coordinator.verification import AuditPolicy
from peer.protocol.money import from_units
from peer.protocol.run_schemas import AuditResultBody, AuditTask, AuditView, ReportBody
from peer.protocol.spec import RunSpec, VerificationSpec
from peer.protocol.states import PayState


def new_key() -> str:
    return secrets.token_hex(32)


def policy_json(spec: RunSpec) -> str:
    """What is stored with a run when it is created: its spec's ``verification`` with every default filled
    in, so that the policy a run was launched with never changes with this code's defaults."""
    return spec.verification.model_dump_json()


def policy_of(run: sqlite3.Row) -> AuditPolicy:
    """The run's stored policy; a run stored before canaries existed keeps none (``canary_rate`` 0), so
    that an upgrade does not start holding the fees of a run already going."""
    stored = json.loads(run["audit_policy"])
    stored.setdefault("canary_rate", 0.0)
    return AuditPolicy(**VerificationSpec.model_validate(stored).model_dump())


def open_audits(
    conn: sqlite3.Connection, now: float, run: sqlite3.Row, account: str, body: ReportBody, timeout: float
) -> int:
    """Draw the audits of a report that was just accepted; returns how many."""
    indices = verification.choose_audits(
        bytes.fromhex(run["audit_key"]), body.epoch, account, len(body.micro_batches), policy_of(run)
    )
    conn.executemany(
        """INSERT INTO audits (id, run_id, epoch, account, idx, samples, state, created_at, deadline)
           VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)""",
        [
            (
                f"audit-{secrets.token_hex(8)}",
                run["id"],
                body.epoch,
                account,
                i,
                len(body.micro_batches[i].ids),
                now,
                now + timeout,
            )
            for i in indices
        ],
    )
    return len(indices)


#: A claim ranks up to this many times its limit of the oldest audits it may take (coordinator.verification
#: claim_rank), so that a run with thousands pending does not rank them all on every claim.
CLAIM_POOL = 4


def claim(
    conn: sqlite3.Connection,
    now: float,
    run: sqlite3.Row,
    validator: str,
    limit: int,
    claim_timeout: float,
    audit_timeout: float,
) -> list[AuditTask]:
    """Give ``validator`` up to ``limit`` pending audits of other peers' reports: the ones it holds, then
    unclaimed ones and ones whose validator has not answered within ``claim_timeout``, older epochs first
    (they leave the validators' windows first) and, within an epoch, in an order drawn under the run's
    key (:func:`coordinator.verification.claim_rank`); never ones it declined or let lapse, nor canaries
    given to another. Holding an audit again does not extend the hold, so that nobody can sit on an audit
    until it expires (which would leave the audited report unpaid). A claim may also carry a canary
    (:func:`add_canary`). A validator banned from validating the run is refused (403)."""
    run_id, key = run["id"], bytes.fromhex(run["audit_key"])
    tally = _tally(conn, run_id, validator)
    if tally is not None and tally["validator_ban"]:
        raise Forbidden(
            f"account {validator[:12]}... may no longer validate run {run_id!r}: {tally['validator_ban']}",
            code="validator_banned",
            field="run_id",
        )
    rows = conn.execute(
        """SELECT a.*, p.body FROM audits a
           JOIN reports p ON p.run_id = a.run_id AND p.account = a.account AND p.epoch = a.epoch
           WHERE a.run_id = ? AND a.state = 'pending' AND a.account != ?
             AND (a.validator IS NULL OR a.validator = ? OR (a.claimed_at < ? AND a.canary_of IS NULL))
             AND a.declined NOT LIKE '%"' || ? || '"%'
           ORDER BY CASE WHEN a.validator = ? THEN 0 ELSE 1 END, a.epoch, a.created_at, a.id LIMIT ?""",
        (run_id, validator, validator, now - claim_timeout, validator, validator, limit * CLAIM_POOL),
    ).fetchall()

    def order(row: sqlite3.Row) -> tuple[bool, int, bytes]:
        return row["validator"] != validator, row["epoch"], verification.claim_rank(key, validator, row["id"])

    rows = sorted(rows, key=order)[:limit]
    for row in rows:
        if row["validator"] not in (None, validator):  # taken over: the lapsed holder never gets it back
            declined = [*json.loads(row["declined"]), row["validator"]]
            conn.execute("UPDATE audits SET declined = ? WHERE id = ?", (json.dumps(declined), row["id"]))
        if row["validator"] != validator:
            conn.execute(
                "UPDATE audits SET validator = ?, claimed_at = ? WHERE id = ?", (validator, now, row["id"])
            )
    real = [r for r in rows if r["canary_of"] is None]
    if real and len(rows) < limit:
        canary = add_canary(conn, now, run, validator, max(r["epoch"] for r in real), audit_timeout)
        if canary is not None:
            rows.append(canary)
    rows.sort(key=lambda r: (r["epoch"], verification.claim_rank(key, validator, r["id"])))
    return [_task(run_id, row) for row in rows]


def _task(run_id: str, row: sqlite3.Row) -> AuditTask:
    """What a validator is told of an audit (a canary's row reads the same)."""
    report: dict[str, Any] = json.loads(row["body"])
    return AuditTask(
        id=row["id"],
        run_id=run_id,
        epoch=row["epoch"],
        account=row["account"],
        index=row["idx"],
        ids=report["micro_batches"][row["idx"]]["ids"],
        param_sketch=report["param_sketch"],
        device=report.get("device", "cpu"),
    )


def add_canary(
    conn: sqlite3.Connection, now: float, run: sqlite3.Row, validator: str, epoch: int, audit_timeout: float
) -> sqlite3.Row | None:
    """Give ``validator`` a canary with its claim of audits of ``epoch`` when one is due
    (:func:`coordinator.verification.canary_due`) and the run holds a source: a decided audit of another
    account's report, of the run's last ``canary_window`` epochs and no later than ``epoch`` (the
    validator holds them), that passed (the claim is the answer) or failed on two validators' word (their
    recomputation is the answer), and whose micro-batch this validator never held. The source is drawn
    under the run's key. The canary is a new audit row held by the validator (``canary_of`` names the
    source) with the source's epoch, account and micro-batch: its task reads like any other. Returns the
    row, or None."""
    run_id, policy, key = run["id"], policy_of(run), bytes.fromhex(run["audit_key"])
    tally = _tally(conn, run_id, validator)
    last_block = tally["canary_block"] if tally is not None else None
    if not verification.canary_due(key, validator, epoch, policy.canary_rate, last_block):
        return None
    newest = run["last_epoch"] if run["last_epoch"] is not None else epoch
    sources = conn.execute(
        """SELECT s.* FROM audits s
           WHERE s.run_id = ? AND s.canary_of IS NULL AND s.epoch >= ? AND s.epoch <= ?
             AND s.account != ? AND s.validator != ?
             AND (s.state = 'passed' OR (s.state = 'failed' AND s.first_failure IS NOT NULL
                                         AND s.answer IS NOT NULL))
             AND s.declined NOT LIKE '%"' || ? || '"%'
             AND COALESCE(s.first_failure, '') NOT LIKE '%"' || ? || '"%'
             AND NOT EXISTS (SELECT 1 FROM audits x WHERE x.run_id = s.run_id AND x.account = s.account
                             AND x.epoch = s.epoch AND x.idx = s.idx AND x.validator = ?)""",
        (
            run_id,
            newest - policy.canary_window + 1,
            epoch,
            validator,
            validator,
            validator,
            validator,
            validator,
        ),
    ).fetchall()
    if not sources:
        return None
    source = min(sources, key=lambda r: verification.claim_rank(key, validator, f"canary:{r['id']}"))
    canary_id = f"audit-{secrets.token_hex(8)}"
    conn.execute(
        """INSERT INTO audits (id, run_id, epoch, account, idx, samples, state, created_at, deadline,
                               validator, claimed_at, canary_of)
           VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)""",
        (
            canary_id,
            run_id,
            source["epoch"],
            source["account"],
            source["idx"],
            source["samples"],
            now,
            now + audit_timeout,
            validator,
            now,
            source["id"],
        ),
    )
    _count_account(conn, run_id, validator)
    conn.execute(
        "UPDATE run_accounts SET canary_block = ? WHERE run_id = ? AND account = ?",
        (epoch // verification.canary_block(policy.canary_rate), run_id, validator),
    )
    return conn.execute(
        """SELECT a.*, p.body FROM audits a
           JOIN reports p ON p.run_id = a.run_id AND p.account = a.account AND p.epoch = a.epoch
           WHERE a.id = ?""",
        (canary_id,),
    ).fetchone()


def _tally(conn: sqlite3.Connection, run_id: str, account: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT * FROM run_accounts WHERE run_id = ? AND account = ?", (run_id, account)
    ).fetchone()


def submit(
    conn: sqlite3.Connection,
    now: float,
    run: sqlite3.Row,
    validator: str,
    audit_id: str,
    body: AuditResultBody,
) -> sqlite3.Row:
    """Record a validator's answer to an audit it holds: declined (it goes back to the pool) or a verdict,
    with the validator's fee, the audited peer's reputation and the report's pay settled. A failure is
    final only once a second validator confirms it, when the run has another one: if the second passes
    the micro-batch, the first validator earns no fee and its overturned verdict lowers its reputation.
    Returns the audit's row as it now stands."""
    audit = conn.execute("SELECT * FROM audits WHERE id = ? AND run_id = ?", (audit_id, run["id"])).fetchone()
    if audit is None:
        raise NotFound(f"audit {audit_id!r} does not exist in run {run['id']!r}", field="audit_id")
    if audit["state"] != "pending":
        raise Conflict(
            f"audit {audit_id!r} is already {audit['state']}", code="audit_decided", field="audit_id"
        )
    if audit["validator"] != validator:
        raise Conflict(
            f"audit {audit_id!r} is not held by account {validator[:12]}...; claim audits first",
            code="audit_not_held",
            field="audit_id",
        )
    if audit["canary_of"] is not None:
        return _answer_canary(conn, now, run, validator, audit, body)
    if body.declined is not None:
        declined = [*json.loads(audit["declined"]), validator]
        conn.execute(
            "UPDATE audits SET validator = NULL, claimed_at = NULL, declined = ? WHERE id = ?",
            (json.dumps(declined), audit_id),
        )
        if _validators(conn, audit) <= set(declined):  # nobody left who could recompute it
            conn.execute(
                "UPDATE audits SET state = 'expired', reason = ?, decided_at = ? WHERE id = ?",
                (f"every other peer declined; the last: {body.declined}"[:300], now, audit_id),
            )
            settle_report(conn, now, run["id"], audit["account"], audit["epoch"])
        return _row(conn, audit_id)
    assert body.sketch is not None and body.loss is not None
    report = _report(conn, run["id"], audit["account"], audit["epoch"])
    claimed = json.loads(report["body"])["micro_batches"][audit["idx"]]
    result = verification.verdict(claimed["sketch"], claimed["loss"], body.sketch, body.loss, policy_of(run))
    declined = json.loads(audit["declined"])
    first = json.loads(audit["first_failure"]) if audit["first_failure"] else None
    if not result.passed and first is None and _validators(conn, audit) - {validator, *declined}:
        # a failure costs the audited peer its pay and its standing: another validator recomputes it first
        first = {"validator": validator, "reason": result.reason}
        conn.execute(
            """UPDATE audits SET validator = NULL, claimed_at = NULL, declined = ?, first_failure = ?
               WHERE id = ?""",
            (json.dumps([*declined, validator]), json.dumps(first), audit_id),
        )
        return _row(conn, audit_id)
    fee = verification.audit_fee(report["paid_units"], audit["samples"], report["samples"])
    paid = [validator]
    reason = result.reason
    if first is not None and result.passed:  # the first failure was wrong: no fee, and it counts against it
        conn.execute(
            "UPDATE peers SET verdicts_overturned = verdicts_overturned + 1 WHERE account = ?",
            (first["validator"],),
        )
        reason += f"; overturns the failure reported by {first['validator'][:12]}..."
    elif first is not None:
        paid.append(first["validator"])
        reason += f"; confirms the failure reported by {first['validator'][:12]}..."
    total = sum(_earn_fee(conn, now, run, who, fee) for who in paid)
    state = "passed" if result.passed else "failed"
    answer = json.dumps({"sketch": body.sketch, "loss": body.loss})  # a confirmed failure's known answer
    conn.execute(
        """UPDATE audits SET state = ?, distance = ?, reason = ?, fee_units = ?, decided_at = ?, answer = ?
           WHERE id = ?""",
        (state, result.distance, reason, total, now, answer, audit_id),
    )
    count_verdict(conn, run["id"], audit["account"], result.passed)
    settle_report(conn, now, run["id"], audit["account"], audit["epoch"])
    return _row(conn, audit_id)


def _earn_fee(conn: sqlite3.Connection, now: float, run: sqlite3.Row, validator: str, fee: int) -> int:
    """Pay ``validator`` an audit's ``fee`` from the run's escrow (as far as it holds), or, in a run with
    canaries, hold it until the validator passes a canary (:func:`release_fees`): a validator that fakes
    its answers is not paid for them before they are checked, and forfeits them when it is banned from
    validating. Returns the units earned (paid or held)."""
    units = min(sql.book(conn, ledger.escrow_book(run["id"])), fee)
    if policy_of(run).canary_rate > 0:
        sql.post(conn, ledger.hold_fee(run["id"], units), now)
        _count_account(conn, run["id"], validator)
        conn.execute(
            "UPDATE run_accounts SET fee_held_units = fee_held_units + ? WHERE run_id = ? AND account = ?",
            (units, run["id"], validator),
        )
    else:
        sql.post(conn, ledger.audit_fee(run["id"], validator, units), now)
        _count_account(conn, run["id"], validator, fees=units)
    return units


def release_fees(conn: sqlite3.Connection, now: float, run_id: str, validator: str | None = None) -> None:
    """Pay the fees held for ``validator`` (every validator of the run with None: the run ends, and a
    validator never caught is owed them) but one banned from validating, whose held fees are forfeit."""
    where, args = ("AND account = ?", (run_id, validator)) if validator else ("", (run_id,))
    for row in conn.execute(
        f"SELECT * FROM run_accounts WHERE run_id = ? AND fee_held_units > 0 {where}", args
    ).fetchall():
        units = row["fee_held_units"]
        if row["validator_ban"]:
            sql.post(conn, ledger.void_pay(run_id, units), now)
        else:
            sql.post(conn, ledger.release_fee(run_id, row["account"], units), now)
            _count_account(conn, run_id, row["account"], fees=units)
        conn.execute(
            "UPDATE run_accounts SET fee_held_units = 0 WHERE run_id = ? AND account = ?",
            (run_id, row["account"]),
        )


def _answer_canary(
    conn: sqlite3.Connection,
    now: float,
    run: sqlite3.Row,
    validator: str,
    canary: sqlite3.Row,
    body: AuditResultBody,
) -> sqlite3.Row:
    """Decide a canary. Declined: it ends (expired) with no fee and no blame, as a real audit the validator
    cannot recompute would go to another. Answered: compared with the answer the coordinator holds
    (:func:`coordinator.verification.canary_verdict`). Right: the validator earns the audit's fee (from
    the escrow, as for any audit) and every fee held for it is paid. Wrong: no fee, its reputation drops
    as for an overturned verdict, and after ``ban_after`` wrong canaries it may no longer validate the run
    (:func:`ban_validator`). The source report's pay and its peer's standing never change."""
    run_id, policy = run["id"], policy_of(run)
    if body.declined is not None:
        conn.execute(
            "UPDATE audits SET state = 'expired', reason = ?, decided_at = ? WHERE id = ?",
            (f"declined: {body.declined}"[:300], now, canary["id"]),
        )
        return _row(conn, canary["id"])
    assert body.sketch is not None and body.loss is not None
    source = _row(conn, canary["canary_of"])
    report = _report(conn, run_id, canary["account"], canary["epoch"])
    if source["state"] == "passed":
        expected = json.loads(report["body"])["micro_batches"][canary["idx"]]
    else:  # a confirmed failure: the claim is wrong, the validators' recomputation is the answer
        expected = json.loads(source["answer"])
    result = verification.canary_verdict(expected["sketch"], expected["loss"], body.sketch, body.loss, policy)
    fee = 0
    if result.passed:
        fee = _earn_fee(
            conn,
            now,
            run,
            validator,
            verification.audit_fee(report["paid_units"], canary["samples"], report["samples"]),
        )
        conn.execute(
            "UPDATE run_accounts SET canaries_passed = canaries_passed + 1 WHERE run_id = ? AND account = ?",
            (run_id, validator),
        )
        release_fees(conn, now, run_id, validator)
    else:
        conn.execute(
            "UPDATE peers SET verdicts_overturned = verdicts_overturned + 1 WHERE account = ?", (validator,)
        )
        conn.execute(
            "UPDATE run_accounts SET canaries_failed = canaries_failed + 1 WHERE run_id = ? AND account = ?",
            (run_id, validator),
        )
    conn.execute(
        """UPDATE audits SET state = ?, distance = ?, reason = ?, fee_units = ?, decided_at = ?, answer = ?
           WHERE id = ?""",
        (
            "passed" if result.passed else "failed",
            result.distance,
            result.reason,
            fee,
            now,
            json.dumps({"sketch": body.sketch, "loss": body.loss}),
            canary["id"],
        ),
    )
    tally = _tally(conn, run_id, validator)
    why = verification.validator_banned(tally["canaries_failed"] if tally else 0, policy)
    if why is not None and not (tally and tally["validator_ban"]):
        ban_validator(conn, now, run_id, validator, why)
    return _row(conn, canary["id"])


def ban_validator(conn: sqlite3.Connection, now: float, run_id: str, validator: str, why: str) -> None:
    """``validator`` may no longer validate the run (it still trains and reports, and its reports are
    audited as before): its claims are refused, the audits it holds go to others (never back to it), its
    pending canaries end, and the fees held for it go back to the escrow."""
    conn.execute(
        "UPDATE run_accounts SET validator_ban = ? WHERE run_id = ? AND account = ?", (why, run_id, validator)
    )
    for row in conn.execute(
        "SELECT * FROM audits WHERE run_id = ? AND state = 'pending' AND validator = ?", (run_id, validator)
    ).fetchall():
        if row["canary_of"] is not None:
            conn.execute(
                "UPDATE audits SET state = 'expired', reason = 'its validator was banned from validating',"
                " decided_at = ? WHERE id = ?",
                (now, row["id"]),
            )
        else:
            declined = json.dumps([*json.loads(row["declined"]), validator])
            conn.execute(
                "UPDATE audits SET validator = NULL, claimed_at = NULL, declined = ? WHERE id = ?",
                (declined, row["id"]),
            )
    release_fees(conn, now, run_id, validator)  # banned: forfeit


#: The matches of an audit's possible validators: the run's joined peers with an active match, but the
#: audited one (``a`` is the audit, ``m`` the match).
_VALIDATOR_MATCH = (
    "m.run_id = a.run_id AND m.state = 'active' AND m.joined_at IS NOT NULL AND m.account != a.account"
    " AND NOT EXISTS (SELECT 1 FROM run_accounts v WHERE v.run_id = m.run_id AND v.account = m.account"
    " AND v.validator_ban IS NOT NULL)"
)


def _validators(conn: sqlite3.Connection, audit: sqlite3.Row) -> set[str]:
    """Who could recompute the audit."""
    return {
        row["account"]
        for row in conn.execute(
            f"SELECT m.account FROM matches m, audits a WHERE a.id = ? AND {_VALIDATOR_MATCH}", (audit["id"],)
        )
    }


def failed_epochs(conn: sqlite3.Connection, run_id: str, account: str) -> int:
    (count,) = conn.execute(
        "SELECT COUNT(DISTINCT epoch) FROM audits"
        " WHERE run_id = ? AND account = ? AND state = 'failed' AND canary_of IS NULL",
        (run_id, account),
    ).fetchone()
    return count


def count_paid(conn: sqlite3.Connection, run_id: str, lease_id: str, samples: int, units: int) -> None:
    """Add a report's ``samples`` and pay to its run's and its match's tallies, as the report is paid
    (which is final): a run's view reads them instead of summing the run's reports."""
    conn.execute("UPDATE runs SET paid_samples = paid_samples + ? WHERE id = ?", (samples, run_id))
    conn.execute(
        "UPDATE matches SET paid_samples = paid_samples + ?, paid_units = paid_units + ?"
        " WHERE run_id = ? AND lease_id = ?",
        (samples, units, run_id, lease_id),
    )


def count_verdict(conn: sqlite3.Connection, run_id: str, account: str, passed: bool) -> None:
    """Count a decided check of ``account``'s work: its reputation (``peers``) and its run's tallies."""
    column = "audits_passed" if passed else "audits_failed"
    conn.execute(f"UPDATE peers SET {column} = {column} + 1 WHERE account = ?", (account,))
    _count_account(conn, run_id, account, passed=int(passed), failed=int(not passed))


def _count_account(
    conn: sqlite3.Connection, run_id: str, account: str, *, passed: int = 0, failed: int = 0, fees: int = 0
) -> None:
    """Add to an account's tallies in a run (the audits of its reports passed and failed, the fees it
    earned validating), which a run's view reads instead of summing the run's audits."""
    conn.execute(
        """INSERT INTO run_accounts (run_id, account, audits_passed, audits_failed, fee_units)
           VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (run_id, account) DO UPDATE SET
               audits_passed = run_accounts.audits_passed + excluded.audits_passed,
               audits_failed = run_accounts.audits_failed + excluded.audits_failed,
               fee_units = run_accounts.fee_units + excluded.fee_units""",
        (run_id, account, passed, failed, fees),
    )


def settle_report(conn: sqlite3.Connection, now: float, run_id: str, account: str, epoch: int) -> PayState:
    """Pay or void a held report once its audits say so (:func:`coordinator.verification.report_outcome`)."""
    report = _report(conn, run_id, account, epoch)
    if report["pay_state"] != "held":
        return report["pay_state"]
    states = [
        r["state"]
        for r in conn.execute(
            "SELECT state FROM audits WHERE run_id = ? AND account = ? AND epoch = ? AND canary_of IS NULL",
            (run_id, account, epoch),
        )
    ]
    outcome, reason = verification.report_outcome(states)
    if outcome == "held":
        return outcome
    units = report["paid_units"]
    entries = (
        ledger.release_pay(run_id, account, units) if outcome == "paid" else ledger.void_pay(run_id, units)
    )
    sql.post(conn, entries, now)
    conn.execute(
        "UPDATE reports SET pay_state = ?, pay_reason = ? WHERE run_id = ? AND account = ? AND epoch = ?",
        (outcome, reason, run_id, account, epoch),
    )
    if outcome == "paid":
        count_paid(conn, run_id, report["lease_id"], report["samples"], units)
    return outcome


_NO_OTHER_VALIDATOR = f"NOT EXISTS (SELECT 1 FROM matches m WHERE {_VALIDATOR_MATCH})"


def expire(
    conn: sqlite3.Connection, now: float, run_id: str | None = None, *, ending: bool = False
) -> set[str]:
    """Expire pending audits nobody will recompute and void their reports' pay; returns the runs touched.

    Those past their deadline; those of a run with no other joined peer (a peer that joins later never
    held the parameters of an earlier epoch, so waiting would only delay the run's end); with ``ending``,
    every pending audit of ``run_id``, whose run is ending. ``run_id`` limits the search to one run.
    """
    where, args = ["a.state = 'pending'"], []
    if run_id is not None:
        where.append("a.run_id = ?")
        args.append(run_id)
    if not ending:
        where.append(f"(a.deadline < ? OR {_NO_OTHER_VALIDATOR})")
        args.append(now)
    rows = conn.execute(f"SELECT a.* FROM audits a WHERE {' AND '.join(where)}", args).fetchall()

    def reason(row: sqlite3.Row) -> str:
        if ending:
            return "the run ended before a validator recomputed it"
        if row["deadline"] < now:
            return "no validator recomputed it before its deadline"
        return "no other peer of the run can recompute it"

    conn.executemany(
        "UPDATE audits SET state = 'expired', reason = ?, decided_at = ? WHERE id = ?",
        [(reason(r), now, r["id"]) for r in rows],
    )
    for report in {(r["run_id"], r["account"], r["epoch"]) for r in rows}:
        settle_report(conn, now, *report)
    return {r["run_id"] for r in rows}


def forfeit(conn: sqlite3.Connection, now: float, run_id: str, account: str) -> None:
    """A banned peer's pending audits in the run end unneeded, and the pay held for those reports goes
    back to the escrow: a proven cheat is not paid for what it reported alongside."""
    rows = conn.execute(
        "SELECT * FROM audits WHERE run_id = ? AND account = ? AND state = 'pending'", (run_id, account)
    ).fetchall()
    conn.executemany(
        "UPDATE audits SET state = 'expired', reason = 'the audited peer was banned from the run',"
        " decided_at = ? WHERE id = ?",
        [(now, r["id"]) for r in rows],
    )
    for report in conn.execute(
        "SELECT * FROM reports WHERE run_id = ? AND account = ? AND pay_state = 'held'", (run_id, account)
    ).fetchall():
        sql.post(conn, ledger.void_pay(run_id, report["paid_units"]), now)
        conn.execute(
            "UPDATE reports SET pay_state = 'voided', pay_reason = 'forfeit: banned from the run'"
            " WHERE run_id = ? AND account = ? AND epoch = ?",
            (run_id, account, report["epoch"]),
        )


def audit_views(conn: sqlite3.Connection, run_id: str) -> list[AuditView]:
    return [
        _view(row)
        for row in conn.execute(
            # a pending canary is not listed: a second audit of a decided micro-batch would give it away
            "SELECT * FROM audits WHERE run_id = ? AND (canary_of IS NULL OR state != 'pending')"
            " ORDER BY epoch, account, idx",
            (run_id,),
        )
    ]


def audit_view(conn: sqlite3.Connection, audit_id: str) -> AuditView:
    return _view(_row(conn, audit_id))


def _view(row: sqlite3.Row) -> AuditView:
    return AuditView(
        id=row["id"],
        run_id=row["run_id"],
        epoch=row["epoch"],
        account=row["account"],
        index=row["idx"],
        samples=row["samples"],
        state=row["state"],
        validator=row["validator"],
        distance=row["distance"],
        reason=row["reason"],
        fee=from_units(row["fee_units"]),
        first_failure=json.loads(row["first_failure"]) if row["first_failure"] else None,
        canary_of=row["canary_of"] if row["state"] != "pending" else None,
        created_at=row["created_at"],
        decided_at=row["decided_at"],
    )


def _row(conn: sqlite3.Connection, audit_id: str) -> sqlite3.Row:
    return conn.execute("SELECT * FROM audits WHERE id = ?", (audit_id,)).fetchone()


def _report(conn: sqlite3.Connection, run_id: str, account: str, epoch: int) -> sqlite3.Row:
    return conn.execute(
        "SELECT * FROM reports WHERE run_id = ? AND account = ? AND epoch = ?", (run_id, account, epoch)
    ).fetchone()
