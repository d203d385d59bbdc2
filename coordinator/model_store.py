"""Persistence of a run's final model: whether an upload could be recorded now, who may upload it, the
record of the upload (the run then finishes, or once its last audits are decided), and the model's record.

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLStore` runs them inside one transaction with the request's nonce. The model's
bytes are on disk (:mod:`coordinator.model_files`); its record is columns of the run's row, so its view is
:func:`coordinator.run_store.model_view`.
"""

from __future__ import annotations

import sqlite3

from coordinator import match_store, run_store, runs, sql
from coordinator.errors import Conflict, NotFound
from peer.protocol.envelope import Envelope
from peer.protocol.run_schemas import ModelView, RunView


def accepts_model(conn: sqlite3.Connection, run_id: str) -> bool:
    """Whether an upload could be recorded now (settling, no model yet): a hint read before the transaction
    decides, so that an upload bound to fail never touches the run's model file."""
    row = conn.execute("SELECT state, model_sha256 FROM runs WHERE id = ?", (run_id,)).fetchone()
    return row is not None and row["state"] == "settling" and row["model_sha256"] is None


def check_uploader(conn: sqlite3.Connection, run_id: str, account: str) -> sqlite3.Row:
    """The run, if ``account`` may upload its model now: the run settles and the account is in it."""
    run = run_store.get_run(conn, run_id)
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
    match_store.active_match(conn, run_id, account)
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
    run_store.advance(conn, now, policy, [run_id])
    return run_store.run_view(conn, run_id)


def model(conn: sqlite3.Connection, run_id: str) -> ModelView:
    view = run_store.model_view(run_store.get_run(conn, run_id))
    if view is None:
        raise NotFound(f"run {run_id!r} has no model", code="no_model", field="run_id")
    return view
