//! Jobs and attempts as PostgreSQL rows, and the transactions every method runs in.
//!
//! As in the embedded store, the rules of [`crate::rules`] change `Job` values; this module
//! reads them from rows and writes back only the columns a rule changed, many jobs per
//! statement (`UPDATE … FROM unnest(…)`), so a batch costs a few round trips whatever its size.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::types::{ToSql, Type};
use postgres::{Row, Statement};

use super::link::{Answer, Link, Param, Step};
use super::{queries, schema};
use crate::config::Config;
use crate::error::StorageError;
use crate::file::rows::{micros, normalize, normalize_attempt, queue_infos, timestamp};
use crate::job::{Attempt, Job, JobId, JobState, Lease, Timestamp};
use crate::rules::{self, Dependency};
use crate::storage::{Activity, FinishedAttempt, OutputChunk, QueueInfo, WorkerInfo};

/// The columns of a job, in the order [`job_from_row`] reads them.
pub(super) const JOB_COLUMNS: &str = "seq, id, command, state, attempts, max_retries, \
     created_at, updated_at, priority, run_at, timeout_us, last_error, exit_code, started_at, \
     finished_at, lease_worker, lease_token, lease_expires_at, runs, queue, unique_key, \
     after_ids, blocked";

/// The columns of an attempt, in the order [`attempt_at`] reads them.
const ATTEMPT_COLUMNS: &str =
    "number, worker, started_at, finished_at, outcome, exit_code, signal, error, output, due_at";

/// An error inside a transaction.
#[derive(Debug)]
pub(super) enum TxError {
    /// From PostgreSQL (mapped to a [`StorageError`] with the operation by the caller).
    Db(postgres::Error),
    /// A stored value that does not decode: damage, or a schema changed by hand.
    Decode(String),
    /// A refusal or failure that already says what it is.
    Storage(StorageError),
    /// The first round trip of a handle that checks the schema with its first use
    /// ([`Db::check_schema`]) found the schema missing, at another version or unreadable,
    /// with PostgreSQL's error; nothing the transaction sent was applied. The handle creates
    /// or migrates the schema (or says why it cannot) and runs the transaction again.
    Unchecked(postgres::Error),
    /// The settings a batch was built with ([`Tx::insert_jobs`], [`Tx::insert_job_and_commit`])
    /// are no longer the stored ones, which are these: nothing was written, and the
    /// transaction runs again with them.
    Resettled(Settings),
}

impl From<postgres::Error> for TxError {
    fn from(error: postgres::Error) -> Self {
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

// ----- one transaction -----

/// The rows of each of several statements sent together, in order.
pub(super) type Answers = Vec<Vec<Row>>;

/// A statement's parameter that the statement owns, for one sent later.
pub(super) type Owned = Box<dyn ToSql + Sync + Send>;

/// A statement whose answer nobody waits for, sent with the next one somebody does.
struct Deferred {
    template: String,
    params: Vec<Owned>,
}

/// The statement a [`Db::send`] waits for.
#[derive(Clone, Copy)]
enum Last<'t, 'p> {
    Query(&'t str, &'t [Param<'p>]),
    Execute(&'t str, &'t [Param<'p>]),
    Simple(&'t str),
    Unprepared(&'t str),
    /// Not prepared, with its parameters' types ([`Step::Typed`]).
    Typed(&'t str, &'t [(Param<'p>, Type)]),
}

/// Statements on a pooled connection, with that connection's prepared statements: each
/// statement is prepared once per connection (one round trip), then only executed.
///
/// In a transaction (`Db::begin`), `BEGIN` waits to go with the first statement, and
/// statements whose answers are not needed ([`Db::defer`]: most writes) wait to go with the
/// next statement whose answer is, or with `COMMIT`: each [`Db::query`] is one round trip
/// for everything sent with it ([`Link::pipeline`]). Statements sent together are prepared
/// before any of them runs, so none may need a table another creates. Outside one, each statement is a
/// transaction of its own, for a read of one statement, which sees one snapshot anyway.
pub(super) struct Db<'a> {
    link: &'a Link,
    statements: &'a mut HashMap<String, Statement>,
    /// The schema's quoted name, put in place of `{s}`.
    schema: &'a str,
    /// The statements that open the transaction, not sent yet.
    begin: Option<String>,
    /// Whether the server answered the statements that opened the transaction.
    began: bool,
    /// Whether this is a transaction that has not ended.
    open: bool,
    deferred: Vec<Deferred>,
    /// Statements the transaction is going to run, prepared with the next ones that are.
    ahead: Vec<&'static str>,
    /// Set once the schema was found current, when the next round trip is to check it
    /// ([`Db::check_schema`]).
    check: Option<&'a AtomicBool>,
}

impl<'a> Db<'a> {
    /// A transaction, opened by `begin` (`BEGIN …`).
    pub(super) fn begin(
        link: &'a Link,
        statements: &'a mut HashMap<String, Statement>,
        schema: &'a str,
        begin: &str,
    ) -> Self {
        Self {
            link,
            statements,
            schema,
            begin: Some(begin.to_owned()),
            began: false,
            open: true,
            deferred: Vec::new(),
            ahead: Vec::new(),
            check: None,
        }
    }

    /// Statements run outside a transaction: only for a read of one statement.
    pub(super) fn single(
        link: &'a Link,
        statements: &'a mut HashMap<String, Statement>,
        schema: &'a str,
    ) -> Self {
        Self {
            link,
            statements,
            schema,
            begin: None,
            began: false,
            open: false,
            deferred: Vec::new(),
            ahead: Vec::new(),
            check: None,
        }
    }

    /// Prepares what `needed` uses that this connection has not prepared yet, all in one
    /// round trip, with the statements to prepare ahead. When nothing needed is missing, the
    /// ones ahead wait to be prepared with the next statements sent ([`Db::send`]).
    fn prepare<'t>(&mut self, needed: impl Iterator<Item = &'t str>) -> TxResult<()> {
        let mut missing = self.unprepared(needed);
        if missing.is_empty() {
            return Ok(());
        }
        for template in self.missing_ahead() {
            if !missing.contains(&template) {
                missing.push(template);
            }
        }
        let sqls: Vec<String> = missing.iter().map(|t| self.sql(t)).collect();
        for (template, statement) in missing.iter().zip(self.link.prepare_all(&sqls)?) {
            self.statements.insert((*template).to_owned(), statement);
        }
        Ok(())
    }

    /// The statements to prepare ahead that this connection has not prepared yet.
    fn missing_ahead(&mut self) -> Vec<&'static str> {
        let ahead = std::mem::take(&mut self.ahead);
        self.unprepared(ahead.into_iter())
    }

    /// Of `templates`, those this connection has not prepared, each once.
    fn unprepared<'t>(&self, templates: impl Iterator<Item = &'t str>) -> Vec<&'t str> {
        let mut missing: Vec<&str> = Vec::new();
        for template in templates {
            if !self.statements.contains_key(template) && !missing.contains(&template) {
                missing.push(template);
            }
        }
        missing
    }

    /// A template with the schema put in.
    fn sql(&self, template: &str) -> String {
        template.replace("{s}", self.schema)
    }

    /// Has the next round trip also check that the schema is there and at the version this
    /// build uses ([`schema::GUARD`], after `BEGIN`: a schema at another version aborts the
    /// transaction, so nothing sent with the check is applied), and set `checked` when it
    /// is. When it is not, or a statement could not be prepared before the check went, the
    /// round trip fails with [`TxError::Unchecked`]. This saves a handle the round trip of
    /// a check of its own before its first use.
    pub(super) fn check_schema(&mut self, checked: &'a AtomicBool) {
        self.check = Some(checked);
    }

    /// `error`, as [`TxError::Unchecked`] while the schema check is still to be sent: the
    /// error may well come from the schema (a table that is not there).
    fn unless_checking(&mut self, error: TxError) -> TxError {
        match (self.check.take(), error) {
            (Some(_), TxError::Db(e)) => self.check_failed(e),
            (_, error) => error,
        }
    }

    /// What the check, or what went before it, failing with `error` means: the check was
    /// not made when the connection was lost (the next transaction makes it); otherwise the
    /// schema may not be what this build uses, and what was prepared may be for other tables.
    fn check_failed(&mut self, error: postgres::Error) -> TxError {
        if super::is_connection_error(&error) {
            return error.into();
        }
        self.statements.clear();
        TxError::Unchecked(error)
    }

    /// Sends what waits (`BEGIN`, deferred statements, statements to prepare ahead) and then
    /// `lasts`, all in one round trip, and returns the answers to `lasts`.
    ///
    /// A query without parameters that this connection has not prepared runs unprepared,
    /// and is prepared in the same round trip for the next time: a one-shot command pays no
    /// round trip to prepare it, a long-lived handle plans it once. (One with parameters
    /// needs its preparation's answer, the parameters' types, before it can be sent.)
    fn send(&mut self, lasts: &[Last]) -> TxResult<Vec<Answer>> {
        let mut first_time: Vec<&str> = Vec::new();
        let lasts: Vec<Last> = lasts
            .iter()
            .map(|last| match *last {
                Last::Query(template, []) if !self.statements.contains_key(template) => {
                    if !first_time.contains(&template) {
                        first_time.push(template);
                    }
                    Last::Unprepared(template)
                }
                other => other,
            })
            .collect();
        let lasts = &lasts[..];
        let deferred = std::mem::take(&mut self.deferred);
        let prepared = self.prepare(deferred.iter().map(|d| d.template.as_str()).chain(
            lasts.iter().filter_map(|last| match last {
                Last::Query(template, _) | Last::Execute(template, _) => Some(*template),
                Last::Simple(_) | Last::Unprepared(_) | Last::Typed(..) => None,
            }),
        ));
        if let Err(e) = prepared {
            return Err(self.unless_checking(e));
        }
        let mut ahead: Vec<&str> = self.missing_ahead();
        for template in first_time {
            if !ahead.contains(&template) {
                ahead.push(template);
            }
        }
        let ahead_sqls: Vec<String> = ahead.iter().map(|t| self.sql(t)).collect();
        let unprepared: Vec<String> = lasts
            .iter()
            .filter_map(|last| match last {
                Last::Unprepared(template) | Last::Typed(template, _) => Some(self.sql(template)),
                _ => None,
            })
            .collect();
        let mut unprepared = unprepared.iter();
        let begin = self.begin.take();
        let check = self.check.take();
        let guard = check.map(|_| self.sql(&schema::GUARD));
        let mut steps = Vec::with_capacity(deferred.len() + lasts.len() + 2);
        if let Some(begin) = &begin {
            steps.push(Step::Simple(begin));
        }
        let guard_at = steps.len();
        if let Some(guard) = &guard {
            steps.push(Step::Unprepared(guard));
        }
        for d in &deferred {
            let params: Vec<Param> = d.params.iter().map(|p| &**p as Param).collect();
            steps.push(Step::Execute(&self.statements[&d.template], params));
        }
        let waited = steps.len();
        for last in lasts {
            steps.push(match *last {
                Last::Query(template, params) => {
                    Step::Query(&self.statements[template], params.to_vec())
                }
                Last::Execute(template, params) => {
                    Step::Execute(&self.statements[template], params.to_vec())
                }
                Last::Simple(sql) => Step::Simple(sql),
                Last::Unprepared(_) => {
                    Step::Unprepared(unprepared.next().expect("one SQL per unprepared step"))
                }
                Last::Typed(_, params) => Step::Typed(
                    unprepared.next().expect("one SQL per unprepared step"),
                    params.to_vec(),
                ),
            });
        }
        let (prepared, mut answers) = if ahead.is_empty() {
            (Ok(Vec::new()), self.link.pipeline(steps))
        } else {
            self.link.prepare_with(&ahead_sqls, steps)
        };
        if let Some(checked) = check {
            match answers.remove(guard_at) {
                Ok(Answer::Rows(rows)) if rows.len() == 1 => checked.store(true, Ordering::Release),
                // Failing, the check aborted its transaction: nothing sent with it is applied.
                Err(e) => return Err(self.check_failed(e)),
                Ok(answer) => {
                    return Err(TxError::Decode(format!(
                        "one row expected from the schema check, got {answer:?}"
                    )));
                }
            }
        }
        let mut answers = answers.into_iter().collect::<Result<Vec<_>, _>>()?;
        self.began |= begin.is_some();
        for (template, statement) in ahead.iter().zip(prepared?) {
            self.statements.insert((*template).to_owned(), statement);
        }
        // The check's answer was taken out above.
        Ok(answers.split_off(waited - usize::from(check.is_some())))
    }

    /// Runs statements one after the other and returns their rows, all in one round trip
    /// (with everything waiting to be sent).
    pub(super) fn query_all<const N: usize>(
        &mut self,
        statements: [(&str, &[Param]); N],
    ) -> TxResult<[Vec<Row>; N]> {
        self.query_many(&statements)?
            .try_into()
            .map_err(|_| TxError::Decode("an answer per statement expected".to_owned()))
    }

    /// [`Db::query_all`] for a number of statements known when it runs.
    pub(super) fn query_many(&mut self, statements: &[(&str, &[Param])]) -> TxResult<Answers> {
        let lasts: Vec<Last> = statements
            .iter()
            .map(|&(template, params)| Last::Query(template, params))
            .collect();
        self.send(&lasts)?
            .into_iter()
            .map(|answer| match answer {
                Answer::Rows(rows) => Ok(rows),
                other => Err(TxError::Decode(format!("rows expected, got {other:?}"))),
            })
            .collect()
    }

    /// Whether this connection has prepared `template`.
    fn has_prepared(&self, template: &str) -> bool {
        self.statements.contains_key(template)
    }

    /// Has `templates`, which this transaction is going to run, prepared together with the
    /// next statement (a round trip each saved on a new connection).
    pub(super) fn prepare_ahead(&mut self, templates: &[&'static str]) {
        self.ahead.extend_from_slice(templates);
    }

    /// Whether the server has answered the transaction's `BEGIN` (and what went with it).
    pub(super) fn began(&self) -> bool {
        self.began
    }

    /// Runs statements without parameters (simple protocol), with everything waiting.
    pub(super) fn batch_execute(&mut self, sql: &str) -> TxResult<()> {
        self.send(&[Last::Simple(sql)]).map(drop)
    }

    /// Runs a statement and returns its rows (with everything waiting to be sent).
    pub(super) fn query(&mut self, template: &str, params: &[Param]) -> TxResult<Vec<Row>> {
        let [rows] = self.query_all([(template, params)])?;
        Ok(rows)
    }

    /// Runs a statement and returns how many rows it changed (with everything waiting).
    pub(super) fn execute(&mut self, template: &str, params: &[Param]) -> TxResult<u64> {
        match self.send(&[Last::Execute(template, params)])?.pop() {
            Some(Answer::Count(n)) => Ok(n),
            other => Err(TxError::Decode(format!(
                "a row count expected, got {other:?}"
            ))),
        }
    }

    /// Has a statement sent with the next one whose answer is needed, or at commit. Its
    /// failure, if any, is reported there (and aborts the transaction as ever).
    pub(super) fn defer(&mut self, template: &str, params: Vec<Owned>) {
        debug_assert!(self.open, "only a transaction defers statements");
        self.deferred.push(Deferred {
            template: template.to_owned(),
            params,
        });
    }

    /// Ends the transaction, sending what waits and `COMMIT` in one round trip (nothing at
    /// all when nothing was sent).
    pub(super) fn commit(mut self) -> TxResult<()> {
        if !self.open {
            return Ok(());
        }
        self.open = false;
        if self.begin.is_some() && self.deferred.is_empty() {
            return Ok(());
        }
        self.batch_execute("COMMIT")
    }
}

impl Drop for Db<'_> {
    fn drop(&mut self) {
        // A transaction that ends without a commit (an error, a retry) is rolled back here,
        // as the `postgres` crate's transactions are. A failed rollback means a lost
        // connection, which the pool then drops: the server ends the transaction itself.
        if self.open && self.begin.is_none() {
            let _ = self.link.simple("ROLLBACK");
        }
    }
}

/// A write transaction: every write of a store method goes through it, so that the
/// per-queue counts change with the jobs they count, and the change counter (and the
/// notification that wakes waiters) with anything that changed.
pub(super) struct Tx<'a> {
    db: Db<'a>,
    /// Change of each queue's count of jobs in each state not yet written.
    counts: BTreeMap<(String, &'static str), i64>,
    /// Whether anything was written.
    changed: bool,
    /// Of jobs this transaction locked, whether other jobs wait for them
    /// ([`Tx::lock_jobs_noting_dependents`]).
    dependents: HashMap<i64, bool>,
    /// The stripe of the change counter this transaction adds to, and the channels it
    /// notifies on, when it changes anything.
    stripe: i32,
    channels: &'a Channels,
    /// Whether what this transaction changes gives no worker anything to do
    /// ([`Tx::give_no_work`]).
    quiet: bool,
}

/// The notification channels of a queue's schema. A change that may give a worker something
/// to do (a job to claim now or later, room in a limited queue, a stop request, new settings)
/// is announced on `work`, named after the schema; any other change (a job claimed or
/// finished, a lease extended, output recorded) on `quiet`. Waiters for any change listen on
/// both, workers waiting for jobs only on `work`: a busy queue does not wake every idle
/// worker each time a job finishes.
#[derive(Debug, Clone)]
pub(super) struct Channels {
    pub(super) work: String,
    pub(super) quiet: String,
}

impl Channels {
    /// The channels of `schema` (a valid schema name: lowercase ASCII letters, digits, `_`).
    pub(super) fn of(schema: &str) -> Self {
        // `~` is in no schema name, so no schema's work channel is another's quiet one. A
        // channel name has at most 63 bytes: two schemas whose names share their first 62
        // share a quiet channel, which only wakes some waiters to look again.
        Self {
            work: schema.to_owned(),
            quiet: format!("{}~", &schema[..schema.len().min(62)]),
        }
    }
}

impl<'a> std::ops::Deref for Tx<'a> {
    type Target = Db<'a>;
    fn deref(&self) -> &Db<'a> {
        &self.db
    }
}

impl<'a> std::ops::DerefMut for Tx<'a> {
    fn deref_mut(&mut self) -> &mut Db<'a> {
        &mut self.db
    }
}

impl<'a> Tx<'a> {
    /// A transaction that, when it changes anything, adds to a stripe of the change counter
    /// chosen at random and notifies one of `channels`.
    pub(super) fn new(db: Db<'a>, channels: &'a Channels) -> Self {
        Self {
            db,
            counts: BTreeMap::new(),
            changed: false,
            dependents: HashMap::new(),
            stripe: (crate::job::random_u64() % schema::STRIPES as u64) as i32,
            channels,
            quiet: false,
        }
    }

    /// Announces this transaction's changes as giving no worker anything to do (what claims,
    /// settlements, lease extensions and live output change), unless it leaves a job waiting
    /// to run (`Tx::write_changes` notes that: a retry, a dependent that may now run) or
    /// [`Tx::give_work`] is called.
    pub(super) fn give_no_work(&mut self) {
        self.quiet = true;
    }

    /// Makes due scheduled jobs ready (index bookkeeping, not counted as a change, but work:
    /// [`queries::PROMOTE`] says so itself when it promotes any), with the next statement.
    pub(super) fn promote_due(&mut self, now: Timestamp) {
        let params: Vec<Owned> = vec![
            Box::new(micros(now)),
            Box::new(self.stripe),
            Box::new(self.channels.work.clone()),
        ];
        self.db.defer(queries::PROMOTE, params);
    }

    /// Announces this transaction's changes as ones that may give a worker something to do
    /// (the default).
    pub(super) fn give_work(&mut self) {
        self.quiet = false;
    }

    /// Runs a statement that writes, noting whether it changed anything.
    pub(super) fn write(&mut self, template: &str, params: &[Param]) -> TxResult<u64> {
        let rows = self.db.execute(template, params)?;
        self.changed |= rows > 0;
        Ok(rows)
    }

    /// The change to `queue`'s count of jobs in `state` this transaction has made and not
    /// written yet (it is written at commit).
    pub(super) fn pending_count(&self, queue: &str, state: JobState) -> i64 {
        self.counts
            .get(&(queue.to_owned(), state.as_str()))
            .copied()
            .unwrap_or(0)
    }

    fn count(&mut self, queue: &str, state: JobState, delta: i64) {
        *self
            .counts
            .entry((queue.to_owned(), state.as_str()))
            .or_default() += delta;
        self.changed = true;
    }

    /// Writes the count changes and bumps the change counter when anything changed,
    /// notifying the channel, then commits. Returns whether anything changed.
    pub(super) fn commit(mut self) -> TxResult<bool> {
        if self.changed {
            let (mut queues, mut states, mut deltas) = (Vec::new(), Vec::new(), Vec::new());
            for ((queue, state), delta) in &self.counts {
                if *delta != 0 {
                    queues.push(queue.clone());
                    states.push(*state);
                    deltas.push(*delta);
                }
            }
            let channel = if self.quiet {
                &self.channels.quiet
            } else {
                &self.channels.work
            };
            let params: Vec<Owned> = vec![
                Box::new(queues),
                Box::new(states),
                Box::new(self.stripe),
                Box::new(deltas),
                Box::new(channel.clone()),
                Box::new(i64::from(!self.quiet)),
            ];
            self.db.defer(queries::FINISH, params);
        }
        self.db.commit()?;
        Ok(self.changed)
    }

    /// The jobs with these ids, locked for update, noting for each whether other jobs wait
    /// for it (in the same round trip): the lock keeps that true until the transaction
    /// ends, so finishing them needs no second look. The statements of `also` go in the same
    /// round trip, after them; their rows are returned, in order.
    pub(super) fn lock_jobs_noting_dependents<'i>(
        &mut self,
        ids: impl Iterator<Item = &'i str>,
        also: &[(&str, &[Param])],
    ) -> TxResult<(HashMap<JobId, Job>, Answers)> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT {JOB_COLUMNS} FROM {{s}}.jobs {}",
                queries::BY_IDS_FOR_UPDATE
            )
        });
        static ONE: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT {JOB_COLUMNS} FROM {{s}}.jobs {}",
                queries::BY_ID_FOR_UPDATE
            )
        });
        let ids: Vec<&str> = ids.collect();
        if ids.is_empty() {
            return Ok((HashMap::new(), self.db.query_many(also)?));
        }
        let (lock, dependents, param): (&str, &str, Param) = match ids.as_slice() {
            [id] => (ONE.as_str(), queries::HAS_DEPENDENTS_BY_ID, id),
            _ => (SQL.as_str(), queries::HAVE_DEPENDENTS_BY_IDS, &ids),
        };
        let params = [param];
        let mut statements = vec![(lock, &params[..]), (dependents, &params[..])];
        statements.extend_from_slice(also);
        let mut answers = self.db.query_many(&statements)?.into_iter();
        let (Some(locked), Some(waited_for)) = (answers.next(), answers.next()) else {
            return Err(TxError::Decode(
                "an answer per statement expected".to_owned(),
            ));
        };
        let waited_for: HashSet<i64> = waited_for
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut jobs = HashMap::with_capacity(ids.len());
        for row in &locked {
            let job = job_from_row(row)?;
            let seq = job.seq as i64;
            self.dependents.insert(seq, waited_for.contains(&seq));
            jobs.insert(job.id.clone(), job);
        }
        Ok((jobs, answers.collect()))
    }

    /// Inserts a new job (`job.seq` is set from the row). Returns `false`, inserting nothing,
    /// when a job with its id, or one holding its unique key, is in the way (committed, or
    /// committed meanwhile by a concurrent transaction this one waited for).
    pub(super) fn insert_job(&mut self, job: &mut Job, now: Timestamp) -> TxResult<bool> {
        normalize(job);
        let values = values(job, now);
        let after: Vec<&str> = job.after.iter().map(JobId::as_str).collect();
        let mut params: Vec<Param> = values.iter().map(V::param).collect();
        params.push(&after);
        let rows = self.db.query(&INSERT_JOB, &params)?;
        let Some(row) = rows.first() else {
            return Ok(false);
        };
        job.seq = row.try_get::<_, i64>(0)? as u64;
        self.count(&job.queue, job.state, 1);
        if !after.is_empty() {
            let seq = job.seq as i64;
            self.write(
                "INSERT INTO {s}.dependencies (after_seq, job_seq) SELECT seq, $2 FROM \
                 {s}.jobs WHERE id = ANY($1) ON CONFLICT DO NOTHING",
                &[&after, &seq],
            )?;
        }
        Ok(true)
    }

    /// Inserts a new job with no unique key and no dependency, built with `built_with`,
    /// and commits, in one round trip with whatever waits to be sent (`BEGIN`, the schema
    /// check): [`INSERT_JOB_AND_FINISH`], with what [`Tx::commit`] would write. Returns
    /// `false` when its id was taken, and [`TxError::Resettled`] when the stored settings
    /// are not `built_with`; either way nothing was written. Nothing may have been written
    /// earlier in the transaction (it is not counted).
    ///
    /// Not prepared on this connection, the statement runs unprepared with its parameters'
    /// types (preparing it would take a round trip of its own), and is prepared with it for
    /// the next time if `keep`.
    pub(super) fn insert_job_and_commit(
        &mut self,
        job: &mut Job,
        built_with: &Settings,
        keep: bool,
        now: Timestamp,
    ) -> TxResult<bool> {
        debug_assert!(job.unique_key.is_none() && job.after.is_empty() && !self.changed);
        normalize(job);
        let values = values(job, now);
        let after: Vec<&str> = Vec::new();
        let mut typed: Vec<(Param, Type)> = values.iter().map(|v| (v.param(), v.ty())).collect();
        typed.push((&after, Type::TEXT_ARRAY));
        typed.push((&self.stripe, Type::INT4));
        // A new job is work (`rows::INSERT_JOB_AND_FINISH` counts it as such).
        typed.push((&self.channels.work, Type::TEXT));
        typed.push((&built_with.stored, Type::TEXT));
        let params: Vec<Param> = typed.iter().map(|(param, _)| *param).collect();
        let insert: &'static str = &INSERT_JOB_AND_FINISH;
        let last = if self.db.has_prepared(insert) {
            Last::Query(insert, &params)
        } else {
            if keep {
                self.db.prepare_ahead(&[insert]);
            }
            Last::Typed(insert, &typed)
        };
        let answers = self.db.send(&[last, Last::Simple("COMMIT")]);
        // Ended once answered. After a failure, whether `COMMIT` was sent or not, the
        // transaction is rolled back when dropped (a rollback with none open only warns).
        self.db.open = answers.is_err();
        let answers = answers?;
        let Some(Answer::Rows(rows)) = answers.first() else {
            return Err(TxError::Decode("rows expected from the insert".to_owned()));
        };
        let [row] = &rows[..] else {
            return Err(TxError::Decode(format!(
                "one row expected from the insert, got {}",
                rows.len()
            )));
        };
        if let Some(seq) = row.try_get::<_, Option<i64>>(0)? {
            job.seq = seq as u64;
            return Ok(true);
        }
        let stored: Option<String> = row.try_get(2)?;
        if stored != built_with.stored {
            return Err(TxError::Resettled(Settings::from_stored(stored)?));
        }
        Ok(false)
    }

    /// Inserts new jobs without dependencies in one statement (each job's `seq` is set).
    /// When one of them was not inserted, returns the first id in batch order that was in
    /// the way (taken in the store, or earlier in the batch), with nothing to keep: the
    /// caller rolls back. `generated`: every id was generated for this batch
    /// ([`INSERT_NEW_JOBS`]).
    ///
    /// With `built_with`, the settings the jobs were built with: they are read again in the
    /// insert's round trip (not one of their own), and if they changed the insert is undone
    /// with [`TxError::Resettled`].
    pub(super) fn insert_jobs(
        &mut self,
        jobs: &mut [Job],
        generated: bool,
        built_with: Option<&Settings>,
        now: Timestamp,
    ) -> TxResult<Option<JobId>> {
        debug_assert!(jobs.iter().all(|job| job.after.is_empty()));
        for job in jobs.iter_mut() {
            normalize(job);
        }
        let rows: Vec<[V; WRITTEN.len()]> = jobs.iter().map(|job| values(job, now)).collect();
        debug_assert!(rows.iter().all(|row| {
            (0..WRITTEN.len())
                .filter(|&c| RUN_COLUMNS.contains(&WRITTEN[c].0))
                .all(|c| row[c].is_null())
        }));
        let arrays: Vec<Array> = new_job_columns()
            .map(|column| Array::of(rows.iter().map(|row| &row[column])))
            .collect();
        let params: Vec<Param> = arrays.iter().map(Array::param).collect();
        let insert: &str = if generated {
            &INSERT_NEW_JOBS
        } else {
            &INSERT_JOBS
        };
        let inserted = match built_with {
            None => self.db.query(insert, &params)?,
            Some(assumed) => {
                let [settings, inserted] = self.db.query_all([(CONFIG, &[]), (insert, &params)])?;
                let stored = settings_from(&settings)?;
                if stored.config != assumed.config {
                    return Err(TxError::Resettled(stored));
                }
                inserted
            }
        };
        let mut seqs = HashMap::with_capacity(inserted.len());
        for row in &inserted {
            seqs.insert(row.try_get::<_, String>(1)?, row.try_get::<_, i64>(0)?);
        }
        if inserted.len() != jobs.len() {
            // The first job in batch order whose id was taken: by a job stored before, or by
            // one earlier in the batch (the one the statement inserted).
            let mut seen = HashSet::new();
            let taken = jobs
                .iter()
                .find(|job| !seen.insert(job.id.as_str()) || !seqs.contains_key(job.id.as_str()));
            return match taken {
                Some(job) => Ok(Some(job.id.clone())),
                None => Err(TxError::Decode(
                    "a batch of jobs was not all inserted, and no id was taken".to_owned(),
                )),
            };
        }
        for job in jobs.iter_mut() {
            let seq = seqs
                .get(job.id.as_str())
                .ok_or_else(|| TxError::Decode(format!("job {} was not returned", job.id)))?;
            job.seq = *seq as u64;
        }
        for job in jobs.iter() {
            self.count(&job.queue, job.state, 1);
        }
        Ok(None)
    }

    /// Writes the columns in which each new job differs from its old record (the same job
    /// before a rule ran), then lets the jobs waiting for those that finished follow
    /// ([`rules::propagate`]).
    pub(super) fn update_jobs(&mut self, pairs: &mut [(Job, Job)], now: Timestamp) -> TxResult<()> {
        self.write_changes(pairs, now)?;
        let finished: Vec<i64> = pairs
            .iter()
            .filter(|(old, new)| rules::finishes(old, new))
            .map(|(_, new)| new.seq as i64)
            .collect();
        if finished.is_empty() {
            return Ok(());
        }
        // One look for all of them not known already: most jobs have no dependents.
        let mut waited_for: HashSet<i64> = HashSet::new();
        let mut unknown = Vec::new();
        for seq in finished {
            match self.dependents.get(&seq) {
                Some(true) => {
                    waited_for.insert(seq);
                }
                Some(false) => {}
                None => unknown.push(seq),
            }
        }
        if !unknown.is_empty() {
            for row in self.db.query(queries::HAVE_DEPENDENTS, &[&unknown])? {
                waited_for.insert(row.try_get(0)?);
            }
        }
        for (old, new) in pairs.iter() {
            if rules::finishes(old, new) && waited_for.contains(&(new.seq as i64)) {
                let finished = new.clone();
                rules::propagate(&mut Propagation { tx: self, now }, &finished, false, now)?;
            }
        }
        Ok(())
    }

    /// [`Tx::update_jobs`] without propagation: one statement per set of changed columns.
    fn write_changes(&mut self, pairs: &mut [(Job, Job)], now: Timestamp) -> TxResult<()> {
        let mut groups: BTreeMap<Vec<usize>, Vec<(i64, [V; WRITTEN.len()])>> = BTreeMap::new();
        for (old, new) in pairs.iter_mut() {
            normalize(new);
            storable(&mut new.last_error);
            storable(&mut new.output);
            if matches!(new.state, JobState::Pending | JobState::Failed) {
                // A job waiting to run: a worker has it to claim, now or once due.
                self.give_work();
            }
            debug_assert_eq!(
                (old.seq, &old.id, &old.after),
                (new.seq, &new.id, &new.after)
            );
            let before = values(old, now);
            let after = values(new, now);
            let lane_may_change =
                old.state != new.state || old.run_at != new.run_at || old.blocked != new.blocked;
            let changed: Vec<usize> = (0..WRITTEN.len())
                .filter(|&c| {
                    if c == LANE {
                        lane_may_change
                    } else {
                        before[c] != after[c]
                    }
                })
                .collect();
            if old.state != new.state {
                self.count(&old.queue, old.state, -1);
                self.count(&new.queue, new.state, 1);
            }
            if !changed.is_empty() {
                groups
                    .entry(changed)
                    .or_default()
                    .push((new.seq as i64, after));
            }
        }
        for (columns, mut rows) in groups {
            if rows.len() == 1 {
                // One job: one value per column (see `queries::BY_ID_FOR_UPDATE`).
                let (seq, values) = rows.pop().expect("one row");
                let set: Vec<String> = columns
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| format!("{} = ${}::{}", WRITTEN[c].0, i + 2, WRITTEN[c].1))
                    .collect();
                let sql = format!("UPDATE {{s}}.jobs SET {} WHERE seq = $1", set.join(", "));
                let mut params: Vec<Owned> = vec![Box::new(seq)];
                params.extend(columns.iter().map(|&c| values[c].clone().owned()));
                self.db.defer(&sql, params);
                self.changed = true;
                continue;
            }
            let seqs: Vec<i64> = rows.iter().map(|(seq, _)| *seq).collect();
            let arrays: Vec<Array> = columns
                .iter()
                .map(|&c| Array::of(rows.iter().map(|(_, values)| &values[c])))
                .collect();
            let sql = update_many_sql(&columns);
            // The rows are there and locked: the update changes them all.
            let mut params: Vec<Owned> = vec![Box::new(seqs)];
            params.extend(arrays.into_iter().map(Array::owned));
            self.db.defer(&sql, params);
            self.changed = true;
        }
        Ok(())
    }

    /// Adds finished attempts to their jobs' histories; what they recorded while running goes.
    pub(super) fn insert_attempts(&mut self, attempts: &mut [(u64, Attempt)]) -> TxResult<()> {
        if attempts.is_empty() {
            return Ok(());
        }
        let mut a = AttemptArrays::default();
        for (seq, attempt) in attempts.iter_mut() {
            normalize_attempt(attempt);
            storable(&mut attempt.output);
            storable(&mut attempt.error);
            a.push(*seq, attempt);
        }
        let AttemptArrays {
            seq,
            number,
            worker,
            started_at,
            finished_at,
            outcome,
            exit_code,
            signal,
            error,
            output,
            due_at,
        } = a;
        self.db.defer(
            &INSERT_ATTEMPTS,
            vec![
                Box::new(seq),
                Box::new(number),
                Box::new(worker),
                Box::new(started_at),
                Box::new(finished_at),
                Box::new(outcome),
                Box::new(exit_code),
                Box::new(signal),
                Box::new(error),
                Box::new(output),
                Box::new(due_at),
            ],
        );
        self.changed = true;
        Ok(())
    }

    /// Appends a chunk of output to what the running attempt of job `seq` (whose lease was
    /// checked) recorded so far (`rules::append_output`).
    pub(super) fn append_output(&mut self, seq: u64, chunk: &OutputChunk) -> TxResult<()> {
        let seq = seq as i64;
        let end: Option<i64> = self.db.query(queries::LIVE_END, &[&seq])?[0].try_get(0)?;
        let Some(appended) = rules::append_output(end.map_or(0, |end| end as u64), chunk) else {
            return Ok(());
        };
        if appended.keep_from > 0 {
            let keep = stored_offset(appended.keep_from);
            self.write(queries::LIVE_DROP, &[&seq, &keep])?;
            let first = self.db.query(queries::LIVE_FIRST, &[&seq, &keep])?;
            if let Some(row) = first.first() {
                let (upto, text): (i64, String) = (row.try_get(0)?, row.try_get(1)?);
                let start = (upto as u64).saturating_sub(text.len() as u64);
                let kept = rules::keep_from(&text, start, appended.keep_from);
                if kept.len() != text.len() {
                    self.write(
                        "UPDATE {s}.live_output SET output = $3 WHERE job_seq = $1 AND upto = $2",
                        &[&seq, &upto, &kept],
                    )?;
                }
            }
        }
        let end = stored_offset(appended.end);
        self.write(
            "INSERT INTO {s}.live_output (job_seq, upto, output) VALUES ($1, $2, $3)",
            &[&seq, &end, &appended.text],
        )?;
        Ok(())
    }

    /// Deletes jobs; their attempts go by trigger, their output and edges by cascade. With
    /// `cancel_at`, the jobs blocked waiting for each are cancelled then (it can no longer
    /// complete); without, they count it as completed.
    pub(super) fn delete_jobs(
        &mut self,
        jobs: &[Job],
        cancel_at: Option<Timestamp>,
    ) -> TxResult<()> {
        if let Some(now) = cancel_at {
            for job in jobs {
                rules::propagate(&mut Propagation { tx: self, now }, job, true, now)?;
            }
        }
        let seqs: Vec<i64> = jobs.iter().map(|job| job.seq as i64).collect();
        self.write("DELETE FROM {s}.jobs WHERE seq = ANY($1)", &[&seqs])?;
        for job in jobs {
            self.count(&job.queue, job.state, -1);
        }
        Ok(())
    }

    /// Deletes the completed jobs that finished before `before`. Returns how many.
    pub(super) fn purge(&mut self, before: Timestamp) -> TxResult<usize> {
        let before = micros(before);
        let queues: Vec<String> = self
            .db
            .query(queries::PURGE, &[&before])?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        for queue in &queues {
            self.count(queue, JobState::Completed, -1);
        }
        Ok(queues.len())
    }

    /// Stores the settings (the defaults: none stored, so that a one-job enqueue built with
    /// the defaults finds them as it assumed: [`Tx::insert_job_and_commit`]).
    pub(super) fn set_config(&mut self, config: &Config) -> TxResult<()> {
        let json = (*config != Config::default())
            .then(|| serde_json::to_string(config).expect("settings serialise"));
        self.write(
            "UPDATE {s}.meta SET value = $1 WHERE key = 'config'",
            &[&json],
        )?;
        Ok(())
    }

    /// Stores a queue's settings (the defaults: none stored).
    pub(super) fn put_queue(&mut self, name: &str, paused: bool, limit: u32) -> TxResult<()> {
        if !paused && limit == 0 {
            self.write("DELETE FROM {s}.queues WHERE name = $1", &[&name])?;
        } else {
            let limit = i64::from(limit);
            self.write(
                "INSERT INTO {s}.queues (name, paused, max_running) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused, \
                 max_running = EXCLUDED.max_running",
                &[&name, &paused, &limit],
            )?;
        }
        Ok(())
    }

    /// Inserts or replaces a worker.
    pub(super) fn put_worker(&mut self, worker: &WorkerInfo) -> TxResult<()> {
        let json = serde_json::to_string(worker).expect("a worker serialises");
        self.write(
            "INSERT INTO {s}.workers (id, info) VALUES ($1, $2::text::jsonb) \
             ON CONFLICT (id) DO UPDATE SET info = EXCLUDED.info",
            &[&worker.id, &json],
        )?;
        Ok(())
    }
}

/// A transaction seen as the graph [`rules::propagate`] walks.
struct Propagation<'t, 'a> {
    tx: &'t mut Tx<'a>,
    now: Timestamp,
}

impl rules::Dependents for Propagation<'_, '_> {
    type Error = TxError;

    fn blocked_dependents(&mut self, seq: u64) -> TxResult<Vec<Job>> {
        select_jobs(self.tx, queries::BLOCKED_DEPENDENTS, &[&(seq as i64)])
    }

    fn dependencies(&mut self, job: &Job) -> TxResult<Vec<Dependency>> {
        linked_dependency_states(self.tx, job)
    }

    fn write(&mut self, old: &Job, new: Job) -> TxResult<()> {
        self.tx.write_changes(&mut [(old.clone(), new)], self.now)
    }
}

// ----- values -----

/// The columns a job is written to (all but `seq`, and `after_ids`, which never changes),
/// with their types, in [`values`] order.
const WRITTEN: [(&str, &str); 22] = [
    ("id", "text"),
    ("command", "text"),
    ("state", "text"),
    ("attempts", "bigint"),
    ("max_retries", "bigint"),
    ("created_at", "bigint"),
    ("updated_at", "bigint"),
    ("priority", "integer"),
    ("run_at", "bigint"),
    ("timeout_us", "bigint"),
    ("last_error", "text"),
    ("exit_code", "integer"),
    ("started_at", "bigint"),
    ("finished_at", "bigint"),
    ("lease_worker", "text"),
    ("lease_token", "bigint"),
    ("lease_expires_at", "bigint"),
    ("runs", "bigint"),
    ("queue", "text"),
    ("unique_key", "text"),
    ("blocked", "boolean"),
    ("lane", "integer"),
];

/// Where `lane` is in [`WRITTEN`].
const LANE: usize = 21;

/// The update of `columns` ([`WRITTEN`] positions) of many jobs in one statement: `$1` the
/// jobs' seqs, then a column array per column.
pub(super) fn update_many_sql(columns: &[usize]) -> String {
    let mut set = Vec::new();
    let mut types = vec!["$1::bigint[]".to_owned()];
    let mut names = vec!["seq"];
    for (i, &c) in columns.iter().enumerate() {
        let (name, kind) = WRITTEN[c];
        set.push(format!("{name} = v.{name}"));
        types.push(format!("${}::{kind}[]", i + 2));
        names.push(name);
    }
    // `j.seq = ANY($1)` has the jobs found through their key: joined on `v.seq` alone, the
    // planner (which cannot see how many rows `unnest` gives) scans the whole table and
    // hashes it whenever that looks cheap, as on a table without statistics yet, and each
    // batch then reads every job.
    format!(
        "UPDATE {{s}}.jobs AS j SET {} FROM unnest({}) AS v({}) \
         WHERE j.seq = ANY($1) AND j.seq = v.seq",
        set.join(", "),
        types.join(", "),
        names.join(", ")
    )
}

/// [`update_many_sql`] of the columns named.
#[cfg(test)]
pub(super) fn update_many_sql_of(names: &[&str]) -> String {
    let columns: Vec<usize> = names
        .iter()
        .map(|name| {
            WRITTEN
                .iter()
                .position(|(written, _)| written == name)
                .expect("a written column")
        })
        .collect();
    update_many_sql(&columns)
}

static INSERT_JOB: LazyLock<String> = LazyLock::new(|| {
    let names: Vec<&str> = WRITTEN.iter().map(|(name, _)| *name).collect();
    let places: Vec<String> = (1..=WRITTEN.len() + 1).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO {{s}}.jobs ({}, after_ids) VALUES ({}) ON CONFLICT DO NOTHING RETURNING seq",
        names.join(", "),
        places.join(", ")
    )
});

/// A job with no unique key and no dependency (the [`WRITTEN`] columns `$1`…, then
/// `after_ids`), inserted if its id is free and the stored settings are still those it was
/// built with (their text `$n+4`, null for none stored), then what [`queries::FINISH`] does
/// for it (its count, the change counter's stripe `$n+2`, the notification on `$n+3`), all
/// only if the row went in. Returns one row: the job's seq (null when it was not inserted)
/// and the stored settings' text. The same locking order as every writer: the job, the
/// counter, the counts. (That order is PostgreSQL's way of running the statement: the main
/// query reads `ins`, then the subquery on `b`, and `c`, read by nobody, runs last, as in
/// [`queries::FINISH`]; were it ever otherwise, a deadlock is detected and the transaction
/// runs again.) Each parameter is cast to its column's type, so that the statement runs
/// unprepared with the types given ([`Step::Typed`]) as well as prepared.
pub(super) static INSERT_JOB_AND_FINISH: LazyLock<String> = LazyLock::new(|| {
    let n = WRITTEN.len();
    let names: Vec<&str> = WRITTEN.iter().map(|(name, _)| *name).collect();
    let values: Vec<String> = WRITTEN
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| format!("${}::{kind}", i + 1))
        .collect();
    format!(
        "WITH cfg AS (SELECT ({CONFIG}) AS value), \
         ins AS (INSERT INTO {{s}}.jobs ({names}, after_ids) SELECT {values}, ${after}::text[] \
         FROM cfg WHERE cfg.value IS NOT DISTINCT FROM ${settings}::text \
         ON CONFLICT DO NOTHING RETURNING seq, queue, state), \
         c AS (INSERT INTO {{s}}.counts (queue, state, stripe, jobs) \
         SELECT queue, state, ${stripe}::integer, 1 FROM ins ON CONFLICT (queue, state, stripe) \
         DO UPDATE SET jobs = {{s}}.counts.jobs + EXCLUDED.jobs), \
         b AS (UPDATE {{s}}.changes SET n = n + 1, work = work + 1 \
         WHERE stripe = ${stripe}::integer AND EXISTS (SELECT FROM ins) RETURNING n) \
         SELECT (SELECT seq FROM ins), (SELECT count(pg_notify(${channel}::text, '')) FROM b), \
         cfg.value FROM cfg",
        names = names.join(", "),
        values = values.join(", "),
        after = n + 1,
        stripe = n + 2,
        channel = n + 3,
        settings = n + 4,
    )
});

/// Many jobs without dependencies in one statement, column arrays `$1`… in [`WRITTEN`]
/// order; returns the seq and id of each job inserted (a job whose id is taken is not).
static INSERT_JOBS: LazyLock<String> =
    LazyLock::new(|| INSERT_NEW_JOBS.replace(" RETURNING", " ON CONFLICT DO NOTHING RETURNING"));

/// [`INSERT_JOBS`] for jobs whose ids were all generated here ([`JobId::generate`]): no
/// stored job can hold them, so the insert skips the conflict handling, which costs about a
/// fifth of its time. Were an id taken all the same, the statement would fail, and the batch
/// with it.
static INSERT_NEW_JOBS: LazyLock<String> = LazyLock::new(|| {
    let columns = || new_job_columns().map(|c| WRITTEN[c]);
    let names: Vec<&str> = columns().map(|(name, _)| name).collect();
    let arrays: Vec<String> = columns()
        .enumerate()
        .map(|(i, (_, kind))| format!("${}::{kind}[]", i + 1))
        .collect();
    format!(
        "INSERT INTO {{s}}.jobs ({}) SELECT * FROM unnest({}) RETURNING seq, id",
        names.join(", "),
        arrays.join(", ")
    )
});

/// Adds attempts (column arrays, `$1` the jobs' seqs) and drops what those jobs recorded
/// while running ([`queries::LIVE_END_ATTEMPTS`]), in one statement: a settlement sends one
/// statement less, and the server flushes one answer less (see
/// [`queries::VERSION_WORKER_AND_QUEUES`]). The two touch different tables.
static INSERT_ATTEMPTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH live AS ({}) \
         INSERT INTO {{s}}.attempts (job_seq, {ATTEMPT_COLUMNS}) SELECT * FROM unnest(\
         $1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], \
         $7::integer[], $8::integer[], $9::text[], $10::text[], $11::bigint[])",
        queries::LIVE_END_ATTEMPTS
    )
});

/// The columns of a run ([`WRITTEN`] names), NULL in a new job of a batch insert (no unique
/// key either): the insert leaves them out rather than send a column of NULLs each.
const RUN_COLUMNS: [&str; 8] = [
    "last_error",
    "exit_code",
    "started_at",
    "finished_at",
    "lease_worker",
    "lease_token",
    "lease_expires_at",
    "unique_key",
];

/// The positions in [`WRITTEN`] of what a batch insert writes of a new job.
fn new_job_columns() -> impl Iterator<Item = usize> {
    (0..WRITTEN.len()).filter(|&c| !RUN_COLUMNS.contains(&WRITTEN[c].0))
}

/// One column's value as written.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Big(Option<i64>),
    Int(Option<i32>),
    Text(Option<String>),
    Bool(bool),
}

impl V {
    fn is_null(&self) -> bool {
        matches!(self, V::Big(None) | V::Int(None) | V::Text(None))
    }

    fn param(&self) -> Param<'_> {
        match self {
            V::Big(v) => v,
            V::Int(v) => v,
            V::Text(v) => v,
            V::Bool(v) => v,
        }
    }

    /// The type of the column it is written to.
    fn ty(&self) -> Type {
        match self {
            V::Big(_) => Type::INT8,
            V::Int(_) => Type::INT4,
            V::Text(_) => Type::TEXT,
            V::Bool(_) => Type::BOOL,
        }
    }

    fn owned(self) -> Owned {
        match self {
            V::Big(v) => Box::new(v),
            V::Int(v) => Box::new(v),
            V::Text(v) => Box::new(v),
            V::Bool(v) => Box::new(v),
        }
    }
}

/// One column's values for many rows, as an array parameter.
#[derive(Debug)]
enum Array {
    Big(Vec<Option<i64>>),
    Int(Vec<Option<i32>>),
    Text(Vec<Option<String>>),
    Bool(Vec<bool>),
}

impl Array {
    /// The values of one column (all of one type, as [`WRITTEN`] says).
    fn of<'v>(values: impl Iterator<Item = &'v V>) -> Array {
        let mut values = values.peekable();
        let one_type = "a column holds values of one type";
        match values.peek() {
            Some(V::Big(_)) | None => Array::Big(
                values
                    .map(|v| match v {
                        V::Big(v) => *v,
                        _ => unreachable!("{one_type}"),
                    })
                    .collect(),
            ),
            Some(V::Int(_)) => Array::Int(
                values
                    .map(|v| match v {
                        V::Int(v) => *v,
                        _ => unreachable!("{one_type}"),
                    })
                    .collect(),
            ),
            Some(V::Text(_)) => Array::Text(
                values
                    .map(|v| match v {
                        V::Text(v) => v.clone(),
                        _ => unreachable!("{one_type}"),
                    })
                    .collect(),
            ),
            Some(V::Bool(_)) => Array::Bool(
                values
                    .map(|v| match v {
                        V::Bool(v) => *v,
                        _ => unreachable!("{one_type}"),
                    })
                    .collect(),
            ),
        }
    }

    fn param(&self) -> Param<'_> {
        match self {
            Array::Big(v) => v,
            Array::Int(v) => v,
            Array::Text(v) => v,
            Array::Bool(v) => v,
        }
    }

    fn owned(self) -> Owned {
        match self {
            Array::Big(v) => Box::new(v),
            Array::Int(v) => Box::new(v),
            Array::Text(v) => Box::new(v),
            Array::Bool(v) => Box::new(v),
        }
    }
}

/// The attempts of a batch, column by column.
#[derive(Default)]
struct AttemptArrays {
    seq: Vec<i64>,
    number: Vec<i64>,
    worker: Vec<String>,
    started_at: Vec<i64>,
    finished_at: Vec<Option<i64>>,
    outcome: Vec<&'static str>,
    exit_code: Vec<Option<i32>>,
    signal: Vec<Option<i32>>,
    error: Vec<Option<String>>,
    output: Vec<Option<String>>,
    due_at: Vec<Option<i64>>,
}

impl AttemptArrays {
    fn push(&mut self, seq: u64, attempt: &Attempt) {
        self.seq.push(seq as i64);
        self.number.push(attempt.number.into());
        self.worker.push(attempt.worker.clone());
        self.started_at.push(micros(attempt.started_at));
        self.finished_at.push(attempt.finished_at.map(micros));
        self.outcome.push(attempt.outcome.as_str());
        self.exit_code.push(attempt.exit_code);
        self.signal.push(attempt.signal);
        self.error.push(attempt.error.clone());
        self.output.push(attempt.output.clone());
        self.due_at.push(attempt.due_at.map(micros));
    }
}

/// [`rules::as_stored`] in place: the rules apply it to what an attempt reports, and here it
/// guards every text a settlement writes, since one NUL would fail the whole batch's
/// statement, every time it was tried.
fn storable(text: &mut Option<String>) {
    if let Some(t) = text.take() {
        *text = Some(rules::as_stored(t));
    }
}

/// A duration as stored: whole microseconds, saturating.
fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// An offset as stored (no output reaches 2^63 bytes).
fn stored_offset(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// Where a job waiting to run waits (the `lane` column): 1 ready, 0 scheduled, `None`
/// otherwise.
fn lane(job: &Job, now: Timestamp) -> Option<i32> {
    job.waits_to_run()
        .then_some(if job.run_at <= now { 1 } else { 0 })
}

/// Every written column of `job`, in [`WRITTEN`] order.
fn values(job: &Job, now: Timestamp) -> [V; WRITTEN.len()] {
    let lease = job.lease.as_ref();
    [
        V::Text(Some(job.id.to_string())),
        V::Text(Some(job.command.clone())),
        V::Text(Some(job.state.as_str().to_owned())),
        V::Big(Some(job.attempts.into())),
        V::Big(Some(job.max_retries.into())),
        V::Big(Some(micros(job.created_at))),
        V::Big(Some(micros(job.updated_at))),
        V::Int(Some(job.priority)),
        V::Big(Some(micros(job.run_at))),
        V::Big(job.timeout.map(duration_micros)),
        V::Text(job.last_error.clone()),
        V::Int(job.exit_code),
        V::Big(job.started_at.map(micros)),
        V::Big(job.finished_at.map(micros)),
        V::Text(lease.map(|l| l.worker.clone())),
        V::Big(lease.map(|l| l.token as i64)),
        V::Big(lease.map(|l| micros(l.expires_at))),
        V::Big(Some(job.runs.into())),
        V::Text(Some(job.queue.clone())),
        V::Text(job.unique_key.clone()),
        V::Bool(job.blocked),
        V::Int(lane(job, now)),
    ]
}

// ----- decoding -----

fn time_of(us: i64) -> TxResult<Timestamp> {
    timestamp(us).map_err(TxError::Decode)
}

fn opt_time(us: Option<i64>) -> TxResult<Option<Timestamp>> {
    us.map(time_of).transpose()
}

fn count_of(n: i64, what: &str) -> TxResult<u32> {
    u32::try_from(n).map_err(|_| TxError::Decode(format!("{what} {n} is out of range")))
}

fn parsed<T: std::str::FromStr>(text: &str) -> TxResult<T>
where
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|e: T::Err| TxError::Decode(format!("{text:?}: {e}")))
}

/// Reads a job from the columns [`JOB_COLUMNS`] names.
fn job_from_row(row: &Row) -> TxResult<Job> {
    let id: JobId = parsed(row.try_get::<_, &str>(1)?)?;
    let lease = match row.try_get::<_, Option<String>>(15)? {
        Some(worker) => Some(Lease {
            job_id: id.clone(),
            worker,
            token: row.try_get::<_, i64>(16)? as u64,
            expires_at: time_of(row.try_get(17)?)?,
        }),
        None => None,
    };
    let after: Vec<String> = row.try_get(21)?;
    Ok(Job {
        seq: row.try_get::<_, i64>(0)? as u64,
        id,
        command: row.try_get(2)?,
        state: parsed(row.try_get::<_, &str>(3)?)?,
        attempts: count_of(row.try_get(4)?, "attempts")?,
        max_retries: count_of(row.try_get(5)?, "max_retries")?,
        created_at: time_of(row.try_get(6)?)?,
        updated_at: time_of(row.try_get(7)?)?,
        priority: row.try_get(8)?,
        run_at: time_of(row.try_get(9)?)?,
        timeout: row
            .try_get::<_, Option<i64>>(10)?
            .map(|us| Duration::from_micros(us.max(0) as u64)),
        last_error: row.try_get(11)?,
        exit_code: row.try_get(12)?,
        started_at: opt_time(row.try_get(13)?)?,
        finished_at: opt_time(row.try_get(14)?)?,
        output: None,
        lease,
        runs: count_of(row.try_get(18)?, "runs")?,
        queue: row.try_get(19)?,
        unique_key: row.try_get(20)?,
        after: after.iter().map(|id| parsed(id)).collect::<TxResult<_>>()?,
        blocked: row.try_get(22)?,
    })
}

/// Reads an attempt from the columns [`ATTEMPT_COLUMNS`] names, starting at column `first`.
fn attempt_at(row: &Row, first: usize) -> TxResult<Attempt> {
    Ok(Attempt {
        number: count_of(row.try_get(first)?, "attempt number")?,
        worker: row.try_get(first + 1)?,
        started_at: time_of(row.try_get(first + 2)?)?,
        finished_at: opt_time(row.try_get(first + 3)?)?,
        outcome: parsed(row.try_get::<_, &str>(first + 4)?)?,
        exit_code: row.try_get(first + 5)?,
        signal: row.try_get(first + 6)?,
        error: row.try_get(first + 7)?,
        output: row.try_get(first + 8)?,
        due_at: opt_time(row.try_get(first + 9)?)?,
    })
}

// ----- reads -----

/// The jobs `SELECT <job columns> FROM {s}.jobs <tail>` returns.
pub(super) fn select_jobs(db: &mut Db, tail: &str, params: &[Param]) -> TxResult<Vec<Job>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM {{s}}.jobs {tail}");
    db.query(&sql, params)?.iter().map(job_from_row).collect()
}

/// The due ready jobs of each queue, at most `room` of each, in claim order, locked
/// ([`queries::PICK_READY`]).
pub(super) fn pick_ready(
    db: &mut Db,
    queues: &[(String, i64)],
    now: Timestamp,
) -> TxResult<Vec<Job>> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| queries::PICK_READY.replace(" J ", &format!(" {JOB_COLUMNS} ")));
    static ONE: LazyLock<String> =
        LazyLock::new(|| queries::PICK_READY_IN.replace(" J ", &format!(" {JOB_COLUMNS} ")));
    if let [(name, room)] = queues {
        return db
            .query(&ONE, &[name, room, &micros(now)])?
            .iter()
            .map(job_from_row)
            .collect();
    }
    let names: Vec<&str> = queues.iter().map(|(name, _)| name.as_str()).collect();
    let rooms: Vec<i64> = queues.iter().map(|(_, room)| *room).collect();
    db.query(&SQL, &[&names, &rooms, &micros(now)])?
        .iter()
        .map(job_from_row)
        .collect()
}

/// The job with this id, without its output.
pub(super) fn job_by_id(db: &mut Db, id: &JobId) -> TxResult<Option<Job>> {
    Ok(select_jobs(db, queries::BY_ID, &[&id.as_str()])?.pop())
}

/// The job with this id, or [`StorageError::NotFound`].
pub(super) fn existing_job(db: &mut Db, id: &JobId) -> TxResult<Job> {
    job_by_id(db, id)?.ok_or_else(|| TxError::Storage(StorageError::NotFound { id: id.clone() }))
}

/// The jobs with these ids, locked (`lock`: a query of [`queries`]), by id.
pub(super) fn jobs_by_ids(
    db: &mut Db,
    ids: impl Iterator<Item = impl AsRef<str>>,
    lock: &str,
) -> TxResult<HashMap<JobId, Job>> {
    let ids: Vec<String> = ids.map(|id| id.as_ref().to_owned()).collect();
    Ok(select_jobs(db, lock, &[&ids])?
        .into_iter()
        .map(|job| (job.id.clone(), job))
        .collect())
}

/// The states of a stored job's dependencies, through its links: a dependency no longer
/// linked (purged after it completed) is `None`, even if a new job has taken its id since.
pub(super) fn linked_dependency_states(db: &mut Db, job: &Job) -> TxResult<Vec<Dependency>> {
    if job.after.is_empty() {
        return Ok(Vec::new());
    }
    let mut states = HashMap::new();
    for row in db.query(queries::LINKED_STATES, &[&(job.seq as i64)])? {
        let id: String = row.try_get(0)?;
        states.insert(id, parsed::<JobState>(row.try_get::<_, &str>(1)?)?);
    }
    Ok(job
        .after
        .iter()
        .map(|id| (id.clone(), states.get(id.as_str()).copied()))
        .collect())
}

/// The states of the dependencies `after` (locked against changes with `lock`).
pub(super) fn dependency_states(
    db: &mut Db,
    after: &[JobId],
    lock: bool,
) -> TxResult<Vec<Dependency>> {
    if after.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = after.iter().map(JobId::as_str).collect();
    let query = if lock {
        queries::STATES_FOR_SHARE
    } else {
        queries::STATES
    };
    let mut states = HashMap::new();
    for row in db.query(query, &[&ids])? {
        let id: String = row.try_get(0)?;
        states.insert(id, parsed::<JobState>(row.try_get::<_, &str>(1)?)?);
    }
    Ok(after
        .iter()
        .map(|id| (id.clone(), states.get(id.as_str()).copied()))
        .collect())
}

/// The output of the job's last finished attempt.
pub(super) fn last_output(db: &mut Db, seq: u64) -> TxResult<Option<String>> {
    let rows = db.query(queries::LAST_OUTPUT, &[&(seq as i64)])?;
    match rows.first() {
        Some(row) => Ok(row.try_get(0)?),
        None => Ok(None),
    }
}

/// The job's finished attempts, oldest first.
pub(super) fn finished_attempts(db: &mut Db, seq: u64) -> TxResult<Vec<Attempt>> {
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM {{s}}.attempts {}",
        queries::ATTEMPTS_OF
    );
    db.query(&sql, &[&(seq as i64)])?
        .iter()
        .map(|row| attempt_at(row, 0))
        .collect()
}

/// How many finished attempts the job has.
pub(super) fn finished_count(db: &mut Db, seq: u64) -> TxResult<usize> {
    let count: i64 = db.query(queries::FINISHED_COUNT, &[&(seq as i64)])?[0].try_get(0)?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// What the job's running attempt recorded from `offset` on, and where that starts.
pub(super) fn live_output(db: &mut Db, seq: u64, offset: u64) -> TxResult<(u64, String)> {
    let mut start = None;
    let mut text = String::new();
    for row in db.query(
        queries::LIVE_SINCE,
        &[&(seq as i64), &stored_offset(offset)],
    )? {
        let upto: i64 = row.try_get(0)?;
        let chunk: &str = row.try_get(1)?;
        start.get_or_insert((upto as u64).saturating_sub(chunk.len() as u64));
        text.push_str(chunk);
    }
    let Some(start) = start else {
        return Ok((offset, text));
    };
    let (at, rest) = rules::output_from(&text, start, offset);
    let cut = text.len() - rest.len();
    text.drain(..cut);
    Ok((at, text))
}

/// Has what an enqueue runs prepared with its first statement: the insert (of one job at a
/// time, or of a `plain` batch in one statement, `generated` if all its ids were) and the
/// commit's counts. (One job alone goes in with one statement of its own:
/// [`Tx::insert_job_and_commit`].)
pub(super) fn prepare_enqueue(db: &mut Db, plain: bool, generated: bool) {
    let insert: &'static str = match (plain, generated) {
        (true, true) => &INSERT_NEW_JOBS,
        (true, false) => &INSERT_JOBS,
        (false, _) => &INSERT_JOB,
    };
    db.prepare_ahead(&[insert, queries::FINISH]);
}

const CONFIG: &str = "SELECT value FROM {s}.meta WHERE key = 'config'";

/// The settings as stored: the text of their row (`None` when none was ever stored, the
/// default: [`Settings::default`]), and what it says.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Settings {
    pub(super) stored: Option<String>,
    pub(super) config: Config,
}

impl Settings {
    /// The settings whose row holds `stored`.
    fn from_stored(stored: Option<String>) -> TxResult<Self> {
        let config = match &stored {
            None => Config::default(),
            Some(json) => serde_json::from_str(json)
                .map_err(|e| TxError::Decode(format!("stored settings are unreadable: {e}")))?,
        };
        Ok(Self { stored, config })
    }
}

/// The stored settings (defaults when none were stored); with `lock`, locked for a change.
pub(super) fn config(db: &mut Db, lock: bool) -> TxResult<Config> {
    Ok(settings(db, lock)?.config)
}

/// [`config`], with the text it was read from.
pub(super) fn settings(db: &mut Db, lock: bool) -> TxResult<Settings> {
    let sql = if lock {
        "SELECT value FROM {s}.meta WHERE key = 'config' FOR UPDATE"
    } else {
        CONFIG
    };
    // Without parameters: not prepared the first time ([`Db::send`]), so it goes with the
    // statements prepared ahead, not after them.
    let rows = db.query(sql, &[])?;
    settings_from(&rows)
}

/// The settings in the rows of [`CONFIG`].
fn settings_from(rows: &[Row]) -> TxResult<Settings> {
    let stored = match rows.first() {
        None => None,
        Some(row) => row.try_get::<_, Option<String>>(0)?,
    };
    Settings::from_stored(stored)
}

/// The registered workers (`tail` after `FROM {s}.workers`), by id.
pub(super) fn workers(db: &mut Db, tail: &str, params: &[Param]) -> TxResult<Vec<WorkerInfo>> {
    let sql = format!("SELECT info::text FROM {{s}}.workers {tail}");
    db.query(&sql, params)?
        .iter()
        .map(|row| worker_from_json(row.try_get(0)?))
        .collect()
}

/// A queue with jobs, as [`queries::CLAIMABLE_QUEUES`] reads it.
#[derive(Debug)]
pub(super) struct QueueCounts {
    pub(super) name: String,
    /// Pending or failed jobs (as committed).
    pub(super) waiting: i64,
    /// Running jobs (as committed).
    pub(super) running: i64,
    pub(super) paused: bool,
    /// Its limit of running jobs, 0 for none.
    pub(super) limit: i64,
}

/// The queues that `rows` of [`queries::CLAIMABLE_QUEUES`] hold from column `first` on
/// (a row whose queue is `NULL` holds none: see [`queries::VERSION_WORKER_AND_QUEUES`]).
pub(super) fn claimable_queues(rows: &[Row], first: usize) -> TxResult<Vec<QueueCounts>> {
    let mut queues = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(name) = row.try_get::<_, Option<String>>(first)? else {
            continue;
        };
        queues.push(QueueCounts {
            name,
            waiting: row.try_get::<_, Option<i64>>(first + 1)?.unwrap_or(0),
            running: row.try_get(first + 2)?,
            paused: row.try_get(first + 3)?,
            limit: row.try_get(first + 4)?,
        });
    }
    Ok(queues)
}

/// How many columns [`polled`] reads: the version and the registration.
pub(super) const POLLED_COLUMNS: usize = 2;

/// The version and registration a row of [`queries::VERSION_AND_WORKER`] holds (or of
/// [`queries::VERSION_WORKER_AND_QUEUES`], which starts with the same two columns).
pub(super) fn polled(row: &Row) -> TxResult<(u64, Option<WorkerInfo>)> {
    let version: i64 = row.try_get(0)?;
    let registration = row
        .try_get::<_, Option<&str>>(1)?
        .map(worker_from_json)
        .transpose()?;
    Ok((version as u64, registration))
}

/// A worker's registration as stored.
pub(super) fn worker_from_json(json: &str) -> TxResult<WorkerInfo> {
    serde_json::from_str(json)
        .map_err(|e| TxError::Decode(format!("a stored worker is unreadable: {e}")))
}

/// Jobs per queue and state.
pub(super) fn counts(db: &mut Db) -> TxResult<Vec<(String, JobState, usize)>> {
    db.query(queries::COUNTS, &[])?
        .iter()
        .map(|row| {
            let jobs: i64 = row.try_get(2)?;
            Ok((
                row.try_get(0)?,
                parsed(row.try_get::<_, &str>(1)?)?,
                usize::try_from(jobs)
                    .map_err(|_| TxError::Decode(format!("a count of {jobs} jobs")))?,
            ))
        })
        .collect()
}

/// Queue name → (paused, limit), for the queues that have settings.
pub(super) fn queue_settings(db: &mut Db) -> TxResult<HashMap<String, (bool, u32)>> {
    db.query(queries::QUEUE_SETTINGS, &[])?
        .iter()
        .map(settings_from_row)
        .collect()
}

/// A queue's name and settings from `name, paused, max_running`.
pub(super) fn settings_from_row(row: &Row) -> TxResult<(String, (bool, u32))> {
    Ok((
        row.try_get(0)?,
        (row.try_get(1)?, count_of(row.try_get(2)?, "queue limit")?),
    ))
}

/// Every queue that has jobs or settings, by name.
pub(super) fn queues(db: &mut Db) -> TxResult<Vec<QueueInfo>> {
    let settings = queue_settings(db)?;
    Ok(queue_infos(&settings, counts(db)?))
}

/// What happened at or after `since` ([`crate::Storage::activity`]).
pub(super) fn activity(db: &mut Db, since: Timestamp) -> TxResult<Activity> {
    let since = micros(since);
    let attempts = db
        .query(queries::ATTEMPTS_SINCE, &[&since])?
        .iter()
        .map(|row| {
            Ok(FinishedAttempt {
                queue: row.try_get(0)?,
                job: parsed(row.try_get::<_, &str>(1)?)?,
                attempt: attempt_at(row, 2)?,
            })
        })
        .collect::<TxResult<Vec<_>>>()?;
    let ended = db
        .query(queries::ENDED_SINCE, &[&since])?
        .iter()
        .map(|row| Ok((row.try_get(0)?, parsed(row.try_get::<_, &str>(1)?)?)))
        .collect::<TxResult<Vec<_>>>()?;
    Ok(Activity { attempts, ended })
}

/// The earliest `run_at` after `after` of a job waiting to run.
pub(super) fn next_due(db: &mut Db, after: Timestamp) -> TxResult<Option<Timestamp>> {
    let us: Option<i64> = db.query(queries::NEXT_DUE, &[&micros(after)])?[0].try_get(0)?;
    opt_time(us)
}

crate::ops::store_read_by_module_fns!(Db<'_>, TxError);

impl crate::ops::StoreTx for Tx<'_> {
    type Error = TxError;

    fn locked_jobs(&mut self, ids: &[JobId]) -> TxResult<HashMap<JobId, Job>> {
        jobs_by_ids(
            self,
            ids.iter().map(JobId::as_str),
            queries::BY_IDS_FOR_UPDATE,
        )
    }

    fn job(&mut self, id: &JobId) -> TxResult<Option<Job>> {
        job_by_id(self, id)
    }

    fn last_output(&mut self, seq: u64) -> TxResult<Option<String>> {
        last_output(self, seq)
    }

    fn unique_holder(&mut self, key: &str) -> TxResult<Option<Job>> {
        Ok(select_jobs(self, queries::UNIQUE_HOLDER, &[&key])?.pop())
    }

    fn dependency_states(&mut self, job: &Job) -> TxResult<Vec<Dependency>> {
        linked_dependency_states(self, job)
    }

    fn update_job(&mut self, old: Job, new: Job, now: Timestamp) -> TxResult<Job> {
        let mut pair = [(old, new)];
        self.update_jobs(&mut pair, now)?;
        let [(_, new)] = pair;
        Ok(new)
    }

    fn insert_attempt(&mut self, seq: u64, attempt: Attempt) -> TxResult<()> {
        self.insert_attempts(&mut [(seq, attempt)])
    }

    fn delete_job(&mut self, job: &Job, now: Timestamp) -> TxResult<()> {
        self.delete_jobs(std::slice::from_ref(job), Some(now))
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
        config(self, true)
    }

    fn set_config(&mut self, config: &Config) -> TxResult<()> {
        Tx::set_config(self, config)
    }

    fn locked_workers(&mut self, id: Option<&str>) -> TxResult<Vec<WorkerInfo>> {
        match id {
            Some(id) => workers(self, "WHERE id = $1 FOR UPDATE", &[&id]),
            None => workers(self, "ORDER BY id FOR UPDATE", &[]),
        }
    }

    fn put_worker(&mut self, worker: &WorkerInfo) -> TxResult<()> {
        Tx::put_worker(self, worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The types a one-job insert gives its parameters when it runs unprepared are those of
    /// the columns they are written to (a mismatch fails the statement, or, between integer
    /// widths, has the server convert it).
    #[test]
    fn unprepared_values_have_their_columns_types() {
        let job = rules::new_job(
            crate::NewJob::new("true"),
            JobId::generate(),
            0,
            &[],
            &Config::default(),
            crate::now(),
        );
        let by_name = |kind: &str| match kind {
            "bigint" => Type::INT8,
            "integer" => Type::INT4,
            "text" => Type::TEXT,
            "boolean" => Type::BOOL,
            other => panic!("no type for {other}"),
        };
        for (value, (column, kind)) in values(&job, crate::now()).iter().zip(WRITTEN) {
            assert_eq!(value.ty(), by_name(kind), "the type of {column}");
        }
    }
}
