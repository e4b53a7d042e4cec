//! The database schema and its migrations (documented in `docs/schema.md`).
//!
//! `PRAGMA user_version` holds the number of migrations applied; `PRAGMA application_id`
//! marks the file as a queuectl store. Migrations are applied in order, inside one `BEGIN
//! IMMEDIATE` transaction, when a store is opened. A released migration is never edited: a
//! change to the schema is a new migration, and a fixture of the old schema is checked in.

/// The database file inside a store directory.
pub(super) const DB_FILE: &str = "queuectl.db";

/// `PRAGMA application_id` of every queuectl database: "QCTL" in ASCII.
pub(super) const APPLICATION_ID: i32 = 0x5143_544c;

/// Each migration, in order; migration `n` (1-based) brings `user_version` from `n - 1` to `n`.
pub(super) const MIGRATIONS: &[&str] = &[V1];

/// The schema version this build writes, and the newest it reads.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Version 1. Times are microseconds since the Unix epoch (UTC); durations are microseconds.
const V1: &str = "
CREATE TABLE jobs (
    -- AUTOINCREMENT: a deleted job's number is never given to a new one.
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    command          TEXT    NOT NULL,
    -- A state name as in the job's JSON; Rust refuses a row with an unknown one as damage.
    -- (No CHECK: a later schema adding a state would have to rebuild the table.)
    state            TEXT    NOT NULL,
    attempts         INTEGER NOT NULL,
    max_retries      INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    priority         INTEGER NOT NULL,
    run_at           INTEGER NOT NULL,
    timeout_us       INTEGER,
    last_error       TEXT,
    exit_code        INTEGER,
    started_at       INTEGER,
    finished_at      INTEGER,
    lease_worker     TEXT,
    lease_token      INTEGER,
    lease_expires_at INTEGER,
    -- Attempts started over the job's life (numbers the history; `attempts` is the budget
    -- used, which a retry resets).
    runs             INTEGER NOT NULL DEFAULT 0,
    queue            TEXT    NOT NULL DEFAULT 'default',
    -- Held while the job is pending, processing or failed (see jobs_unique).
    unique_key       TEXT,
    -- The ids of the jobs that must complete first, as a JSON array (NULL: none); the
    -- `dependencies` table holds the same edges by seq, for finding a job's dependents.
    after_ids        TEXT,
    -- 1 while the job waits for one of them to complete.
    blocked          INTEGER NOT NULL DEFAULT 0,
    -- Where a job waiting to run waits: 1 = ready (due when last looked at), 0 = scheduled for
    -- later; NULL for every other state and while blocked. Derived from state, blocked and
    -- run_at when a job is written.
    lane             INTEGER
);

-- Claim order among a queue's ready jobs.
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, run_at, seq) WHERE lane = 1;
-- `list --queue`.
CREATE INDEX jobs_queue ON jobs (queue, seq);
-- One job at a time holds a unique key; enqueue finds the holder here.
CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('pending', 'processing', 'failed');
-- Promotion of scheduled jobs that became due, and the next due time.
CREATE INDEX jobs_scheduled ON jobs (run_at) WHERE lane = 0;
CREATE INDEX jobs_ready_at ON jobs (run_at) WHERE lane = 1;
-- `list --state`, `dlq list`, `dlq retry --all`, `dlq clear`.
CREATE INDEX jobs_state ON jobs (state, seq);
-- Recovery of expired leases and of a dead worker's jobs.
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE state = 'processing';
CREATE INDEX jobs_lease_worker ON jobs (lease_worker, lease_expires_at) WHERE state = 'processing';
-- Retention of completed jobs.
CREATE INDEX jobs_completed ON jobs (coalesce(finished_at, updated_at)) WHERE state = 'completed';

-- One row per finished attempt. Output lives here, never in the rows claims read.
CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    job_seq     INTEGER NOT NULL,
    number      INTEGER NOT NULL,
    worker      TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT    NOT NULL,
    exit_code   INTEGER,
    signal      INTEGER,
    error       TEXT,
    output      TEXT,
    -- When the job was due as the attempt was claimed (wait time = started_at - due_at).
    due_at      INTEGER
);
CREATE INDEX attempts_job ON attempts (job_seq, id);
-- `stats`: the attempts that finished in a window.
CREATE INDEX attempts_finished ON attempts (finished_at);

-- Jobs per queue and state, kept in step by every transaction that adds, changes or deletes
-- jobs (a row appears with the first job of its queue in that state).
CREATE TABLE counts (
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    jobs  INTEGER NOT NULL CHECK (jobs >= 0),
    PRIMARY KEY (queue, state)
) WITHOUT ROWID;

-- Settings of the queues that have any (a queue without a row is running, without a limit).
CREATE TABLE queues (
    name        TEXT PRIMARY KEY,
    paused      INTEGER NOT NULL DEFAULT 0,
    -- At most this many of the queue's jobs processing at once (0: no limit).
    max_running INTEGER NOT NULL DEFAULT 0 CHECK (max_running >= 0)
) WITHOUT ROWID;

-- Dependencies: job `job_seq` runs once job `after_seq` has completed.
CREATE TABLE dependencies (
    after_seq INTEGER NOT NULL,
    job_seq   INTEGER NOT NULL,
    PRIMARY KEY (after_seq, job_seq)
) WITHOUT ROWID;
CREATE INDEX dependencies_job ON dependencies (job_seq);

-- Registered workers, as JSON (their fields evolve with the pool, not with the schema).
CREATE TABLE workers (
    id   TEXT PRIMARY KEY,
    info TEXT NOT NULL
) WITHOUT ROWID;

-- `config` (the settings, as JSON) and facts about the store itself (`imported_from`).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- What running attempts printed so far, in the chunks their workers recorded: a chunk ends
-- `upto` bytes into its attempt's output. Deleted with the attempt's end (its output then
-- lives in `attempts`); never read by claims.
CREATE TABLE live_output (
    job_seq INTEGER NOT NULL,
    upto    INTEGER NOT NULL,
    output  TEXT    NOT NULL,
    PRIMARY KEY (job_seq, upto)
);
";
