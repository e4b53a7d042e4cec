//! The statements on the hot paths, in one place so a test can check each one's query plan
//! (`EXPLAIN QUERY PLAN`: every one searches an index; none scans the jobs or sorts them).
//!
//! `INDEXED BY` pins the index where SQLite's planner, without statistics, could pick another
//! one and sort: the claim order must come from `jobs_ready` itself.

/// After `SELECT <job columns> FROM jobs`: due ready jobs in claim order.
pub(super) const PICK_READY: &str = "INDEXED BY jobs_ready \
     WHERE lane = 1 AND run_at <= ?1 ORDER BY priority DESC, run_at, seq LIMIT ?2";

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

/// After `SELECT <job columns> FROM jobs`: a page of every job, in enqueue order.
pub(super) const PAGE: &str = "ORDER BY seq LIMIT ?1 OFFSET ?2";

/// After `SELECT <job columns> FROM jobs`: a page of the jobs in one state.
pub(super) const PAGE_IN_STATE: &str = "WHERE state = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3";

/// [`PAGE`], newest first.
pub(super) const PAGE_NEWEST: &str = "ORDER BY seq DESC LIMIT ?1 OFFSET ?2";

/// [`PAGE_IN_STATE`], newest first.
pub(super) const PAGE_IN_STATE_NEWEST: &str =
    "WHERE state = ?1 ORDER BY seq DESC LIMIT ?2 OFFSET ?3";

/// After `SELECT <job columns> FROM jobs`: every dead job.
pub(super) const DEAD: &str = "WHERE state = 'dead' ORDER BY seq";

/// The jobs `dlq clear` deletes.
pub(super) const SELECT_DEAD: &str = "SELECT seq FROM jobs WHERE state = 'dead'";

/// The jobs `purge_completed` deletes.
pub(super) const SELECT_PURGEABLE: &str = "SELECT seq FROM jobs INDEXED BY jobs_completed \
     WHERE state = 'completed' AND coalesce(finished_at, updated_at) < ?1";

/// The earliest due time among scheduled jobs.
pub(super) const NEXT_SCHEDULED: &str = "SELECT min(run_at) FROM jobs WHERE lane = 0";

/// The earliest due time among ready jobs.
pub(super) const NEXT_READY: &str = "SELECT min(run_at) FROM jobs WHERE lane = 1";

/// The output of a job's last finished attempt.
pub(super) const LAST_OUTPUT: &str =
    "SELECT output FROM attempts WHERE job_seq = ?1 ORDER BY id DESC LIMIT 1";

/// After `SELECT <attempt columns> FROM attempts`: a job's finished attempts.
pub(super) const ATTEMPTS_OF: &str = "WHERE job_seq = ?1 ORDER BY id";

/// Every per-state count.
pub(super) const COUNTS: &str = "SELECT state, jobs FROM counts";

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
