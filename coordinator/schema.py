"""The coordinator's schema: every migration, in the order :class:`coordinator.db.Database` runs them.

A database records how many of these scripts it has applied and runs the rest when it opens, so a script is
never edited once released: a change to the schema is a new script appended at the end.

PostgreSQL came after the first :data:`POSTGRES_BASELINE_VERSION` scripts, which use SQLite's own SQL
(``json_extract``, ``randomblob``, ``WITHOUT ROWID``) to migrate databases that existed then. A new
PostgreSQL database starts from :data:`POSTGRES_BASELINE`, the same tables as those scripts leave (a test
compares the two catalogs), and both engines run every later script, which must therefore be written in
the SQL both accept: BIGINT, DOUBLE PRECISION, TEXT and BYTEA columns, ``ON CONFLICT`` rather than
``INSERT OR ...``, no SQLite-only functions. The schema lives in
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
    # The ledger audit's running totals (coordinator.ledger_store.audit): what the entries up to
    # ledger_checkpoint.last_entry add up to, per book, so that each audit replays only the entries added
    # since. A database that had entries before starts at 0: its first audit replays them all, once. Plain
    # SQL that PostgreSQL accepts too.
    """
    CREATE TABLE ledger_totals (
        book TEXT PRIMARY KEY,
        units BIGINT NOT NULL
    );
    CREATE TABLE ledger_checkpoint (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        last_entry BIGINT NOT NULL
    );
    INSERT INTO ledger_checkpoint (id, last_entry) VALUES (1, 0)
    """,
    # The addresses a member of a run's fast-path group could not be reached at (coordinator.groups:
    # JSON [[account, address], ...]), so that a later version does not try them on the fast path again.
    """
    ALTER TABLE run_groups ADD COLUMN suspects TEXT NOT NULL DEFAULT '[]'
    """,
    # A run's last report (the status every report and audit answer recomputes, coordinator.run_store):
    # reports_run_pay leads with pay_state, so MAX(accepted_at) read every report of the run (measured
    # at 1,216 reports: 159 us a status of 415).
    """
    CREATE INDEX reports_run_accepted ON reports (run_id, accepted_at)
    """,
    # A run's paid samples, kept as reports are paid (a paid report stays paid): the same status summed
    # them over the run's reports (143 of its 149 us at 1,216 reports, and growing with the run).
    """
    ALTER TABLE runs ADD COLUMN paid_samples BIGINT NOT NULL DEFAULT 0;
    UPDATE runs SET paid_samples = (SELECT COALESCE(SUM(p.samples), 0) FROM reports p
                                    WHERE p.run_id = runs.id AND p.pay_state = 'paid')
    """,
    # A run's view, kept as its reports and audits are decided rather than summed over them on every
    # fetch (measured at 1,596 reports and 3,192 audits: 8.0-9.7 ms a view, growing with the run; a
    # 400-step digits swarm fetches about 20 a second). Per match: its paid samples and pay and its last
    # reported epoch; per run: its last epoch and the losses reported at it; per account in a run: the
    # audits of its reports passed and failed and the fees it earned as a validator (from the ledger: the
    # sum over the audits counted a confirmed failure's two fees to the validator that decided it).
    """
    ALTER TABLE matches ADD COLUMN paid_samples BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE matches ADD COLUMN paid_units BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE matches ADD COLUMN last_epoch BIGINT;
    UPDATE matches SET
        paid_samples = (SELECT COALESCE(SUM(p.samples), 0) FROM reports p WHERE p.run_id = matches.run_id
                        AND p.lease_id = matches.lease_id AND p.pay_state = 'paid'),
        paid_units = (SELECT COALESCE(SUM(p.paid_units), 0) FROM reports p WHERE p.run_id = matches.run_id
                      AND p.lease_id = matches.lease_id AND p.pay_state = 'paid'),
        last_epoch = (SELECT MAX(p.epoch) FROM reports p WHERE p.run_id = matches.run_id
                      AND p.lease_id = matches.lease_id);
    ALTER TABLE runs ADD COLUMN last_epoch BIGINT;
    ALTER TABLE runs ADD COLUMN last_loss_sum DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN last_loss_count BIGINT NOT NULL DEFAULT 0;
    UPDATE runs SET last_epoch = (SELECT MAX(p.epoch) FROM reports p WHERE p.run_id = runs.id);
    UPDATE runs SET
        last_loss_sum = (SELECT COALESCE(SUM(p.loss), 0) FROM reports p
                         WHERE p.run_id = runs.id AND p.epoch = runs.last_epoch),
        last_loss_count = (SELECT COUNT(*) FROM reports p
                           WHERE p.run_id = runs.id AND p.epoch = runs.last_epoch);
    CREATE TABLE run_accounts (
        run_id TEXT NOT NULL,
        account TEXT NOT NULL,
        audits_passed BIGINT NOT NULL DEFAULT 0,
        audits_failed BIGINT NOT NULL DEFAULT 0,
        fee_units BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, account)
    );
    INSERT INTO run_accounts (run_id, account)
        SELECT run_id, account FROM audits
        UNION SELECT substr(debit, 8), substr(credit, 8) FROM entries WHERE kind = 'audit_fee';
    UPDATE run_accounts SET
        audits_passed = (SELECT COUNT(*) FROM audits a WHERE a.run_id = run_accounts.run_id
                         AND a.account = run_accounts.account AND a.state = 'passed'),
        audits_failed = (SELECT COUNT(*) FROM audits a WHERE a.run_id = run_accounts.run_id
                         AND a.account = run_accounts.account AND a.state = 'failed'),
        fee_units = (SELECT COALESCE(SUM(e.units), 0) FROM entries e WHERE e.kind = 'audit_fee'
                     AND e.debit = 'escrow:' || run_accounts.run_id
                     AND e.credit = 'earned:' || run_accounts.account)
    """,
    # The commitments to fast-path rounds that reports forward (coordinator.round_store): each is checked
    # against its member's own report once both are in (checked_at, distance); and the members' blames
    # after a round whose result did not match the commitments.
    """
    CREATE TABLE round_commitments (
        run_id TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        account TEXT NOT NULL,
        version BIGINT NOT NULL,
        update_sketch TEXT NOT NULL,
        claim TEXT NOT NULL,
        checked_at DOUBLE PRECISION,
        distance DOUBLE PRECISION,
        PRIMARY KEY (run_id, epoch, account, version, claim)
    );
    CREATE TABLE round_blames (
        run_id TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        version BIGINT NOT NULL,
        accuser TEXT NOT NULL,
        accused TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, epoch, version, accused, accuser)
    )
    """,
    # Delivered capacity and energy (coordinator.capacity). Offers: the probe's power draw and thermal
    # headroom, the TFLOP/s claimed before a re-rating replaced them, the flag and why, the last heartbeat
    # that reported throttling and the clock ratio it reported. Matches: the TFLOP/s they were priced on
    # and their tallies over accepted reports (reports, samples, billed seconds, pay, energy), the
    # measured ratio and flag. Peers: shortfalls not explained by throttling (they weigh on reputation).
    # Matches made before carry no TFLOP/s and are never measured.
    """
    ALTER TABLE offers ADD COLUMN claimed_tflops DOUBLE PRECISION;
    ALTER TABLE offers ADD COLUMN probe_power_w DOUBLE PRECISION;
    ALTER TABLE offers ADD COLUMN thermal_headroom_c DOUBLE PRECISION;
    ALTER TABLE offers ADD COLUMN capacity_flag TEXT;
    ALTER TABLE offers ADD COLUMN capacity_reason TEXT;
    ALTER TABLE offers ADD COLUMN throttled_at DOUBLE PRECISION;
    ALTER TABLE offers ADD COLUMN clock_ratio DOUBLE PRECISION;
    ALTER TABLE matches ADD COLUMN tflops DOUBLE PRECISION;
    ALTER TABLE matches ADD COLUMN billed_reports BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE matches ADD COLUMN billed_samples BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE matches ADD COLUMN billed_seconds DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE matches ADD COLUMN billed_units BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE matches ADD COLUMN energy_j DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE matches ADD COLUMN energy_samples BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE matches ADD COLUMN capacity_ratio DOUBLE PRECISION;
    ALTER TABLE matches ADD COLUMN capacity_flag TEXT;
    ALTER TABLE matches ADD COLUMN capacity_reason TEXT;
    ALTER TABLE peers ADD COLUMN shortfalls BIGINT NOT NULL DEFAULT 0
    """,
    # Canaries (coordinator.verification, "checking the checkers"): an audit row drawn from a decided
    # audit (canary_of names it); the answer a validator sent (the known answer of a confirmed failure);
    # per validator and run: fees held until it passes a canary, its canaries, its last canary's block and
    # why it may no longer validate the run.
    """
    ALTER TABLE audits ADD COLUMN canary_of TEXT;
    ALTER TABLE audits ADD COLUMN answer TEXT;
    ALTER TABLE run_accounts ADD COLUMN fee_held_units BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE run_accounts ADD COLUMN canaries_passed BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE run_accounts ADD COLUMN canaries_failed BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE run_accounts ADD COLUMN canary_block BIGINT;
    ALTER TABLE run_accounts ADD COLUMN validator_ban TEXT;
    CREATE INDEX audits_canary_of ON audits (canary_of) WHERE canary_of IS NOT NULL
    """,
    # Throttling explains a shortfall only as far as its reported clock ratio does (coordinator.capacity):
    # per match, the clock ratio its ask was weighed by when it was matched (NULL: 1) and the lowest one
    # its peer's heartbeats reported while throttled since (1 when one said throttled without a ratio;
    # NULL: none said throttled).
    """
    ALTER TABLE matches ADD COLUMN priced_clock_ratio DOUBLE PRECISION;
    ALTER TABLE matches ADD COLUMN throttled_clock_ratio DOUBLE PRECISION
    """,
)

POSTGRES_BASELINE_VERSION = 7

# MIGRATIONS[:POSTGRES_BASELINE_VERSION] for PostgreSQL: SQLite's INTEGER is BIGINT here (units and
# timestamps pass 2**31), REAL is DOUBLE PRECISION (PostgreSQL's REAL is 4 bytes) and BLOB is BYTEA. Text
# compares byte by byte (COLLATE "C") as in SQLite, whatever the server's locale: the store selects book
# ranges such as 'escrow:' <= name < 'escrow;', which a natural-language collation would reorder.
POSTGRES_BASELINE = """
    CREATE TABLE books (
        name TEXT COLLATE "C" PRIMARY KEY,
        units BIGINT NOT NULL,
        CHECK (name = 'external' OR units >= 0)
    );
    CREATE TABLE entries (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        kind TEXT COLLATE "C" NOT NULL,
        debit TEXT COLLATE "C" NOT NULL,
        credit TEXT COLLATE "C" NOT NULL,
        units BIGINT NOT NULL CHECK (units > 0),
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX entries_debit ON entries (debit, kind);
    CREATE TABLE nonces (
        timestamp BIGINT NOT NULL,
        account TEXT COLLATE "C" NOT NULL,
        nonce TEXT COLLATE "C" NOT NULL,
        refused TEXT COLLATE "C",
        PRIMARY KEY (timestamp, account, nonce)
    );
    CREATE TABLE peers (
        account TEXT COLLATE "C" PRIMARY KEY,
        uptime DOUBLE PRECISION NOT NULL DEFAULT 0,
        lapses BIGINT NOT NULL DEFAULT 0,
        audits_passed BIGINT NOT NULL DEFAULT 0,
        audits_failed BIGINT NOT NULL DEFAULT 0,
        verdicts_overturned BIGINT NOT NULL DEFAULT 0);
    CREATE TABLE leases (
        id TEXT COLLATE "C" PRIMARY KEY,
        account TEXT COLLATE "C" NOT NULL,
        state TEXT COLLATE "C" NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        last_heartbeat DOUBLE PRECISION NOT NULL,
        run_id TEXT COLLATE "C",
        price_units BIGINT
    );
    CREATE INDEX leases_state ON leases (state);
    CREATE TABLE offers (
        account TEXT COLLATE "C" PRIMARY KEY,
        price_units BIGINT NOT NULL,
        gpu TEXT COLLATE "C" NOT NULL,
        gpu_count BIGINT NOT NULL,
        vram_gb DOUBLE PRECISION NOT NULL,
        tflops DOUBLE PRECISION NOT NULL,
        ram_gb DOUBLE PRECISION NOT NULL,
        cpu_cores BIGINT NOT NULL,
        roles TEXT COLLATE "C" NOT NULL,
        min_lease_seconds BIGINT NOT NULL,
        peer_id TEXT COLLATE "C",
        maddrs TEXT COLLATE "C" NOT NULL,
        lease_id TEXT COLLATE "C" NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        power_w DOUBLE PRECISION,
        temperature_c DOUBLE PRECISION,
        utilization_pct DOUBLE PRECISION,
        telemetry_at DOUBLE PRECISION);
    CREATE TABLE runs (
        id TEXT COLLATE "C" PRIMARY KEY,
        owner TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        state TEXT COLLATE "C" NOT NULL,
        spec TEXT COLLATE "C" NOT NULL,
        max_price_units BIGINT NOT NULL,
        peers_min BIGINT NOT NULL,
        peers_max BIGINT NOT NULL,
        min_vram_gb DOUBLE PRECISION NOT NULL,
        budget_units BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        state_since DOUBLE PRECISION,
        reason TEXT COLLATE "C",
        target_samples BIGINT,
        wait_seconds DOUBLE PRECISION, model_sha256 TEXT COLLATE "C",
        model_bytes BIGINT,
        model_by TEXT COLLATE "C",
        model_at DOUBLE PRECISION,
        audit_key TEXT COLLATE "C",
        audit_policy TEXT COLLATE "C" NOT NULL DEFAULT '{"rate": 0}',
        recruit_seconds DOUBLE PRECISION,
        market_reason TEXT COLLATE "C");
    CREATE INDEX runs_owner ON runs (owner);
    CREATE TABLE matches (
        run_id TEXT COLLATE "C" NOT NULL,
        lease_id TEXT COLLATE "C" NOT NULL,
        account TEXT COLLATE "C" NOT NULL,
        price_units BIGINT NOT NULL,
        state TEXT COLLATE "C" NOT NULL,
        matched_at DOUBLE PRECISION NOT NULL,
        peer_id TEXT COLLATE "C",
        maddrs TEXT COLLATE "C",
        joined_at DOUBLE PRECISION,
        last_report_at DOUBLE PRECISION,
        PRIMARY KEY (run_id, lease_id)
    );
    CREATE INDEX matches_lease ON matches (lease_id);
    CREATE TABLE rounds (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        clearing_price_units BIGINT,
        trades BIGINT NOT NULL,
        supply BIGINT NOT NULL,
        demand BIGINT NOT NULL,
        reason TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX matches_run_account ON matches (run_id, account);
    CREATE INDEX runs_state ON runs (state);
    CREATE TABLE reports (
        run_id TEXT COLLATE "C" NOT NULL,
        account TEXT COLLATE "C" NOT NULL,
        epoch BIGINT NOT NULL,
        lease_id TEXT COLLATE "C" NOT NULL,
        samples BIGINT NOT NULL,
        loss DOUBLE PRECISION NOT NULL,
        seconds DOUBLE PRECISION NOT NULL,
        paid_units BIGINT NOT NULL,
        accepted_at DOUBLE PRECISION NOT NULL,
        body TEXT COLLATE "C" NOT NULL,
        pay_state TEXT COLLATE "C" NOT NULL DEFAULT 'paid',
        pay_reason TEXT COLLATE "C" NOT NULL DEFAULT 'accepted before audits existed',
        PRIMARY KEY (run_id, account, epoch)
    );
    CREATE TABLE audits (
        id TEXT COLLATE "C" PRIMARY KEY,
        run_id TEXT COLLATE "C" NOT NULL,
        epoch BIGINT NOT NULL,
        account TEXT COLLATE "C" NOT NULL,
        idx BIGINT NOT NULL,
        samples BIGINT NOT NULL,
        state TEXT COLLATE "C" NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        deadline DOUBLE PRECISION NOT NULL,
        validator TEXT COLLATE "C",
        claimed_at DOUBLE PRECISION,
        declined TEXT COLLATE "C" NOT NULL DEFAULT '[]',
        distance DOUBLE PRECISION,
        reason TEXT COLLATE "C" NOT NULL DEFAULT '',
        fee_units BIGINT NOT NULL DEFAULT 0,
        decided_at DOUBLE PRECISION,
        first_failure TEXT COLLATE "C");
    CREATE INDEX audits_run_state ON audits (run_id, state);
    CREATE INDEX audits_report ON audits (run_id, account, epoch);
    CREATE INDEX audits_pending_deadline ON audits (state, deadline);
    CREATE TABLE run_groups (
        run_id TEXT COLLATE "C" PRIMARY KEY,
        version BIGINT NOT NULL,
        members TEXT COLLATE "C" NOT NULL,
        path TEXT COLLATE "C" NOT NULL,
        reason TEXT COLLATE "C" NOT NULL,
        formed_at DOUBLE PRECISION NOT NULL,
        failed_at DOUBLE PRECISION,
        failed_by TEXT COLLATE "C"
    );
    CREATE INDEX run_groups_failed ON run_groups (failed_at) WHERE failed_at IS NOT NULL;
    CREATE TABLE group_checkins (
        run_id TEXT COLLATE "C" NOT NULL,
        account TEXT COLLATE "C" NOT NULL,
        lease_id TEXT COLLATE "C" NOT NULL,
        address TEXT COLLATE "C",
        version BIGINT,
        failed_version BIGINT,
        unreachable TEXT COLLATE "C" NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, account)
    );
    CREATE TABLE rendezvous_keys (
        run_id TEXT COLLATE "C" NOT NULL,
        version BIGINT NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        value BYTEA NOT NULL,
        writer TEXT COLLATE "C" NOT NULL,
        written_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, version, key)
    );
    CREATE INDEX reports_run_pay ON reports (run_id, pay_state, samples, accepted_at);
    CREATE INDEX reports_run_lease ON reports (run_id, lease_id, pay_state, samples, paid_units, epoch)
"""


def sqlite_migrations() -> list[tuple[int, str]]:
    """(version once applied, script) for a SQLite database."""
    return [(number, script) for number, script in enumerate(MIGRATIONS, start=1)]


def postgres_migrations() -> list[tuple[int, str]]:
    """(version once applied, script) for a PostgreSQL database: the baseline, then the shared scripts."""
    return [(POSTGRES_BASELINE_VERSION, POSTGRES_BASELINE), *sqlite_migrations()[POSTGRES_BASELINE_VERSION:]]
