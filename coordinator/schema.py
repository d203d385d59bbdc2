"""The coordinator's SQLite schema: every migration, in the order :class:`coordinator.db.Database` runs them.

A database records how many of these scripts it has applied and runs the rest when it opens, so a script is
never edited once released: a change to the schema is a new script appended at the end. The schema lives in
one place so that the tables every ``*_store`` module reads and writes can be read together; the columns a
later script adds are named here next to the reason for their defaults.
"""

from __future__ import annotations

MIGRATIONS = (
    """
    CREATE TABLE books (
        name TEXT PRIMARY KEY,
        units INTEGER NOT NULL,
        CHECK (name = 'external' OR units >= 0)
    );
    CREATE TABLE entries (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        debit TEXT NOT NULL,
        credit TEXT NOT NULL,
        units INTEGER NOT NULL CHECK (units > 0),
        created_at REAL NOT NULL
    );
    CREATE INDEX entries_debit ON entries (debit, kind);
    CREATE TABLE nonces (
        timestamp INTEGER NOT NULL,
        account TEXT NOT NULL,
        nonce TEXT NOT NULL,
        refused TEXT,
        PRIMARY KEY (timestamp, account, nonce)
    ) WITHOUT ROWID;
    CREATE TABLE peers (
        account TEXT PRIMARY KEY,
        uptime REAL NOT NULL DEFAULT 0,
        lapses INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_heartbeat REAL NOT NULL,
        run_id TEXT,
        price_units INTEGER
    );
    CREATE INDEX leases_state ON leases (state);
    CREATE TABLE offers (
        account TEXT PRIMARY KEY,
        price_units INTEGER NOT NULL,
        gpu TEXT NOT NULL,
        gpu_count INTEGER NOT NULL,
        vram_gb REAL NOT NULL,
        tflops REAL NOT NULL,
        ram_gb REAL NOT NULL,
        cpu_cores INTEGER NOT NULL,
        roles TEXT NOT NULL,
        min_lease_seconds INTEGER NOT NULL,
        peer_id TEXT,
        maddrs TEXT NOT NULL,
        lease_id TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,
        max_price_units INTEGER NOT NULL,
        peers_min INTEGER NOT NULL,
        peers_max INTEGER NOT NULL,
        min_vram_gb REAL NOT NULL,
        budget_units INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX runs_owner ON runs (owner);
    CREATE TABLE matches (
        run_id TEXT NOT NULL,
        lease_id TEXT NOT NULL,
        account TEXT NOT NULL,
        price_units INTEGER NOT NULL,
        state TEXT NOT NULL,
        matched_at REAL NOT NULL,
        PRIMARY KEY (run_id, lease_id)
    );
    CREATE INDEX matches_lease ON matches (lease_id);
    CREATE TABLE rounds (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        clearing_price_units INTEGER,
        trades INTEGER NOT NULL,
        supply INTEGER NOT NULL,
        demand INTEGER NOT NULL,
        reason TEXT NOT NULL
    )
    """,
    # Runs, joins and reports (existing databases migrate on open). Runs created before specs were validated
    # get no target (0) and the spec's default wait; their state dates from their creation.
    """
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
    """,
    # Audits. Reports accepted before audits existed were paid when they arrived; runs created before get a
    # key now, and audit nothing (their peers may not run validators).
    """
    ALTER TABLE runs ADD COLUMN audit_key TEXT;
    UPDATE runs SET audit_key = lower(hex(randomblob(32)));
    ALTER TABLE runs ADD COLUMN audit_policy TEXT NOT NULL DEFAULT '{"rate": 0}';
    ALTER TABLE reports ADD COLUMN pay_state TEXT NOT NULL DEFAULT 'paid';
    ALTER TABLE reports ADD COLUMN pay_reason TEXT NOT NULL DEFAULT 'accepted before audits existed';
    ALTER TABLE peers ADD COLUMN audits_passed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE peers ADD COLUMN audits_failed INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE audits (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        account TEXT NOT NULL,
        idx INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        deadline REAL NOT NULL,
        validator TEXT,
        claimed_at REAL,
        declined TEXT NOT NULL DEFAULT '[]',
        distance REAL,
        reason TEXT NOT NULL DEFAULT '',
        fee_units INTEGER NOT NULL DEFAULT 0,
        decided_at REAL
    );
    CREATE INDEX audits_run_state ON audits (run_id, state);
    CREATE INDEX audits_report ON audits (run_id, account, epoch);
    CREATE INDEX audits_pending_deadline ON audits (state, deadline);
    ALTER TABLE audits ADD COLUMN first_failure TEXT;
    ALTER TABLE peers ADD COLUMN verdicts_overturned INTEGER NOT NULL DEFAULT 0;
    """,
    # A peer's last telemetry (HeartbeatBody), shown by the dashboard.
    """
    ALTER TABLE offers ADD COLUMN power_w REAL;
    ALTER TABLE offers ADD COLUMN temperature_c REAL;
    ALTER TABLE offers ADD COLUMN utilization_pct REAL;
    ALTER TABLE offers ADD COLUMN telemetry_at REAL
    """,
    # Recruiting deadlines and why a run is not matched. Runs created before have no deadline (NULL): they
    # recruit as long as they were launched to.
    """
    ALTER TABLE runs ADD COLUMN recruit_seconds REAL;
    ALTER TABLE runs ADD COLUMN market_reason TEXT
    """,
    # The training group (coordinator.groups): its current version per run (members: JSON [[account, address
    # or null], ...] in rank order), each peer's last check-in, and the rendezvous keys of the current
    # version (older versions' keys are deleted when a new one forms). A check-in counts for the match
    # (lease_id) it was made under. Runs before this have no group until a peer checks in.
    """
    CREATE TABLE run_groups (
        run_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        members TEXT NOT NULL,
        path TEXT NOT NULL,
        reason TEXT NOT NULL,
        formed_at REAL NOT NULL,
        failed_at REAL,
        failed_by TEXT
    );
    CREATE INDEX run_groups_failed ON run_groups (failed_at) WHERE failed_at IS NOT NULL;
    CREATE TABLE group_checkins (
        run_id TEXT NOT NULL,
        account TEXT NOT NULL,
        lease_id TEXT NOT NULL,
        address TEXT,
        version INTEGER,
        failed_version INTEGER,
        unreachable TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (run_id, account)
    );
    CREATE TABLE rendezvous_keys (
        run_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        writer TEXT NOT NULL,
        written_at REAL NOT NULL,
        PRIMARY KEY (run_id, version, key)
    )
    """,
    # Covering indexes for the aggregates every run view, report and audit computes over a run's reports
    # (paid samples, the last acceptance, per-match tallies): without them each read every report's row,
    # body and all (measured at 1,236 reports: the run's status 3.3 -> 0.2 ms, its view 13.5 -> 3.9 ms).
    """
    CREATE INDEX reports_run_pay ON reports (run_id, pay_state, samples, accepted_at);
    CREATE INDEX reports_run_lease ON reports (run_id, lease_id, pay_state, samples, paid_units, epoch)
    """,
)
