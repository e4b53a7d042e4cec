//! Jobs and attempts as rows, and the write transaction that keeps the counters in step.
//!
//! The rules of [`crate::rules`] change `Job` values; this module reads them from rows and
//! writes back exactly the columns a rule changed, so each transition touches only the indexes
//! it must.

use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Params, Row, Transaction, params};

use crate::config::Config;
use crate::error::StorageError;
use crate::job::{Attempt, Job, JobId, JobState, Lease, Timestamp};
use crate::rules;
use crate::storage::{OutputChunk, WorkerInfo};

/// The columns of a job, in the order [`job_from_row`] reads them.
pub(super) const JOB_COLUMNS: &str = "seq, id, command, state, attempts, max_retries, \
     created_at, updated_at, priority, run_at, timeout_us, last_error, exit_code, started_at, \
     finished_at, lease_worker, lease_token, lease_expires_at, runs";

const ATTEMPT_COLUMNS: &str =
    "number, worker, started_at, finished_at, outcome, exit_code, signal, error, output";

/// An error inside a transaction: the database failed, or the operation was refused.
#[derive(Debug)]
pub(super) enum TxError {
    /// From SQLite (mapped to a [`StorageError`] with the operation and the file by the caller).
    Db(rusqlite::Error),
    /// A refusal or failure that already says what it is.
    Storage(StorageError),
}

impl From<rusqlite::Error> for TxError {
    fn from(error: rusqlite::Error) -> Self {
        TxError::Db(error)
    }
}

impl From<StorageError> for TxError {
    fn from(error: StorageError) -> Self {
        TxError::Storage(error)
    }
}

/// Result inside a transaction.
pub(super) type TxResult<T> = std::result::Result<T, TxError>;

// ----- values -----

/// A timestamp as stored: whole microseconds since the Unix epoch.
pub(super) fn micros(at: Timestamp) -> i64 {
    // Every representable `Timestamp` (years -9999 to 9999) fits in i64 microseconds.
    at.unix_timestamp_nanos().div_euclid(1_000) as i64
}

/// A stored timestamp.
fn timestamp(us: i64) -> Result<Timestamp, String> {
    Timestamp::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|e| format!("timestamp {us} out of range: {e}"))
}

/// A duration as stored: whole microseconds, saturating (no job runs for 292,000 years).
fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Rounds a job's times down to what the database keeps (microseconds), so that what an
/// operation returns is exactly what a later read returns.
pub(super) fn normalize(job: &mut Job) {
    let round = |at: &mut Timestamp| {
        *at = timestamp(micros(*at)).expect("a rounded-down timestamp is representable");
    };
    round(&mut job.created_at);
    round(&mut job.updated_at);
    round(&mut job.run_at);
    for at in [&mut job.started_at, &mut job.finished_at]
        .into_iter()
        .flatten()
    {
        round(at);
    }
    if let Some(lease) = &mut job.lease {
        round(&mut lease.expires_at);
    }
    if let Some(limit) = &mut job.timeout {
        *limit = Duration::from_micros(duration_micros(*limit) as u64);
    }
}

/// Rounds an attempt's times down to microseconds (see [`normalize`]).
pub(super) fn normalize_attempt(attempt: &mut Attempt) {
    fn round(at: Timestamp) -> Timestamp {
        timestamp(micros(at)).expect("a rounded-down timestamp is representable")
    }
    attempt.started_at = round(attempt.started_at);
    attempt.finished_at = attempt.finished_at.map(round);
}

/// Where a runnable job waits (the `lane` column): 1 ready, 0 scheduled, `None` otherwise.
fn lane(job: &Job, now: Timestamp) -> Option<i64> {
    job.state
        .is_runnable()
        .then_some(if job.run_at <= now { 1 } else { 0 })
}

fn conversion(column: usize, message: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, message.into())
}

fn time_at(row: &Row, column: usize) -> rusqlite::Result<Timestamp> {
    timestamp(row.get(column)?).map_err(|m| conversion(column, m))
}

fn opt_time_at(row: &Row, column: usize) -> rusqlite::Result<Option<Timestamp>> {
    row.get::<_, Option<i64>>(column)?
        .map(|us| timestamp(us).map_err(|m| conversion(column, m)))
        .transpose()
}

fn parsed<T: std::str::FromStr>(row: &Row, column: usize) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    let text: String = row.get(column)?;
    text.parse()
        .map_err(|e: T::Err| conversion(column, e.to_string()))
}

/// Reads a job from the columns [`JOB_COLUMNS`] names.
pub(super) fn job_from_row(row: &Row) -> rusqlite::Result<Job> {
    let id: JobId = parsed(row, 1)?;
    let lease = match row.get::<_, Option<String>>(15)? {
        Some(worker) => Some(Lease {
            job_id: id.clone(),
            worker,
            token: row.get::<_, i64>(16)? as u64,
            expires_at: time_at(row, 17)?,
        }),
        None => None,
    };
    Ok(Job {
        seq: row.get::<_, i64>(0)? as u64,
        id,
        command: row.get(2)?,
        state: parsed(row, 3)?,
        attempts: row.get(4)?,
        max_retries: row.get(5)?,
        created_at: time_at(row, 6)?,
        updated_at: time_at(row, 7)?,
        priority: row.get(8)?,
        run_at: time_at(row, 9)?,
        timeout: row
            .get::<_, Option<i64>>(10)?
            .map(|us| Duration::from_micros(us.max(0) as u64)),
        last_error: row.get(11)?,
        exit_code: row.get(12)?,
        started_at: opt_time_at(row, 13)?,
        finished_at: opt_time_at(row, 14)?,
        output: None,
        lease,
        runs: row.get(18)?,
    })
}

fn attempt_from_row(row: &Row) -> rusqlite::Result<Attempt> {
    Ok(Attempt {
        number: row.get(0)?,
        worker: row.get(1)?,
        started_at: time_at(row, 2)?,
        finished_at: opt_time_at(row, 3)?,
        outcome: parsed(row, 4)?,
        exit_code: row.get(5)?,
        signal: row.get(6)?,
        error: row.get(7)?,
        output: row.get(8)?,
    })
}

fn opt_micros(at: Option<Timestamp>) -> Value {
    at.map_or(Value::Null, |at| Value::Integer(micros(at)))
}

fn opt_text(text: &Option<String>) -> Value {
    text.clone().map_or(Value::Null, Value::Text)
}

/// Where `lane` is in [`columns`].
const LANE: usize = 19;

/// Every column of `job`, in [`JOB_COLUMNS`] order, then `lane`.
fn columns(job: &Job, now: Timestamp) -> [(&'static str, Value); LANE + 1] {
    let lease = job.lease.as_ref();
    [
        ("seq", Value::Integer(job.seq as i64)),
        ("id", Value::Text(job.id.to_string())),
        ("command", Value::Text(job.command.clone())),
        ("state", Value::Text(job.state.as_str().to_owned())),
        ("attempts", Value::Integer(job.attempts.into())),
        ("max_retries", Value::Integer(job.max_retries.into())),
        ("created_at", Value::Integer(micros(job.created_at))),
        ("updated_at", Value::Integer(micros(job.updated_at))),
        ("priority", Value::Integer(job.priority.into())),
        ("run_at", Value::Integer(micros(job.run_at))),
        (
            "timeout_us",
            job.timeout
                .map_or(Value::Null, |d| Value::Integer(duration_micros(d))),
        ),
        ("last_error", opt_text(&job.last_error)),
        (
            "exit_code",
            job.exit_code
                .map_or(Value::Null, |c| Value::Integer(c.into())),
        ),
        ("started_at", opt_micros(job.started_at)),
        ("finished_at", opt_micros(job.finished_at)),
        (
            "lease_worker",
            lease.map_or(Value::Null, |l| Value::Text(l.worker.clone())),
        ),
        (
            "lease_token",
            lease.map_or(Value::Null, |l| Value::Integer(l.token as i64)),
        ),
        (
            "lease_expires_at",
            lease.map_or(Value::Null, |l| Value::Integer(micros(l.expires_at))),
        ),
        ("runs", Value::Integer(job.runs.into())),
        ("lane", lane(job, now).map_or(Value::Null, Value::Integer)),
    ]
}

// ----- reads -----

/// The jobs `SELECT <columns> FROM jobs <tail>` returns.
pub(super) fn select_jobs(conn: &Connection, tail: &str, args: impl Params) -> TxResult<Vec<Job>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs {tail}");
    let mut statement = conn.prepare_cached(&sql)?;
    let jobs = statement
        .query_map(args, job_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(jobs)
}

/// The job with this id, without its output.
pub(super) fn job_by_id(conn: &Connection, id: &JobId) -> TxResult<Option<Job>> {
    Ok(select_jobs(conn, super::queries::BY_ID, [id.as_str()])?.pop())
}

/// The job with this id, or [`StorageError::NotFound`].
pub(super) fn existing_job(conn: &Connection, id: &JobId) -> TxResult<Job> {
    job_by_id(conn, id)?.ok_or_else(|| TxError::Storage(StorageError::NotFound { id: id.clone() }))
}

/// The output of the job's last finished attempt.
pub(super) fn last_output(conn: &Connection, seq: u64) -> TxResult<Option<String>> {
    let mut statement = conn.prepare_cached(super::queries::LAST_OUTPUT)?;
    let output = statement
        .query_row([seq as i64], |row| row.get::<_, Option<String>>(0))
        .optional()?;
    Ok(output.flatten())
}

/// The job's finished attempts, oldest first.
pub(super) fn finished_attempts(conn: &Connection, seq: u64) -> TxResult<Vec<Attempt>> {
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts {}",
        super::queries::ATTEMPTS_OF
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let attempts = statement
        .query_map([seq as i64], attempt_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(attempts)
}

/// How many finished attempts the job has.
pub(super) fn finished_count(conn: &Connection, seq: u64) -> TxResult<usize> {
    let mut statement = conn.prepare_cached(super::queries::FINISHED_COUNT)?;
    let count: i64 = statement.query_row([seq as i64], |row| row.get(0))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// What the job's running attempt recorded from `offset` on, and where that starts.
pub(super) fn live_output(conn: &Connection, seq: u64, offset: u64) -> TxResult<(u64, String)> {
    let mut statement = conn.prepare_cached(super::queries::LIVE_SINCE)?;
    let mut chunks = statement.query(params![seq as i64, stored_offset(offset)])?;
    let mut start = None;
    let mut text = String::new();
    while let Some(row) = chunks.next()? {
        let upto: i64 = row.get(0)?;
        let chunk: String = row.get(1)?;
        start.get_or_insert((upto as u64).saturating_sub(chunk.len() as u64));
        text.push_str(&chunk);
    }
    let Some(start) = start else {
        return Ok((offset, text));
    };
    let (at, rest) = rules::output_from(&text, start, offset);
    let cut = text.len() - rest.len();
    text.drain(..cut);
    Ok((at, text))
}

/// An offset as stored (no output reaches 2^63 bytes).
fn stored_offset(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// A `meta` value.
pub(super) fn meta(conn: &Connection, key: &str) -> TxResult<Option<String>> {
    let mut statement = conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?;
    Ok(statement.query_row([key], |row| row.get(0)).optional()?)
}

/// The stored settings (defaults when none were stored).
pub(super) fn config(conn: &Connection) -> TxResult<Config> {
    match meta(conn, "config")? {
        None => Ok(Config::default()),
        Some(json) => serde_json::from_str(&json).map_err(|e| {
            TxError::Db(conversion(
                0,
                format!("stored settings are unreadable: {e}"),
            ))
        }),
    }
}

/// Every registered worker, by id.
pub(super) fn workers(conn: &Connection) -> TxResult<Vec<WorkerInfo>> {
    let mut statement = conn.prepare_cached("SELECT info FROM workers ORDER BY id")?;
    let rows = statement
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.iter()
        .map(|json| {
            serde_json::from_str(json).map_err(|e| {
                TxError::Db(conversion(0, format!("a stored worker is unreadable: {e}")))
            })
        })
        .collect()
}

/// Gives every free page back to the file system (`PRAGMA incremental_vacuum` frees one page
/// per row it returns, so every row is read).
pub(super) fn incremental_vacuum(conn: &Connection) -> TxResult<()> {
    let mut statement = conn.prepare_cached("PRAGMA incremental_vacuum")?;
    let mut freed = statement.query([])?;
    while freed.next()?.is_some() {}
    Ok(())
}

// ----- the write transaction -----

/// One `BEGIN IMMEDIATE` transaction: every write of a store method goes through it, so the
/// per-state counters change with the jobs they count.
pub(super) struct Tx<'c> {
    tx: Transaction<'c>,
    /// Change of each state's count (by [`JobState::index`]) not yet written.
    counts: [i64; 6],
}

impl<'c> std::ops::Deref for Tx<'c> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.tx
    }
}

impl<'c> Tx<'c> {
    pub(super) fn new(tx: Transaction<'c>) -> Self {
        Self { tx, counts: [0; 6] }
    }

    /// Writes the counters and commits.
    pub(super) fn commit(self) -> rusqlite::Result<()> {
        {
            let mut statement = self
                .tx
                .prepare_cached("UPDATE counts SET jobs = jobs + ?1 WHERE state = ?2")?;
            for state in JobState::ALL {
                let delta = self.counts[state.index()];
                if delta != 0 {
                    statement.execute(params![delta, state.as_str()])?;
                }
            }
        }
        self.tx.commit()
    }

    /// Inserts a new job (`job.seq` is set to its row id). A job with the same id is
    /// [`StorageError::AlreadyExists`].
    pub(super) fn insert_job(&mut self, job: &mut Job, now: Timestamp) -> TxResult<()> {
        normalize(job);
        let values = columns(job, now);
        let mut statement = self.tx.prepare_cached(
            "INSERT INTO jobs (id, command, state, attempts, max_retries, created_at, \
             updated_at, priority, run_at, timeout_us, last_error, exit_code, started_at, \
             finished_at, lease_worker, lease_token, lease_expires_at, runs, lane) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, \
             ?17, ?18, ?19) ON CONFLICT (id) DO NOTHING",
        )?;
        let inserted = statement.execute(rusqlite::params_from_iter(
            values[1..].iter().map(|(_, v)| v),
        ))?;
        if inserted == 0 {
            return Err(StorageError::AlreadyExists { id: job.id.clone() }.into());
        }
        job.seq = self.tx.last_insert_rowid() as u64;
        self.counts[job.state.index()] += 1;
        Ok(())
    }

    /// Writes the columns in which `new` differs from `old` (the same job before a rule ran).
    pub(super) fn update_job(&mut self, old: &Job, new: &mut Job, now: Timestamp) -> TxResult<()> {
        normalize(new);
        debug_assert_eq!((old.seq, &old.id), (new.seq, &new.id));
        let before = columns(old, now);
        let after = columns(new, now);
        let lane_may_change = old.state != new.state || old.run_at != new.run_at;
        let mut set = String::new();
        let mut args = Vec::new();
        for (i, ((name, was), (_, is))) in before.iter().zip(after).enumerate() {
            let is_lane = i == LANE;
            if (is_lane && lane_may_change) || (!is_lane && *was != is) {
                if !set.is_empty() {
                    set.push_str(", ");
                }
                args.push(is);
                set.push_str(&format!("{name} = ?{}", args.len()));
            }
        }
        if args.is_empty() {
            return Ok(());
        }
        args.push(Value::Integer(new.seq as i64));
        let sql = format!("UPDATE jobs SET {set} WHERE seq = ?{}", args.len());
        self.tx
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(args))?;
        if old.state != new.state {
            self.counts[old.state.index()] -= 1;
            self.counts[new.state.index()] += 1;
        }
        Ok(())
    }

    /// Adds a finished attempt to the job's history; the output it recorded while running
    /// goes.
    pub(super) fn insert_attempt(&mut self, seq: u64, attempt: &mut Attempt) -> TxResult<()> {
        normalize_attempt(attempt);
        self.tx
            .prepare_cached(super::queries::LIVE_END_ATTEMPT)?
            .execute([seq as i64])?;
        let sql = format!(
            "INSERT INTO attempts (job_seq, {ATTEMPT_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        );
        self.tx.prepare_cached(&sql)?.execute(params![
            seq as i64,
            attempt.number,
            attempt.worker,
            micros(attempt.started_at),
            attempt.finished_at.map(micros),
            attempt.outcome.as_str(),
            attempt.exit_code,
            attempt.signal,
            attempt.error,
            attempt.output,
        ])?;
        Ok(())
    }

    /// Appends a chunk of output to what the running attempt of job `seq` (whose lease was
    /// checked) recorded so far (`rules::append_output`).
    pub(super) fn append_output(&mut self, seq: u64, chunk: &OutputChunk) -> TxResult<()> {
        let seq = seq as i64;
        let end: Option<i64> = self
            .tx
            .prepare_cached(super::queries::LIVE_END)?
            .query_row([seq], |row| row.get(0))?;
        let Some(appended) = rules::append_output(end.map_or(0, |end| end as u64), chunk) else {
            return Ok(());
        };
        if appended.keep_from > 0 {
            let keep = stored_offset(appended.keep_from);
            self.tx
                .prepare_cached(super::queries::LIVE_DROP)?
                .execute(params![seq, keep])?;
            let first: Option<(i64, String)> = self
                .tx
                .prepare_cached(super::queries::LIVE_FIRST)?
                .query_row(params![seq, keep], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            if let Some((upto, text)) = first {
                let start = (upto as u64).saturating_sub(text.len() as u64);
                let kept = rules::keep_from(&text, start, appended.keep_from);
                if kept.len() != text.len() {
                    self.tx
                        .prepare_cached(
                            "UPDATE live_output SET output = ?3 WHERE job_seq = ?1 AND upto = ?2",
                        )?
                        .execute(params![seq, upto, kept])?;
                }
            }
        }
        self.tx
            .prepare_cached("INSERT INTO live_output (job_seq, upto, output) VALUES (?1, ?2, ?3)")?
            .execute(params![seq, stored_offset(appended.end), appended.text])?;
        Ok(())
    }

    /// Deletes the jobs, all in `state`, whose `seq` the query `selected` (with its arguments)
    /// returns, with their attempts. Returns how many.
    pub(super) fn delete_jobs(
        &mut self,
        state: JobState,
        selected: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> TxResult<usize> {
        let attempts = format!("DELETE FROM attempts WHERE job_seq IN ({selected})");
        self.tx.prepare_cached(&attempts)?.execute(args)?;
        let jobs = format!("DELETE FROM jobs WHERE seq IN ({selected})");
        let deleted = self.tx.prepare_cached(&jobs)?.execute(args)?;
        self.counts[state.index()] -= deleted as i64;
        Ok(deleted)
    }

    /// Deletes one job and its attempts.
    pub(super) fn delete_job(&mut self, job: &Job) -> TxResult<()> {
        self.tx
            .prepare_cached("DELETE FROM attempts WHERE job_seq = ?1")?
            .execute([job.seq as i64])?;
        self.tx
            .prepare_cached("DELETE FROM jobs WHERE seq = ?1")?
            .execute([job.seq as i64])?;
        self.counts[job.state.index()] -= 1;
        Ok(())
    }

    /// Sets a `meta` value.
    pub(super) fn set_meta(&mut self, key: &str, value: &str) -> TxResult<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute([key, value])?;
        Ok(())
    }

    /// Inserts or replaces a worker.
    pub(super) fn put_worker(&mut self, worker: &WorkerInfo) -> TxResult<()> {
        let json = serde_json::to_string(worker).expect("a worker serialises");
        self.tx
            .prepare_cached(
                "INSERT INTO workers (id, info) VALUES (?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET info = excluded.info",
            )?
            .execute([&worker.id, &json])?;
        Ok(())
    }
}
