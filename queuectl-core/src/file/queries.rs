//! The statements on the hot paths, in one place so a test can check each one's query plan
//! (`EXPLAIN QUERY PLAN`: every one searches an index; none scans the jobs or sorts them).
//!
//! `INDEXED BY` pins the index where SQLite's planner, without statistics, could pick another
//! one and sort: the claim order must come from `jobs_ready` itself.

/// After `SELECT <job columns> FROM jobs`: due ready jobs of one queue in claim order.
pub(super) const PICK_READY: &str = "INDEXED BY jobs_ready \
     WHERE lane = 1 AND queue = ?1 AND run_at <= ?2 ORDER BY priority DESC, run_at, seq \
     LIMIT ?3";

/// Per queue, its jobs waiting to run or running (claims look at these queues only).
pub(super) const CLAIMABLE_QUEUES: &str = "SELECT queue, \
     sum(jobs) FILTER (WHERE state IN ('pending', 'failed')), \
     sum(jobs) FILTER (WHERE state = 'processing') \
     FROM counts GROUP BY queue";

/// The settings of every queue that has any.
pub(super) const QUEUE_SETTINGS: &str = "SELECT name, paused, max_running FROM queues";

/// After `SELECT <job columns> FROM jobs`: the job that holds a unique key.
pub(super) const UNIQUE_HOLDER: &str = "INDEXED BY jobs_unique WHERE unique_key = ?1 \
     AND unique_key IS NOT NULL AND state IN ('pending', 'processing', 'failed')";

/// The ids and states of the jobs the job `?1` is linked to as its dependencies.
pub(super) const LINKED_STATES: &str = "SELECT j.id, j.state FROM dependencies d \
     JOIN jobs j ON j.seq = d.after_seq WHERE d.job_seq = ?1";

/// After `SELECT <job columns> FROM jobs`: the blocked jobs waiting for the job `?1`.
pub(super) const BLOCKED_DEPENDENTS: &str = "WHERE seq IN \
     (SELECT job_seq FROM dependencies WHERE after_seq = ?1) AND blocked = 1";

/// Scheduled jobs that became due join the ready ones.
pub(super) const PROMOTE: &str =
    "UPDATE jobs INDEXED BY jobs_scheduled SET lane = 1 WHERE lane = 0 AND run_at <= ?1";

/// After `SELECT <job columns> FROM jobs`: one job.
pub(super) const BY_ID: &str = "WHERE id = ?1";

/// After `SELECT <job columns> FROM jobs`: processing jobs whose lease ran out.
pub(super) const EXPIRED: &str = "INDEXED BY jobs_lease_expiry \
     WHERE state = 'processing' AND lease_expires_at <= ?1 ORDER BY lease_expires_at, seq";

/// After `SELECT <job columns> FROM jobs`: a worker's processing jobs.
pub(super) const OF_WORKER: &str = "INDEXED BY jobs_lease_worker \
     WHERE state = 'processing' AND lease_worker = ?1 ORDER BY lease_expires_at, seq";

/// After `SELECT <job columns> FROM jobs`: a page of the jobs, in enqueue order or newest
/// first, of one state (`?1`) and/or one queue (`?2`) when asked; `LIMIT ?3 OFFSET ?4`.
pub(super) fn page(state: bool, queue: bool, newest_first: bool) -> String {
    let filter = match (state, queue) {
        (false, false) => "",
        (true, false) => "WHERE state = ?1",
        (false, true) => "WHERE queue = ?2",
        (true, true) => "INDEXED BY jobs_queue WHERE queue = ?2 AND state = ?1",
    };
    let order = if newest_first { "DESC" } else { "" };
    format!("{filter} ORDER BY seq {order} LIMIT ?3 OFFSET ?4")
}

/// After `SELECT <job columns> FROM jobs`: every dead job.
pub(super) const DEAD: &str = "WHERE state = 'dead' ORDER BY seq";

/// The jobs `purge_completed` deletes.
pub(super) const SELECT_PURGEABLE: &str = "SELECT seq FROM jobs INDEXED BY jobs_completed \
     WHERE state = 'completed' AND coalesce(finished_at, updated_at) < ?1";

/// The earliest due time after `?1` among scheduled jobs.
pub(super) const NEXT_SCHEDULED: &str =
    "SELECT min(run_at) FROM jobs WHERE lane = 0 AND run_at > ?1";

/// The earliest due time after `?1` among ready jobs (a claim with an earlier clock may have
/// left some).
pub(super) const NEXT_READY: &str = "SELECT min(run_at) FROM jobs WHERE lane = 1 AND run_at > ?1";

/// The output of a job's last finished attempt.
pub(super) const LAST_OUTPUT: &str =
    "SELECT output FROM attempts WHERE job_seq = ?1 ORDER BY id DESC LIMIT 1";

/// After `SELECT <attempt columns> FROM attempts`: a job's finished attempts.
pub(super) const ATTEMPTS_OF: &str = "WHERE job_seq = ?1 ORDER BY id";

/// Every per-queue, per-state count.
pub(super) const COUNTS: &str = "SELECT queue, state, jobs FROM counts";

/// The attempts that finished at or after `?1`, with their job's queue, oldest first.
pub(super) fn attempts_since() -> String {
    let columns: String = super::rows::ATTEMPT_COLUMNS
        .split(", ")
        // The output stays out: statistics never need it, and it can be megabytes.
        .map(|c| {
            if c == "output" {
                "NULL".to_owned()
            } else {
                format!("a.{c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT j.queue, j.id, {columns} FROM attempts a INDEXED BY attempts_finished \
         JOIN jobs j ON j.seq = a.job_seq WHERE a.finished_at >= ?1 ORDER BY a.finished_at"
    )
}

/// The jobs that ended dead or cancelled at or after `?1`.
pub(super) const ENDED_SINCE: &str = "SELECT queue, state FROM jobs INDEXED BY jobs_state \
     WHERE state IN ('dead', 'cancelled') AND coalesce(finished_at, updated_at) >= ?1";

/// How many finished attempts a job has.
pub(super) const FINISHED_COUNT: &str = "SELECT count(*) FROM attempts WHERE job_seq = ?1";

/// Where a running attempt's recorded output ends.
pub(super) const LIVE_END: &str = "SELECT max(upto) FROM live_output WHERE job_seq = ?1";

/// A running attempt's recorded chunks that end after an offset, in order.
pub(super) const LIVE_SINCE: &str =
    "SELECT upto, output FROM live_output WHERE job_seq = ?1 AND upto > ?2 ORDER BY upto";

/// Drops the chunks that end at or before an offset.
pub(super) const LIVE_DROP: &str = "DELETE FROM live_output WHERE job_seq = ?1 AND upto <= ?2";

/// Every chunk of a job's attempt that ended.
pub(super) const LIVE_END_ATTEMPT: &str = "DELETE FROM live_output WHERE job_seq = ?1";

/// A running attempt's first chunk that ends after an offset.
pub(super) const LIVE_FIRST: &str = "SELECT upto, output FROM live_output \
     WHERE job_seq = ?1 AND upto > ?2 ORDER BY upto LIMIT 1";
