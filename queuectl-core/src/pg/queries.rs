//! The statements on the hot paths, in one place so a test can check each one's plan
//! (`EXPLAIN`: each reads an index). `{s}` is the schema; `J` in a comment means the job
//! columns of [`super::rows::JOB_COLUMNS`].

/// After `SELECT J FROM {s}.jobs`: one job.
pub(super) const BY_ID: &str = "WHERE id = $1";

/// After `SELECT J FROM {s}.jobs`: the jobs with these ids, locked for a change, in seq
/// order (so two transactions lock them in the same order).
pub(super) const BY_IDS_FOR_UPDATE: &str = "WHERE id = ANY($1) ORDER BY seq FOR UPDATE";

/// After `SELECT J FROM {s}.jobs`: [`BY_IDS_FOR_UPDATE`] for one job. Statements with an
/// array parameter are planned afresh at every run (PostgreSQL's generic plan for them
/// assumes ten elements and costs more than the plan for the one element it is given), so
/// the batches of one job a busy worker mostly sends use statements with one value each,
/// whose plan is made once ([`PICK_READY_IN`], [`HAS_DEPENDENTS_BY_ID`], and the update of
/// one job in `rows`).
pub(super) const BY_ID_FOR_UPDATE: &str = "WHERE id = $1 FOR UPDATE";

/// [`HAVE_DEPENDENTS_BY_IDS`] for one job: its seq if another job waits for it.
pub(super) const HAS_DEPENDENTS_BY_ID: &str = "SELECT j.seq FROM {s}.jobs j JOIN \
     {s}.dependencies d ON d.after_seq = j.seq WHERE j.id = $1 LIMIT 1";

/// Of the jobs with the ids `$1`, those that other jobs wait for. Run after they were
/// locked, in a statement of its own: its snapshot then includes every dependency added
/// before the lock was taken (a new dependent locks what it waits for first).
pub(super) const HAVE_DEPENDENTS_BY_IDS: &str = "SELECT DISTINCT j.seq FROM {s}.jobs j JOIN \
     {s}.dependencies d ON d.after_seq = j.seq WHERE j.id = ANY($1)";

/// After `SELECT J FROM {s}.jobs`: the same, locked only against changes (live output).
pub(super) const BY_IDS_FOR_SHARE: &str = "WHERE id = ANY($1) ORDER BY seq FOR SHARE";

/// Scheduled jobs that became due join the ready ones. Rows another transaction holds are
/// left to it: it changes them, or a later claim promotes them.
///
/// A promotion is work (`rows::Channels`): a worker that skipped the row while this
/// transaction held it must hear of it even when the transaction is otherwise quiet, so when
/// any row was promoted it adds one to the work count of stripe `$2` and notifies the work
/// channel `$3` itself.
pub(super) const PROMOTE: &str = "WITH p AS (UPDATE {s}.jobs SET lane = 1 WHERE seq IN \
     (SELECT seq FROM {s}.jobs WHERE lane = 0 AND run_at <= $1 FOR UPDATE SKIP LOCKED) \
     RETURNING seq) UPDATE {s}.changes SET work = work + 1 WHERE stripe = $2 \
     AND EXISTS (SELECT FROM p) RETURNING pg_notify($3, '')";

/// The body of [`CLAIMABLE_QUEUES`], for the statements that include it.
macro_rules! claimable_queues {
    () => {
        "SELECT c.queue, c.waiting::bigint AS waiting, c.running::bigint AS running, \
         coalesce(q.paused, false) AS paused, coalesce(q.max_running, 0) AS max_running FROM \
         (SELECT queue, sum(jobs) FILTER (WHERE state IN ('pending', 'failed')) AS waiting, \
         coalesce(sum(jobs) FILTER (WHERE state = 'processing'), 0) AS running \
         FROM {s}.counts GROUP BY queue) c LEFT JOIN {s}.queues q ON q.name = c.queue"
    };
}

/// Per queue with jobs: waiting (pending or failed), running, and its settings
/// (`rows::claimable_queues` reads the rows).
pub(super) const CLAIMABLE_QUEUES: &str = claimable_queues!();

/// Locks the settings of limited queues a claim takes from (in name order), so claims of
/// one limited queue follow each other, each seeing what the one before committed.
pub(super) const LOCK_LIMITED: &str = "SELECT name, paused, max_running FROM {s}.queues \
     WHERE name = ANY($1) ORDER BY name FOR UPDATE";

/// Running jobs per queue, read after [`LOCK_LIMITED`].
pub(super) const RUNNING_IN: &str = "SELECT queue, coalesce(sum(jobs), 0)::bigint FROM \
     {s}.counts WHERE queue = ANY($1) AND state = 'processing' GROUP BY queue";

/// For each queue `$1[i]`, its first `$2[i]` due ready jobs in claim order that no other
/// transaction holds, locked; `$3` is now. `J` is filled in by the caller.
///
/// `run_at + 0`, not `run_at`: the due condition must not be one `jobs_ready_at` can serve.
/// Where the table's statistics are missing or old (a new queue, a burst of jobs before
/// autovacuum's next `ANALYZE`), the planner takes `queue = $1` for rare, reads every due job
/// through `jobs_ready_at` and sorts them, at each claim: a drain of n jobs read n²/2 rows.
/// The claim-order index `jobs_ready` stops at the first jobs it needs, whatever the
/// statistics say.
pub(super) const PICK_READY: &str = "SELECT j.* FROM unnest($1::text[], $2::bigint[]) AS \
     q(name, room) CROSS JOIN LATERAL (SELECT J FROM {s}.jobs WHERE lane = 1 AND \
     queue = q.name AND run_at + 0 <= $3 ORDER BY priority DESC, run_at, seq LIMIT q.room \
     FOR UPDATE SKIP LOCKED) j";

/// [`PICK_READY`] for one queue: its first `$2` due ready jobs (`$1` the queue, `$3` now).
pub(super) const PICK_READY_IN: &str = "SELECT J FROM {s}.jobs WHERE lane = 1 AND \
     queue = $1 AND run_at + 0 <= $3 ORDER BY priority DESC, run_at, seq LIMIT $2 \
     FOR UPDATE SKIP LOCKED";

/// After `SELECT J FROM {s}.jobs`: the job that holds a unique key.
pub(super) const UNIQUE_HOLDER: &str = "WHERE unique_key = $1 AND state IN \
     ('pending', 'processing', 'failed')";

/// After `SELECT J FROM {s}.jobs`: the blocked jobs waiting for job `$1`, locked.
pub(super) const BLOCKED_DEPENDENTS: &str = "WHERE seq IN (SELECT job_seq FROM \
     {s}.dependencies WHERE after_seq = $1) AND blocked ORDER BY seq FOR UPDATE";

/// Of the jobs `$1`, those that other jobs wait for.
pub(super) const HAVE_DEPENDENTS: &str =
    "SELECT DISTINCT after_seq FROM {s}.dependencies WHERE after_seq = ANY($1)";

/// The states of the jobs with these ids, locked against changes until the transaction ends
/// (an enqueue after them then sees the state they end in).
pub(super) const STATES_FOR_SHARE: &str =
    "SELECT id, state FROM {s}.jobs WHERE id = ANY($1) ORDER BY seq FOR SHARE";

/// The ids and states of the jobs the job `$1` is linked to as its dependencies.
pub(super) const LINKED_STATES: &str = "SELECT j.id, j.state FROM {s}.dependencies d \
     JOIN {s}.jobs j ON j.seq = d.after_seq WHERE d.job_seq = $1 ORDER BY j.seq FOR SHARE OF j";

/// The states of the jobs with these ids.
pub(super) const STATES: &str = "SELECT id, state FROM {s}.jobs WHERE id = ANY($1)";

/// After `SELECT J FROM {s}.jobs`: processing jobs whose lease ran out (those a settlement
/// holds right now are left to it).
pub(super) const EXPIRED: &str = "WHERE state = 'processing' AND lease_expires_at <= $1 \
     ORDER BY lease_expires_at, seq FOR UPDATE SKIP LOCKED";

/// After `SELECT J FROM {s}.jobs`: a worker's processing jobs, found among all the running
/// ones (`jobs_lease_expiry`; schema version 3).
pub(super) const OF_WORKER: &str = "WHERE state = 'processing' AND lease_worker = $1 \
     ORDER BY lease_expires_at, seq FOR UPDATE SKIP LOCKED";

/// After `SELECT J FROM {s}.jobs`: a page of the jobs, of one state (`$1`) and/or one queue
/// (`$2`) when asked, `LIMIT $3 OFFSET $4`.
pub(super) fn page(state: bool, queue: bool, newest_first: bool) -> String {
    let filter = match (state, queue) {
        (false, false) => "WHERE $1::text IS NULL AND $2::text IS NULL",
        (true, false) => "WHERE state = $1 AND $2::text IS NULL",
        (false, true) => "WHERE queue = $2 AND $1::text IS NULL",
        (true, true) => "WHERE queue = $2 AND state = $1",
    };
    let order = if newest_first { " DESC" } else { "" };
    format!("{filter} ORDER BY seq{order} LIMIT $3 OFFSET $4")
}

/// After `SELECT J FROM {s}.jobs`: every dead job, locked.
pub(super) const DEAD: &str = "WHERE state = 'dead' ORDER BY seq FOR UPDATE";

/// Deletes the completed jobs that finished before `$1` (their attempts go by trigger, their
/// output and edges by cascade); returns each one's queue.
pub(super) const PURGE: &str = "DELETE FROM {s}.jobs WHERE seq IN (SELECT seq \
     FROM {s}.jobs WHERE state = 'completed' AND coalesce(finished_at, updated_at) < $1 \
     FOR UPDATE SKIP LOCKED) RETURNING queue";

/// The earliest due time after `$1` of a job waiting to run.
pub(super) const NEXT_DUE: &str = "SELECT least(\
     (SELECT min(run_at) FROM {s}.jobs WHERE lane = 0 AND run_at > $1), \
     (SELECT min(run_at) FROM {s}.jobs WHERE lane = 1 AND run_at > $1))";

/// The output of a job's last finished attempt.
pub(super) const LAST_OUTPUT: &str =
    "SELECT output FROM {s}.attempts WHERE job_seq = $1 ORDER BY id DESC LIMIT 1";

/// A job's finished attempts (columns of [`super::rows::ATTEMPT_COLUMNS`]).
pub(super) const ATTEMPTS_OF: &str = "WHERE job_seq = $1 ORDER BY id";

/// How many finished attempts a job has.
pub(super) const FINISHED_COUNT: &str = "SELECT count(*) FROM {s}.attempts WHERE job_seq = $1";

/// Jobs per queue and state.
pub(super) const COUNTS: &str = "SELECT queue, state, sum(jobs)::bigint FROM {s}.counts \
     GROUP BY queue, state HAVING sum(jobs) <> 0";

/// The (queue, state) pairs whose stored count is not the number of their jobs, and by how
/// much it is off.
pub(super) const COUNTS_OUT_OF_STEP: &str = "SELECT queue, state, sum(n)::bigint FROM ( \
     SELECT queue, state, jobs AS n FROM {s}.counts UNION ALL \
     SELECT queue, state, -count(*) FROM {s}.jobs GROUP BY queue, state) t \
     GROUP BY queue, state HAVING sum(n) <> 0 ORDER BY queue, state";

/// The settings of every queue that has any.
pub(super) const QUEUE_SETTINGS: &str = "SELECT name, paused, max_running FROM {s}.queues";

/// The attempts that finished at or after `$1`, with their job's queue, oldest first.
pub(super) const ATTEMPTS_SINCE: &str = "SELECT j.queue, j.id, a.number, a.worker, a.started_at, \
     a.finished_at, a.outcome, a.exit_code, a.signal, a.error, NULL::text, a.due_at \
     FROM {s}.attempts a JOIN {s}.jobs j ON j.seq = a.job_seq WHERE a.finished_at >= $1 \
     ORDER BY a.finished_at, a.id";

/// The jobs that ended dead or cancelled at or after `$1`.
pub(super) const ENDED_SINCE: &str = "SELECT queue, state FROM {s}.jobs \
     WHERE state IN ('dead', 'cancelled') AND coalesce(finished_at, updated_at) >= $1";

/// Where a running attempt's recorded output ends.
pub(super) const LIVE_END: &str = "SELECT max(upto) FROM {s}.live_output WHERE job_seq = $1";

/// A running attempt's recorded chunks that end after an offset, in order.
pub(super) const LIVE_SINCE: &str = "SELECT upto, output FROM {s}.live_output \
     WHERE job_seq = $1 AND upto > $2 ORDER BY upto";

/// Drops the chunks that end at or before an offset.
pub(super) const LIVE_DROP: &str = "DELETE FROM {s}.live_output WHERE job_seq = $1 AND upto <= $2";

/// Every chunk of the attempts that ended.
pub(super) const LIVE_END_ATTEMPTS: &str = "DELETE FROM {s}.live_output WHERE job_seq = ANY($1)";

/// A running attempt's first chunk that ends after an offset.
pub(super) const LIVE_FIRST: &str = "SELECT upto, output FROM {s}.live_output \
     WHERE job_seq = $1 AND upto > $2 ORDER BY upto LIMIT 1";

/// The store's version from the change counter's stripes: the changes that may give a worker
/// something to do (`work`) in the high 32 bits, all changes (`n`) in the low 32, each modulo
/// its width (a version only has to differ from the one before; `work_part` reads the high
/// half).
macro_rules! version_of_changes {
    () => {
        "((coalesce(sum(work), 0) % 2147483648) * 4294967296 \
         + coalesce(sum(n), 0) % 4294967296)::bigint FROM {s}.changes"
    };
}

/// The store's version (see `version_of_changes`).
pub(super) const VERSION: &str = concat!("SELECT ", version_of_changes!());

/// The body of [`VERSION_AND_WORKER`], for the statements that include it.
macro_rules! version_and_worker {
    () => {
        concat!(
            "SELECT (SELECT ",
            version_of_changes!(),
            ") AS version, (SELECT info::text FROM {s}.workers WHERE id = $1) AS info"
        )
    };
}

/// [`VERSION`], and the registration of worker `$1` (`NULL`: none), in one statement.
pub(super) const VERSION_AND_WORKER: &str = version_and_worker!();

/// [`VERSION_AND_WORKER`] and [`CLAIMABLE_QUEUES`] in one statement, for a worker's turn
/// that asks both: a row per queue with jobs, each starting with the version and
/// registration; one row of those and no queue (`NULL`s) when no queue has jobs. One
/// statement less in every turn of a polling worker: each one the server runs costs it a
/// flush of its answer, which is most of what a small statement costs it.
pub(super) const VERSION_WORKER_AND_QUEUES: &str = concat!(
    "SELECT p.version, p.info, c.* FROM (",
    version_and_worker!(),
    ") p LEFT JOIN (",
    claimable_queues!(),
    ") c ON true"
);

/// The part of a version that only changes that may give a worker something to do move.
pub(super) fn work_part(version: u64) -> u64 {
    version >> 32
}

/// What every transaction that changed something runs last: adds its count changes (`$1`
/// queues, `$2` states, `$4` deltas), one change to stripe `$3` (and `$6`, 0 or 1, to its
/// count of changes that may give a worker something to do), and notifies channel `$5`
/// (delivered when the transaction commits). `rows::INSERT_JOB_AND_FINISH` does the
/// same for the one job it inserts, and must follow any change here. The change counter's row is
/// locked first, then the count rows in (queue, state) order: every writer locks in the same
/// order.
pub(super) const FINISH: &str = "WITH c AS (INSERT INTO {s}.counts (queue, state, stripe, \
     jobs) SELECT t.q, t.st, $3, t.d FROM unnest($1::text[], $2::text[], $4::bigint[]) AS \
     t(q, st, d) ON CONFLICT (queue, state, stripe) DO UPDATE SET jobs = \
     {s}.counts.jobs + EXCLUDED.jobs), b AS (UPDATE {s}.changes SET n = n + 1, \
     work = work + $6 WHERE stripe = $3 RETURNING n) SELECT pg_notify($5, '') FROM b";
