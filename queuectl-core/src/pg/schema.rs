//! The PostgreSQL schema and its migrations (documented in `docs/postgres.md`).
//!
//! Everything lives in one PostgreSQL schema of its own (`PgOptions::schema`), so several
//! queues can share a database and a test can drop its queue with `DROP SCHEMA … CASCADE`.
//! `{s}` in a statement stands for that schema's quoted name. The table `schema_version`
//! holds the number of migrations applied; they are applied in order on connect (or with the
//! first operation, `SchemaCheck::WithFirstUse`), in one transaction holding a
//! transaction-level advisory lock on the schema's name, so two workers starting together do
//! not both migrate. A released migration is never edited: a change to the schema is a new
//! migration.

use std::sync::LazyLock;

/// What a migration of a schema in use locks before anything else: `jobs`, then `attempts`,
/// the order in which a settlement of any build takes them (its jobs' rows, then the attempt's
/// insert) before the counts and the change counter it writes last. A migration that took
/// another of these tables first (version 2 alters `changes`, version 3 drops the key between
/// `attempts` and `jobs`) would deadlock with such a settlement.
pub(super) const LOCK_FIRST: &str = "LOCK TABLE {s}.jobs, {s}.attempts IN ACCESS EXCLUSIVE MODE";

/// Each migration, in order; migration `n` (1-based) brings `schema_version` from `n - 1` to
/// `n`.
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

/// The schema version this build writes, and the newest it reads.
pub const PG_SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// How many rows `counts` and `changes` spread each counter over. A write adds its changes to
/// one stripe chosen at random, so concurrent transactions rarely wait for each other's row
/// lock; readers add the stripes up.
pub(super) const STRIPES: i32 = 16;

/// Fails unless the schema's version table holds one row, [`PG_SCHEMA_VERSION`]: in a
/// transaction, the failure aborts it, so that nothing sent with the check is applied to a
/// schema this build does not know (`Db::check_schema`). The error says what was found.
pub(super) static GUARD: LazyLock<String> = LazyLock::new(|| {
    let v = PG_SCHEMA_VERSION;
    format!(
        "SELECT CASE WHEN count(*) = 1 AND min(version) = {v} THEN 0 ELSE \
         ('the queue''s schema is at version ' || coalesce(string_agg(version::text, ', '), \
         'none') || ', not {v}')::int END FROM {{s}}.schema_version"
    )
});

/// The name of every table the migrations make and of the sequences of its identity columns:
/// what a schema that is not a queue's holds besides these is named in the error that refuses
/// it (`PgStorage::check_ours`). A migration that adds a table adds it here
/// (`the_schema_holds_what_ours_names` checks).
pub(super) const OURS: &[&str] = &[
    "schema_version",
    "jobs",
    "jobs_seq_seq",
    "attempts",
    "attempts_id_seq",
    "counts",
    "queues",
    "dependencies",
    "workers",
    "meta",
    "changes",
    "live_output",
    "delete_attempts_of_deleted_jobs",
];

/// The names of what schema `$1` holds, but its indexes (which belong to its tables) and the
/// types PostgreSQL makes for its tables: every relation (tables, views, sequences, …), every
/// function and type of its own, and every other kind of object a schema can hold (operators,
/// their classes and families, collations, conversions, text search objects, extended
/// statistics).
pub(super) const CONTENTS: &str = "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n \
     ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind NOT IN ('i', 'I') \
     UNION ALL SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n \
     ON n.oid = p.pronamespace WHERE n.nspname = $1 \
     UNION ALL SELECT t.typname::text FROM pg_type t JOIN pg_namespace n \
     ON n.oid = t.typnamespace WHERE n.nspname = $1 AND t.typrelid = 0 AND t.typcategory <> 'A' \
     UNION ALL SELECT o.name::text FROM pg_namespace n JOIN ( \
         SELECT oprname AS name, oprnamespace AS ns FROM pg_operator \
         UNION ALL SELECT opcname, opcnamespace FROM pg_opclass \
         UNION ALL SELECT opfname, opfnamespace FROM pg_opfamily \
         UNION ALL SELECT collname, collnamespace FROM pg_collation \
         UNION ALL SELECT conname, connamespace FROM pg_conversion \
         UNION ALL SELECT cfgname, cfgnamespace FROM pg_ts_config \
         UNION ALL SELECT dictname, dictnamespace FROM pg_ts_dict \
         UNION ALL SELECT prsname, prsnamespace FROM pg_ts_parser \
         UNION ALL SELECT tmplname, tmplnamespace FROM pg_ts_template \
         UNION ALL SELECT stxname, stxnamespace FROM pg_statistic_ext \
     ) o ON o.ns = n.oid WHERE n.nspname = $1";

/// The first key of the advisory lock migrations hold (the second is the schema's name
/// hashed): "QCTL" in ASCII, as the embedded store's `application_id`.
pub(super) const LOCK_CLASS: i32 = 0x5143_544c;

/// Creates the schema and its version table if needed (under the migration lock).
pub(super) const BOOTSTRAP: &str = "
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.schema_version (version INTEGER NOT NULL);
INSERT INTO {s}.schema_version (version)
    SELECT 0 WHERE NOT EXISTS (SELECT FROM {s}.schema_version);
";

/// Version 1. Times are microseconds since the Unix epoch (UTC), durations microseconds, as
/// in the embedded store: the job a method returns is exactly what a later read returns.
const V1: &str = "
CREATE TABLE {s}.jobs (
    seq              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    command          TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    attempts         BIGINT  NOT NULL,
    max_retries      BIGINT  NOT NULL,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    priority         INTEGER NOT NULL,
    run_at           BIGINT  NOT NULL,
    timeout_us       BIGINT,
    last_error       TEXT,
    exit_code        INTEGER,
    started_at       BIGINT,
    finished_at      BIGINT,
    lease_worker     TEXT,
    lease_token      BIGINT,
    lease_expires_at BIGINT,
    runs             BIGINT  NOT NULL DEFAULT 0,
    queue            TEXT    NOT NULL,
    unique_key       TEXT,
    -- The ids of the jobs that must complete first; `dependencies` holds the same edges by
    -- seq, for finding a job's dependents.
    after_ids        TEXT[]  NOT NULL DEFAULT '{}',
    blocked          BOOLEAN NOT NULL DEFAULT false,
    -- Where a job waiting to run waits: 1 ready (due when written or promoted), 0 scheduled
    -- for later, NULL otherwise (as in the embedded store).
    lane             INTEGER
);
-- Claim order among a queue's ready jobs.
CREATE INDEX jobs_ready ON {s}.jobs (queue, priority DESC, run_at, seq) WHERE lane = 1;
-- `list --queue`.
CREATE INDEX jobs_queue ON {s}.jobs (queue, seq);
-- One job at a time holds a unique key: concurrent enqueues meet here.
CREATE UNIQUE INDEX jobs_unique ON {s}.jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('pending', 'processing', 'failed');
-- Promotion of scheduled jobs that became due, and the next due time.
CREATE INDEX jobs_scheduled ON {s}.jobs (run_at) WHERE lane = 0;
CREATE INDEX jobs_ready_at ON {s}.jobs (run_at) WHERE lane = 1;
-- `list --state`, the dead letter queue.
CREATE INDEX jobs_state ON {s}.jobs (state, seq);
-- Recovery of expired leases and of a dead worker's jobs.
CREATE INDEX jobs_lease_expiry ON {s}.jobs (lease_expires_at) WHERE state = 'processing';
CREATE INDEX jobs_lease_worker ON {s}.jobs (lease_worker, lease_expires_at)
    WHERE state = 'processing';
-- Retention of completed jobs.
CREATE INDEX jobs_completed ON {s}.jobs ((coalesce(finished_at, updated_at)))
    WHERE state = 'completed';

-- One row per finished attempt; output lives here, never in the rows claims read.
CREATE TABLE {s}.attempts (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_seq     BIGINT  NOT NULL REFERENCES {s}.jobs (seq) ON DELETE CASCADE,
    number      BIGINT  NOT NULL,
    worker      TEXT    NOT NULL,
    started_at  BIGINT  NOT NULL,
    finished_at BIGINT,
    outcome     TEXT    NOT NULL,
    exit_code   INTEGER,
    signal      INTEGER,
    error       TEXT,
    output      TEXT,
    due_at      BIGINT
);
CREATE INDEX attempts_job ON {s}.attempts (job_seq, id);
CREATE INDEX attempts_finished ON {s}.attempts (finished_at);

-- Jobs per queue and state, spread over stripes (see `STRIPES`): a stripe may go below zero,
-- the sum over a (queue, state) never does.
CREATE TABLE {s}.counts (
    queue  TEXT    NOT NULL,
    state  TEXT    NOT NULL,
    stripe INTEGER NOT NULL,
    jobs   BIGINT  NOT NULL,
    PRIMARY KEY (queue, state, stripe)
);

-- Settings of the queues that have any. A claim that takes jobs of a limited queue locks its
-- row first, so limits hold across processes and machines.
CREATE TABLE {s}.queues (
    name        TEXT    PRIMARY KEY,
    paused      BOOLEAN NOT NULL DEFAULT false,
    max_running BIGINT  NOT NULL DEFAULT 0 CHECK (max_running >= 0)
);

-- Job `job_seq` runs once job `after_seq` has completed.
CREATE TABLE {s}.dependencies (
    after_seq BIGINT NOT NULL REFERENCES {s}.jobs (seq) ON DELETE CASCADE,
    job_seq   BIGINT NOT NULL REFERENCES {s}.jobs (seq) ON DELETE CASCADE,
    PRIMARY KEY (after_seq, job_seq)
);
CREATE INDEX dependencies_job ON {s}.dependencies (job_seq);

-- Registered workers (their fields evolve with the pool, not with the schema).
CREATE TABLE {s}.workers (
    id   TEXT  PRIMARY KEY,
    info JSONB NOT NULL
);

-- `config`: the settings as JSON (NULL: the defaults). The row always exists, so a change
-- of the settings locks it.
CREATE TABLE {s}.meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
INSERT INTO {s}.meta (key, value) VALUES ('config', NULL);

-- The change counter: every transaction that changes something adds one to a stripe before
-- it commits (and sends a notification on the schema's channel).
CREATE TABLE {s}.changes (
    stripe INTEGER PRIMARY KEY,
    n      BIGINT  NOT NULL
);
INSERT INTO {s}.changes (stripe, n) SELECT i, 0 FROM generate_series(0, 15) AS i;

-- What running attempts printed so far, in the chunks their workers recorded.
CREATE TABLE {s}.live_output (
    job_seq BIGINT NOT NULL REFERENCES {s}.jobs (seq) ON DELETE CASCADE,
    upto    BIGINT NOT NULL,
    output  TEXT   NOT NULL,
    PRIMARY KEY (job_seq, upto)
);
";

/// Version 2: the change counter also counts, apart, the changes that may give a worker
/// something to do (`work`): a worker waiting for jobs is woken by those only, not by every
/// job finishing elsewhere (`PgStorage::wait_for_work`).
const V2: &str = "
ALTER TABLE {s}.changes ADD COLUMN work BIGINT NOT NULL DEFAULT 0;
";

/// Version 3: less written per job, for the same reads.
///
/// - `attempts` no longer references `jobs`: the foreign key's check ran a query for every
///   attempt recorded, about half the cost of its insert. A job's attempts were deleted with
///   it by this build's statements that delete jobs; an older build's, which counted on the
///   key's cascade, left them behind ([`V4`] deletes them wherever jobs are deleted from).
/// - `jobs_lease_worker` goes: each claim wrote an entry to it. A dead worker's jobs are
///   found through `jobs_lease_expiry`, which holds the running jobs only (as many as the
///   workers run at once).
///
/// The migration runs after [`LOCK_FIRST`]: dropping the key alone would lock `attempts` and
/// then `jobs`, and deadlock with a settlement of an older build.
const V3: &str = "
ALTER TABLE {s}.attempts DROP CONSTRAINT attempts_job_seq_fkey;
DROP INDEX {s}.jobs_lease_worker;
";

/// Version 4: a job's attempts are deleted with it, whoever deletes it, as the foreign key
/// that [`V3`] dropped had them: by a trigger that runs once per statement that deletes jobs
/// (not per row, and not on inserts, which the key's check slowed). Version 3 left this to
/// the statements of the build that migrated, so the purges of an older build still running
/// left attempts without their job: the migration deletes those. An attempt is only ever
/// added by a settlement holding its job's row lock, so none is added for a deleted job.
const V4: &str = "
CREATE FUNCTION {s}.delete_attempts_of_deleted_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {s}.attempts WHERE job_seq IN (SELECT seq FROM deleted);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_delete_attempts AFTER DELETE ON {s}.jobs
    REFERENCING OLD TABLE AS deleted FOR EACH STATEMENT
    EXECUTE FUNCTION {s}.delete_attempts_of_deleted_jobs();
DELETE FROM {s}.attempts a WHERE NOT EXISTS (SELECT FROM {s}.jobs j WHERE j.seq = a.job_seq);
";

/// Version 5: the trigger of [`V4`] finds `attempts` in the schema of the table it fires on
/// (`TG_TABLE_SCHEMA`), not in the schema it was created in. A queue's schema may be renamed
/// (and another queue made under the old name): written into the body, the old name had
/// deletes in the renamed schema delete the attempts of the other queue's jobs of the same
/// seqs. The seqs go as one array parameter, so a large purge passes them as values rather
/// than joining the deleted rows whole. The trigger runs with the rights of whoever deletes
/// the jobs, who then needs the right to delete from `attempts` too.
const V5: &str = "
CREATE OR REPLACE FUNCTION {s}.delete_attempts_of_deleted_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DELETE FROM %I.attempts WHERE job_seq = ANY($1)', TG_TABLE_SCHEMA)
        USING ARRAY(SELECT seq FROM deleted);
    RETURN NULL;
END
$$;
";
