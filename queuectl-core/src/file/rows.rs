//! Jobs and attempts as rows, and the write transaction that keeps the counters in step.
//!
//! The rules of [`crate::rules`] change `Job` values; this module reads them from rows and
//! writes back exactly the columns a rule changed, so each transition touches only the indexes
//! it must.

use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Params, Row, Transaction, params};

use std::collections::HashMap;

use crate::config::Config;
use crate::error::StorageError;
use crate::job::{Attempt, Job, JobId, JobState, Lease, Timestamp};
use crate::rules::{self, Dependency};
use crate::storage::{Activity, FinishedAttempt, OutputChunk, QueueInfo, StateCounts, WorkerInfo};

/// The columns of a job, in the order [`job_from_row`] reads them.
pub(super) const JOB_COLUMNS: &str = "seq, id, command, state, attempts, max_retries, \
     created_at, updated_at, priority, run_at, timeout_us, last_error, exit_code, started_at, \
     finished_at, lease_worker, lease_token, lease_expires_at, runs, queue, unique_key, \
     after_ids, blocked";

pub(super) const ATTEMPT_COLUMNS: &str =
    "number, worker, started_at, finished_at, outcome, exit_code, signal, error, output, due_at";

/// An error inside a transaction: the database failed, or the operation was refused.
#[derive(Debug)]
pub(crate) enum TxError {
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
pub(crate) type TxResult<T> = std::result::Result<T, TxError>;

// ----- values -----

/// A timestamp as stored: whole microseconds since the Unix epoch.
pub(crate) fn micros(at: Timestamp) -> i64 {
    // Every representable `Timestamp` (years -9999 to 9999) fits in i64 microseconds.
    at.unix_timestamp_nanos().div_euclid(1_000) as i64
}

/// A stored timestamp.
pub(crate) fn timestamp(us: i64) -> Result<Timestamp, String> {
    Timestamp::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|e| format!("timestamp {us} out of range: {e}"))
}

/// A duration as stored: whole microseconds, saturating (no job runs for 292,000 years).
fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Rounds a job's times down to what the database keeps (microseconds), so that what an
/// operation returns is exactly what a later read returns.
pub(crate) fn normalize(job: &mut Job) {
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
pub(crate) fn normalize_attempt(attempt: &mut Attempt) {
    fn round(at: Timestamp) -> Timestamp {
        timestamp(micros(at)).expect("a rounded-down timestamp is representable")
    }
    attempt.started_at = round(attempt.started_at);
    attempt.finished_at = attempt.finished_at.map(round);
    attempt.due_at = attempt.due_at.map(round);
}

/// Where a job waiting to run waits (the `lane` column): 1 ready, 0 scheduled, `None`
/// otherwise.
fn lane(job: &Job, now: Timestamp) -> Option<i64> {
    job.waits_to_run()
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
        queue: row.get(19)?,
        unique_key: row.get(20)?,
        after: match row.get::<_, Option<String>>(21)? {
            Some(json) => serde_json::from_str(&json).map_err(|e| conversion(21, e.to_string()))?,
            None => Vec::new(),
        },
        blocked: row.get(22)?,
    })
}

fn attempt_from_row(row: &Row) -> rusqlite::Result<Attempt> {
    attempt_at(row, 0)
}

/// Reads an attempt from the columns [`ATTEMPT_COLUMNS`] names, starting at column `first`.
fn attempt_at(row: &Row, first: usize) -> rusqlite::Result<Attempt> {
    Ok(Attempt {
        number: row.get(first)?,
        worker: row.get(first + 1)?,
        started_at: time_at(row, first + 2)?,
        finished_at: opt_time_at(row, first + 3)?,
        outcome: parsed(row, first + 4)?,
        exit_code: row.get(first + 5)?,
        signal: row.get(first + 6)?,
        error: row.get(first + 7)?,
        output: row.get(first + 8)?,
        due_at: opt_time_at(row, first + 9)?,
    })
}

/// What happened at or after `since` ([`crate::Storage::activity`]).
pub(super) fn activity(conn: &Connection, since: Timestamp) -> TxResult<Activity> {
    let since = micros(since);
    let attempts = conn
        .prepare_cached(&super::queries::attempts_since())?
        .query_map([since], |row| {
            Ok(FinishedAttempt {
                queue: row.get(0)?,
                job: parsed(row, 1)?,
                attempt: attempt_at(row, 2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let ended = conn
        .prepare_cached(super::queries::ENDED_SINCE)?
        .query_map([since], |row| {
            Ok((row.get::<_, String>(0)?, parsed(row, 1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Activity { attempts, ended })
}

fn opt_micros(at: Option<Timestamp>) -> Value {
    at.map_or(Value::Null, |at| Value::Integer(micros(at)))
}

fn opt_text(text: &Option<String>) -> Value {
    text.clone().map_or(Value::Null, Value::Text)
}

/// Where `lane` is in [`columns`].
const LANE: usize = 23;

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
        ("queue", Value::Text(job.queue.clone())),
        ("unique_key", opt_text(&job.unique_key)),
        (
            "after_ids",
            if job.after.is_empty() {
                Value::Null
            } else {
                Value::Text(serde_json::to_string(&job.after).expect("ids serialise"))
            },
        ),
        ("blocked", Value::Integer(job.blocked.into())),
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

/// How many committed transactions may have given a worker something to do (0 when none
/// has yet), as `meta` holds it under `work`: the high half of the store's version.
pub(super) const WORK_COUNT: &str = "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'work'";

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

/// Every row of `counts`: queue, state, jobs.
pub(super) fn counts(conn: &Connection) -> TxResult<Vec<(String, JobState, usize)>> {
    let mut statement = conn.prepare_cached(super::queries::COUNTS)?;
    let rows = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                parsed::<JobState>(row, 1)?,
                usize::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Queue name → (paused, limit), for the queues that have settings.
pub(super) fn queue_settings(conn: &Connection) -> TxResult<HashMap<String, (bool, u32)>> {
    let mut statement = conn.prepare_cached(super::queries::QUEUE_SETTINGS)?;
    let rows = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, (row.get(1)?, row.get(2)?)))
        })?
        .collect::<rusqlite::Result<HashMap<_, _>>>()?;
    Ok(rows)
}

/// Every queue that has jobs or settings, by name.
pub(super) fn queues(conn: &Connection) -> TxResult<Vec<QueueInfo>> {
    Ok(queue_infos(&queue_settings(conn)?, counts(conn)?))
}

/// Every queue that has settings or jobs, by name, from the settings of those that have any
/// and the jobs per queue and state (rows of a queue and state may repeat: they add up).
pub(crate) fn queue_infos(
    settings: &HashMap<String, (bool, u32)>,
    counts: Vec<(String, JobState, usize)>,
) -> Vec<QueueInfo> {
    let mut queues: std::collections::BTreeMap<String, QueueInfo> = Default::default();
    let info = |name: &str| {
        let (paused, limit) = settings.get(name).copied().unwrap_or_default();
        QueueInfo {
            name: name.to_owned(),
            paused,
            limit,
            counts: StateCounts::default(),
        }
    };
    for name in settings.keys() {
        queues.insert(name.clone(), info(name));
    }
    for (queue, state, jobs) in counts {
        if jobs > 0 {
            let entry = queues.entry(queue.clone()).or_insert_with(|| info(&queue));
            *entry.counts.get_mut(state) += jobs;
        }
    }
    queues.into_values().collect()
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
    /// Change of each queue's count of jobs in each state not yet written.
    counts: HashMap<(String, JobState), i64>,
    /// Whether what this transaction changes gives no worker anything to do
    /// ([`Tx::give_no_work`]).
    quiet: bool,
    /// The connection's count of changed rows when the transaction began.
    changes_before: u64,
}

impl<'c> std::ops::Deref for Tx<'c> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.tx
    }
}

impl<'c> Tx<'c> {
    pub(super) fn new(tx: Transaction<'c>) -> Self {
        let changes_before = tx.total_changes();
        Self {
            tx,
            counts: HashMap::new(),
            quiet: false,
            changes_before,
        }
    }

    /// Announces this transaction's changes as giving no worker anything to do (what claims,
    /// lease extensions, live output and worker registrations change), unless it leaves a job
    /// waiting to run (`Tx::write_changes` notes that: a retry, a job handed back, a dependent
    /// that may now run) or [`Tx::give_work`] is called. Idle workers wait for work only
    /// (`FileStorage::wait_for_work`).
    pub(super) fn give_no_work(&mut self) {
        self.quiet = true;
    }

    /// Announces this transaction's changes as ones that may give a worker something to do
    /// (the default).
    pub(super) fn give_work(&mut self) {
        self.quiet = false;
    }

    fn count(&mut self, queue: &str, state: JobState, delta: i64) {
        *self.counts.entry((queue.to_owned(), state)).or_default() += delta;
    }

    /// Writes the counters, counts the transaction as work in the stored work count
    /// ([`WORK_COUNT`]) when it changed something and was not quiet ([`Tx::give_no_work`]),
    /// and commits. Returns whether it was quiet.
    pub(super) fn commit(mut self) -> rusqlite::Result<bool> {
        self.flush_counts()?;
        if !self.quiet && self.tx.total_changes() != self.changes_before {
            self.tx
                .prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('work', '1') ON CONFLICT (key) \
                     DO UPDATE SET value = CAST(value AS INTEGER) + 1",
                )?
                .execute([])?;
        }
        self.tx.commit()?;
        Ok(self.quiet)
    }

    /// Writes the count changes made so far, so that reads later in the transaction (a claim
    /// after settlements) see them.
    pub(super) fn flush_counts(&mut self) -> rusqlite::Result<()> {
        for ((queue, state), delta) in self.counts.drain() {
            if delta == 0 {
                continue;
            }
            let args = params![queue, state.as_str(), delta];
            let updated = self
                .tx
                .prepare_cached(
                    "UPDATE counts SET jobs = jobs + ?3 WHERE queue = ?1 AND state = ?2",
                )?
                .execute(args)?;
            if updated == 0 {
                // The first job of its queue in this state (a negative count fails the CHECK).
                self.tx
                    .prepare_cached("INSERT INTO counts (queue, state, jobs) VALUES (?1, ?2, ?3)")?
                    .execute(args)?;
            }
        }
        Ok(())
    }

    /// Inserts a new job (`job.seq` is set to its row id). A job with the same id is
    /// [`StorageError::AlreadyExists`].
    pub(super) fn insert_job(&mut self, job: &mut Job, now: Timestamp) -> TxResult<()> {
        normalize(job);
        let values = columns(job, now);
        let mut statement = self.tx.prepare_cached(
            "INSERT INTO jobs (id, command, state, attempts, max_retries, created_at, \
             updated_at, priority, run_at, timeout_us, last_error, exit_code, started_at, \
             finished_at, lease_worker, lease_token, lease_expires_at, runs, queue, unique_key, \
             after_ids, blocked, lane) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, \
             ?17, ?18, ?19, ?20, ?21, ?22, ?23) ON CONFLICT (id) DO NOTHING",
        )?;
        let inserted = statement.execute(rusqlite::params_from_iter(
            values[1..].iter().map(|(_, v)| v),
        ))?;
        drop(statement);
        if inserted == 0 {
            return Err(StorageError::AlreadyExists { id: job.id.clone() }.into());
        }
        job.seq = self.tx.last_insert_rowid() as u64;
        self.count(&job.queue, job.state, 1);
        for after in &job.after {
            self.tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO dependencies (after_seq, job_seq) \
                     SELECT seq, ?2 FROM jobs WHERE id = ?1",
                )?
                .execute(params![after.as_str(), job.seq as i64])?;
        }
        Ok(())
    }

    /// The states of a stored job's dependencies, through its links (`dependencies`): a
    /// dependency no longer linked (purged after it completed) is `None`, even if a new job
    /// has taken its id since.
    pub(super) fn dependency_states(&self, job: &Job) -> TxResult<Vec<Dependency>> {
        if job.after.is_empty() {
            return Ok(Vec::new());
        }
        let mut statement = self.prepare_cached(super::queries::LINKED_STATES)?;
        let linked = statement
            .query_map([job.seq as i64], |row| {
                Ok((row.get::<_, String>(0)?, parsed::<JobState>(row, 1)?))
            })?
            .collect::<rusqlite::Result<HashMap<_, _>>>()?;
        Ok(job
            .after
            .iter()
            .map(|id| (id.clone(), linked.get(id.as_str()).copied()))
            .collect())
    }

    /// Writes the columns in which `new` differs from `old` (the same job before a rule ran);
    /// when it finished, the jobs waiting for it follow ([`rules::propagate`]).
    pub(super) fn update_job(&mut self, old: &Job, new: &mut Job, now: Timestamp) -> TxResult<()> {
        self.write_changes(old, new, now)?;
        if rules::finishes(old, new) {
            let finished = new.clone();
            rules::propagate(&mut Propagation { tx: self, now }, &finished, false, now)?;
        }
        Ok(())
    }

    /// [`Tx::update_job`] without propagation.
    fn write_changes(&mut self, old: &Job, new: &mut Job, now: Timestamp) -> TxResult<()> {
        normalize(new);
        debug_assert_eq!((old.seq, &old.id), (new.seq, &new.id));
        let before = columns(old, now);
        let after = columns(new, now);
        let lane_may_change =
            old.state != new.state || old.run_at != new.run_at || old.blocked != new.blocked;
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
            self.count(&old.queue, old.state, -1);
            self.count(&new.queue, new.state, 1);
        }
        if new.waits_to_run() {
            self.give_work();
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
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
            attempt.due_at.map(micros),
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

    /// Deletes the completed jobs whose `seq` the query `selected` (with its arguments)
    /// returns, with their attempts and dependency edges (a job waiting for one counts it as
    /// completed). Returns how many.
    pub(super) fn delete_completed(
        &mut self,
        selected: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> TxResult<usize> {
        let per_queue =
            format!("SELECT queue, count(*) FROM jobs WHERE seq IN ({selected}) GROUP BY queue");
        let per_queue = self
            .tx
            .prepare_cached(&per_queue)?
            .query_map(args, |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for statement in [
            "DELETE FROM attempts WHERE job_seq IN ({selected})",
            "DELETE FROM dependencies WHERE job_seq IN ({selected})",
            "DELETE FROM dependencies WHERE after_seq IN ({selected})",
        ] {
            let sql = statement.replace("{selected}", selected);
            self.tx.prepare_cached(&sql)?.execute(args)?;
        }
        let jobs = format!("DELETE FROM jobs WHERE seq IN ({selected})");
        let deleted = self.tx.prepare_cached(&jobs)?.execute(args)?;
        for (queue, count) in per_queue {
            self.count(&queue, JobState::Completed, -count);
        }
        Ok(deleted)
    }

    /// Deletes one job, its attempts and its dependency edges; the jobs blocked waiting for it
    /// are cancelled at `now` (it can no longer complete).
    pub(super) fn delete_job(&mut self, job: &Job, now: Timestamp) -> TxResult<()> {
        rules::propagate(&mut Propagation { tx: self, now }, job, true, now)?;
        let seq = job.seq as i64;
        for statement in [
            "DELETE FROM attempts WHERE job_seq = ?1",
            "DELETE FROM dependencies WHERE job_seq = ?1",
            "DELETE FROM dependencies WHERE after_seq = ?1",
            "DELETE FROM jobs WHERE seq = ?1",
        ] {
            self.tx.prepare_cached(statement)?.execute([seq])?;
        }
        self.count(&job.queue, job.state, -1);
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

    /// Stores a queue's settings (the defaults: none stored).
    pub(super) fn put_queue(&mut self, name: &str, paused: bool, limit: u32) -> TxResult<()> {
        if !paused && limit == 0 {
            self.tx
                .prepare_cached("DELETE FROM queues WHERE name = ?1")?
                .execute([name])?;
        } else {
            self.tx
                .prepare_cached(
                    "INSERT INTO queues (name, paused, max_running) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, \
                     max_running = excluded.max_running",
                )?
                .execute(params![name, paused, limit])?;
        }
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

/// The state of the job `id`, if it is in the store.
pub(super) fn state_of(conn: &Connection, id: &JobId) -> TxResult<Option<JobState>> {
    let state = conn
        .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
        .query_row([id.as_str()], |row| row.get::<_, String>(0))
        .optional()?;
    state
        .map(|s| {
            s.parse()
                .map_err(|e: crate::job::InvalidJob| TxError::Db(conversion(0, e.to_string())))
        })
        .transpose()
}

/// A transaction seen as the graph [`rules::propagate`] walks.
struct Propagation<'t, 'c> {
    tx: &'t mut Tx<'c>,
    now: Timestamp,
}

impl rules::Dependents for Propagation<'_, '_> {
    type Error = TxError;

    fn blocked_dependents(&mut self, seq: u64) -> TxResult<Vec<Job>> {
        select_jobs(self.tx, super::queries::BLOCKED_DEPENDENTS, [seq as i64])
    }

    fn dependencies(&mut self, job: &Job) -> TxResult<Vec<Dependency>> {
        self.tx.dependency_states(job)
    }

    fn write(&mut self, old: &Job, mut new: Job) -> TxResult<()> {
        self.tx.write_changes(old, &mut new, self.now)
    }
}

crate::ops::store_read_by_module_fns!(&Connection, TxError);

impl crate::ops::StoreTx for Tx<'_> {
    type Error = TxError;

    fn locked_jobs(&mut self, ids: &[JobId]) -> TxResult<HashMap<JobId, Job>> {
        let mut jobs = HashMap::with_capacity(ids.len());
        for id in ids {
            if let Some(job) = job_by_id(self, id)? {
                jobs.insert(id.clone(), job);
            }
        }
        Ok(jobs)
    }

    fn job(&mut self, id: &JobId) -> TxResult<Option<Job>> {
        job_by_id(self, id)
    }

    fn last_output(&mut self, seq: u64) -> TxResult<Option<String>> {
        last_output(self, seq)
    }

    fn unique_holder(&mut self, key: &str) -> TxResult<Option<Job>> {
        Ok(select_jobs(self, super::queries::UNIQUE_HOLDER, [key])?.pop())
    }

    fn dependency_states(&mut self, job: &Job) -> TxResult<Vec<Dependency>> {
        Tx::dependency_states(self, job)
    }

    fn update_job(&mut self, old: Job, mut new: Job, now: Timestamp) -> TxResult<Job> {
        Tx::update_job(self, &old, &mut new, now)?;
        Ok(new)
    }

    fn insert_attempt(&mut self, seq: u64, mut attempt: Attempt) -> TxResult<()> {
        Tx::insert_attempt(self, seq, &mut attempt)
    }

    fn delete_job(&mut self, job: &Job, now: Timestamp) -> TxResult<()> {
        Tx::delete_job(self, job, now)
    }

    fn queues(&mut self) -> TxResult<Vec<QueueInfo>> {
        queues(self)
    }

    fn queue_settings(&mut self) -> TxResult<HashMap<String, (bool, u32)>> {
        queue_settings(self)
    }

    fn put_queue(&mut self, name: &str, paused: bool, limit: u32) -> TxResult<()> {
        Tx::put_queue(self, name, paused, limit)
    }

    fn locked_config(&mut self) -> TxResult<Config> {
        config(self)
    }

    fn set_config(&mut self, config: &Config) -> TxResult<()> {
        let json = serde_json::to_string(config).expect("settings serialise");
        self.set_meta("config", &json)
    }

    fn locked_workers(&mut self, id: Option<&str>) -> TxResult<Vec<WorkerInfo>> {
        let mut all = workers(self)?;
        all.retain(|worker| id.is_none_or(|id| worker.id == id));
        Ok(all)
    }

    fn put_worker(&mut self, worker: &WorkerInfo) -> TxResult<()> {
        Tx::put_worker(self, worker)
    }
}
