"""Persistence of runs: creation and cancellation, state changes (and the one way a run ends), and the
views of runs with their peers, work, money and model.

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLStore` runs them inside one transaction with the request's nonce. Decisions
are :mod:`coordinator.runs`'s pure functions: this module gathers the state they need and writes what they
return, with the reason. What a run's peers do in it is persisted beside it, each moving the run on through
:func:`advance`: their places in it (:mod:`coordinator.match_store`), their reports and the audits of them
(:mod:`coordinator.report_store`), and the final model (:mod:`coordinator.model_store`).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections import defaultdict
from collections.abc import Sequence

from coordinator import audit_store, group_store, ledger, runs, sql
from coordinator.errors import Conflict, Forbidden, NotFound
from peer.protocol import states
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units, to_units
from peer.protocol.run_schemas import ModelView, RunBody, RunPeerView, RunView, check_run_spec

logger = logging.getLogger(__name__)


_STATUS_QUERY = """
    SELECT r.*,
           (SELECT COUNT(*) FROM matches m WHERE m.run_id = r.id AND m.state = 'active') AS active,
           r.paid_samples AS done,
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


def refuse_unless(run: sqlite3.Row, allowed: Sequence[str], doing: str) -> None:
    """Refuse (409) a request the run's state does not allow; the code says whether the run has not started,
    has ended, or is in some other state (``run_<state>``)."""
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
            market_reason=row["market_reason"],
        )
        config = runs.RunConfig(
            peers_min=row["peers_min"],
            target_samples=row["target_samples"] or 0,
            wait_seconds=row["wait_seconds"],
            recruit_seconds=row["recruit_seconds"],
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
    audit_store.release_fees(conn, now, run_id)  # validators never caught are paid what was held
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
                             wait_seconds, recruit_seconds, audit_key, audit_policy)
           VALUES (?, ?, ?, 'recruiting', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
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
            spec.peers.recruit_seconds,
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
    """Views of ``rows``: one run (``one``) or every run. Their reports' and audits' tallies are kept
    on the run, its matches and ``run_accounts`` as reports are paid and audits decided, so a view
    costs the same however long its run; the rest is gathered by one query over the run (or all runs)."""
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
    tallies = {
        (r["run_id"], r["account"]): r for r in conn.execute(f"SELECT * FROM run_accounts {where}", args)
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
    group_views = group_store.group_views(conn, [rows[0]["id"]] if one else None)
    views = []
    for row in rows:
        book = ledger.escrow_book(row["id"])
        held = books.get(ledger.held_book(row["id"]), 0)
        refunded = refunds.get(book, 0)
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
                market_reason=row["market_reason"],
                budget=from_units(row["budget_units"]),
                escrow=from_units(books.get(book, 0)),
                held=from_units(held),
                # what left escrow and holds for peers and validators
                spent=from_units(row["budget_units"] - books.get(book, 0) - held - refunded),
                refunded=from_units(refunded),
                target_samples=row["target_samples"] or 0,
                samples=row["paid_samples"],
                epoch=0 if row["last_epoch"] is None else row["last_epoch"] + 1,
                loss=row["last_loss_sum"] / row["last_loss_count"] if row["last_loss_count"] else None,
                peers=[_peer_view(m, tallies.get((row["id"], m["account"]))) for m in matches[row["id"]]],
                model=model_view(row),
                created_at=row["created_at"],
                group=group_views.get(row["id"]),
            )
        )
    return views


def _peer_view(m: sqlite3.Row, tally: sqlite3.Row | None) -> RunPeerView:
    """A match's view, with its account's tallies in the run (None: no audit of it or by it decided)."""
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
        samples=m["paid_samples"],
        paid=from_units(m["paid_units"]),
        last_report_at=m["last_report_at"],
        epoch=m["last_epoch"],
        audits_passed=tally["audits_passed"] if tally else 0,
        audits_failed=tally["audits_failed"] if tally else 0,
        fees=from_units(tally["fee_units"] if tally else 0),
        fees_held=from_units(tally["fee_held_units"] if tally else 0),
        canaries_passed=tally["canaries_passed"] if tally else 0,
        canaries_failed=tally["canaries_failed"] if tally else 0,
        validator_ban=tally["validator_ban"] if tally else None,
        tflops=m["tflops"],
        capacity_ratio=m["capacity_ratio"],
        capacity_flag=m["capacity_flag"],
        capacity_reason=m["capacity_reason"],
        energy_j_per_sample=m["energy_j"] / m["energy_samples"] if m["energy_samples"] else None,
    )


def model_view(row: sqlite3.Row) -> ModelView | None:
    if row["model_sha256"] is None:
        return None
    return ModelView(
        sha256=row["model_sha256"],
        bytes=row["model_bytes"],
        uploaded_by=row["model_by"],
        uploaded_at=row["model_at"],
    )
