//! `PgStorage`: the queue in a PostgreSQL database, shared by workers on many machines.
//!
//! The queue lives in a PostgreSQL schema of its own (`PgOptions::schema`, `queuectl` by
//! default), created and migrated on connect or with the first operation ([`SchemaCheck`];
//! `schema.rs`; `docs/postgres.md` describes the tables). Every [`Storage`] method is one
//! transaction on a connection of the handle's pool. As in the embedded store, what a
//! transition does to a job is a rule of the crate's `rules` module: SQL selects the rows a
//! transition applies to, through an index, locking them (`FOR UPDATE`, and `SKIP LOCKED`
//! where another worker's claim may hold them), Rust applies the rule, and the columns it
//! changed are written back. `DECISIONS.md` (§15) says how claims, limits, unique keys and
//! wake-ups hold across processes.
//!
//! Time is the `now` each method is given, never the server's clock.

mod link;
mod listen;
mod queries;
mod rows;
mod schema;
mod tls;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::Statement;
use postgres::error::SqlState;
use scheduled_thread_pool::ScheduledThreadPool;

use self::link::{ConnectError, Link, Param};
use self::listen::{Heard, Listener};
use self::rows::{Db, Tx, TxError, TxResult};
use crate::config::{Config, ConfigError};
use crate::error::{DatabaseFault, Result, StorageError};
use crate::file::rows::micros;
use crate::job::{Attempt, Job, JobId, JobState, Lease, NewJob, Timestamp};
use crate::ops;
use crate::rules::{self, Abandoned};
use crate::storage::{
    Activity, ClaimRequest, Enqueued, ListQuery, OutputChunk, Polled, QueueChange, QueueInfo,
    RunningOutput, Settlement, StateCounts, Storage, WorkerInfo,
};

pub use self::schema::PG_SCHEMA_VERSION;

/// How many times an operation is run again after its connection was lost (reads, and writes
/// that had not begun), and the first pause before it; each pause is four times the last.
const CONNECTION_RETRIES: u32 = 3;
const FIRST_PAUSE: Duration = Duration::from_millis(25);
/// How many times a write transaction is run again after PostgreSQL aborted it for a
/// conflict with a concurrent one (deadlock, serialization failure, a unique index race):
/// nothing of it was applied.
const CONFLICT_RETRIES: u32 = 5;
/// The shortest [`PgOptions::poll_interval`] used.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How to connect a [`PgStorage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// The PostgreSQL schema the queue lives in (created if needed): lowercase ASCII letters,
    /// digits and `_`, not starting with a digit, at most 63 bytes. Default `queuectl`.
    pub schema: String,
    /// At most this many pooled connections (at least 1; default 4). The handle also keeps
    /// one listening connection of its own unless [`PgOptions::listen`] is off.
    pub pool_size: u32,
    /// Longest a [`Storage::wait_for_change`] goes without looking at the change counter
    /// (at least 10 ms; default 1 s): the bound when a notification is lost, and how waiting
    /// works without notifications.
    pub poll_interval: Duration,
    /// Wake waiters at once with `LISTEN`/`NOTIFY` (default). Off: they only poll, which is
    /// what works through PgBouncer in transaction mode (it does not keep a `LISTEN`).
    pub listen: bool,
    /// How long to wait for a connection (to open one, or for a free one in the pool).
    pub connect_timeout: Duration,
    /// How often a pooled connection looks whether the queue's tables have grown to twice
    /// the size its cached plans were made for, and has them made again if so (default 1 s;
    /// DECISIONS §15).
    pub replan_check: Duration,
    /// When the handle makes sure the schema is there and current (default: on connect).
    pub schema_check: SchemaCheck,
    /// Create the queue's schema where there is none (default). Off, a schema that does not
    /// exist or holds nothing is [`StorageError::NoStore`], and nothing is created.
    pub create: bool,
}

/// When a [`PgStorage`] makes sure its schema is there and at the version it uses, creating
/// or migrating it if needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchemaCheck {
    /// In [`PgStorage::connect`]: a schema the handle cannot use fails the connect.
    #[default]
    OnConnect,
    /// In the first round trip of the handle's first operation, which saves a round trip
    /// (what a one-shot command, which runs one or two operations, wants). The connect
    /// opens a connection but reads nothing; a schema the handle cannot use fails that first
    /// operation, and nothing of it is applied. When the check finds no schema yet, or an
    /// older one, the handle creates or migrates it and runs the operation again.
    WithFirstUse,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            schema: "queuectl".to_owned(),
            pool_size: 4,
            poll_interval: Duration::from_secs(1),
            listen: true,
            connect_timeout: Duration::from_secs(10),
            replan_check: Duration::from_secs(1),
            schema_check: SchemaCheck::OnConnect,
            create: true,
        }
    }
}

/// How a read sees the store.
#[derive(Debug, Clone, Copy)]
enum Snapshot {
    /// Its one statement's own snapshot.
    Statement,
    /// One snapshot for all its statements, in a read-only transaction.
    Transaction,
}

/// What a settle-and-claim did ([`PgStorage::settle_then_claim`]), and what its look for a
/// stop request found, if it made one ([`Polled::poll`]).
struct Turn {
    settled: Vec<Result<Job>>,
    claimed: Vec<Job>,
    poll: Option<Result<(u64, Option<WorkerInfo>)>>,
}

/// The tables whose growth makes a connection's cached plans stale: those the hot
/// statements search.
const PLANNED_TABLES: [&str; 4] = ["jobs", "attempts", "dependencies", "live_output"];

/// A pooled connection, with the statements prepared on it.
struct Conn {
    link: Link,
    statements: HashMap<String, Statement>,
    /// The sizes of the queue's tables (in [`PLANNED_TABLES`] order) its cached plans were
    /// made for, and when they were last looked at.
    planned_for: (Vec<i64>, Instant),
}

/// The last error of the pool's attempts to open a connection (r2d2 keeps only its message),
/// and when it came.
#[derive(Debug, Default, Clone)]
struct ConnectErrors(std::sync::Arc<parking_lot::Mutex<Option<(Instant, ConnectError)>>>);

impl ConnectErrors {
    /// The last error, if it came at `since` or later (an older one is forgotten: it belongs
    /// to an attempt that something else waited for).
    fn take_since(&self, since: Instant) -> Option<ConnectError> {
        match self.0.lock().take() {
            Some((at, error)) if at >= since => Some(error),
            _ => None,
        }
    }

    fn any_since(&self, since: Instant) -> bool {
        self.0.lock().as_ref().is_some_and(|(at, _)| *at >= since)
    }
}

impl r2d2::HandleError<ConnectError> for ConnectErrors {
    fn handle_error(&self, error: ConnectError) {
        *self.0.lock() = Some((Instant::now(), error));
    }
}

/// Opens the pool's connections.
#[derive(Debug)]
struct Manager {
    config: tokio_postgres::Config,
    connector: tls::Connector,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = ConnectError;

    fn connect(&self) -> std::result::Result<Conn, ConnectError> {
        Ok(Conn {
            link: Link::connect(&self.config, &self.connector)?,
            statements: HashMap::new(),
            planned_for: (vec![0; PLANNED_TABLES.len()], Instant::now()),
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> std::result::Result<(), ConnectError> {
        conn.link.simple("").map(drop).map_err(ConnectError::Db)
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.link.is_closed()
    }
}

/// Whether `stored` is the record `new` made when it was enqueued, whatever happened to it
/// since (claimed, failed and due again, retried): what the enqueue chose and no transition
/// changes is the same, its creation time to the microsecond included. A store that sent an
/// insert whose answer was lost recognises its own job by this.
fn same_enqueue(stored: &Job, new: &Job) -> bool {
    stored.id == new.id
        && stored.command == new.command
        && stored.created_at == new.created_at
        && stored.queue == new.queue
        && stored.priority == new.priority
        && stored.max_retries == new.max_retries
        && stored.timeout == new.timeout
        && stored.unique_key == new.unique_key
        && stored.after == new.after
}

/// A store in a PostgreSQL database, safe to share between threads, processes and machines.
///
/// See the [module documentation](self) for the design.
///
/// ```no_run
/// use queuectl_core::{NewJob, PgOptions, PgStorage, StorageExt, now};
/// let store = PgStorage::connect("postgres://postgres@127.0.0.1/queues", PgOptions::default())?;
/// store.enqueue(NewJob::new("echo hi").id("hi")?, now())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PgStorage {
    pool: r2d2::Pool<Manager>,
    /// The schema's name.
    schema: String,
    /// The channels its changes are announced on.
    channels: rows::Channels,
    /// The schema's name quoted, for statements.
    quoted: String,
    /// The database in words, for errors: its URL without password, and the schema.
    database: String,
    poll_interval: Duration,
    replan_check: Duration,
    /// Reads the sizes of [`PLANNED_TABLES`].
    sizes_sql: String,
    /// Whether a missing schema is created ([`PgOptions::create`]).
    create: bool,
    /// Why the pool's last attempt to open a connection failed, if it did since looked at.
    connect_errors: ConnectErrors,
    /// Whether a connection was ever opened ([`PgStorage::pooled`]).
    connected: AtomicBool,
    listener: Listener,
    /// Whether the schema was found there and current ([`SchemaCheck`]).
    schema_checked: AtomicBool,
    /// The settings as the last enqueue here found them: the next one is built with them
    /// and checks them in its insert's round trip instead of reading them in one of its own
    /// (`Tx::insert_jobs`, `Tx::insert_job_and_commit`).
    settings: parking_lot::Mutex<Option<rows::Settings>>,
}

impl PgStorage {
    /// Connects to the database at `url` (`postgres://user[:password]@host[:port]/dbname`, or
    /// the `key=value` form), creates or migrates the queue's schema (unless
    /// [`PgOptions::schema_check`] leaves that to the first operation), and starts listening
    /// for changes.
    pub fn connect(url: &str, options: PgOptions) -> Result<Self> {
        let bad_url = |source: Box<dyn std::error::Error + Send + Sync>| StorageError::Postgres {
            op: "read the connection settings",
            database: "the database URL given".to_owned(),
            fault: DatabaseFault::BadUrl,
            source,
        };
        let (rest, tls_wanted) = tls::split_url(url).map_err(|e| bad_url(e.into()))?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| bad_url(Box::new(e)))?;
        // A `connect_timeout` in the URL is the caller's choice, as `PgOptions`' is.
        let connect_timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(options.connect_timeout);
        config.connect_timeout(connect_timeout);
        config.keepalives(true);
        if config.get_application_name().is_none() {
            config.application_name("queuectl");
        }
        let database = format!("{} (schema {})", describe(&config), options.schema);
        check_schema_name(&options.schema, &database)?;
        let connector =
            tls::Connector::for_url(&mut config, &tls_wanted, tls::home_dir().as_deref()).map_err(
                |source| StorageError::Postgres {
                    op: "set up TLS",
                    database: database.clone(),
                    fault: DatabaseFault::Tls,
                    source: Box::new(source),
                },
            )?;
        let connect_errors = ConnectErrors::default();
        let pool = r2d2::Pool::builder()
            // The pool's own threads open connections: a one-shot command, with a pool of one
            // connection, needs one (r2d2 starts three); a larger pool keeps up to three, so
            // that one connection slow to start does not hold up the others.
            .thread_pool(Arc::new(
                ScheduledThreadPool::builder()
                    .num_threads(options.pool_size.clamp(1, 3) as usize)
                    .thread_name_pattern("queuectl-pool-{}")
                    .build(),
            ))
            .max_size(options.pool_size.max(1))
            .min_idle(Some(0))
            .test_on_check_out(false)
            // Longer than a connect may take (`Link::connect` gives up at `connect_timeout`),
            // so that a connect that failed is reported with its own cause.
            .connection_timeout(connect_timeout.saturating_add(connect_timeout / 2))
            .error_handler(Box::new(connect_errors.clone()))
            .build_unchecked(Manager {
                config: config.clone(),
                connector: connector.clone(),
            });
        let quoted = format!("\"{}\"", options.schema);
        let mut store = Self {
            pool,
            schema: options.schema.clone(),
            channels: rows::Channels::of(&options.schema),
            quoted,
            database,
            poll_interval: options.poll_interval.max(MIN_POLL_INTERVAL),
            replan_check: options.replan_check,
            sizes_sql: format!(
                "SELECT {}",
                PLANNED_TABLES
                    .map(|table| format!("pg_relation_size('\"{}\".{table}')", options.schema))
                    .join(", ")
            ),
            listener: Listener::poll_only(),
            schema_checked: AtomicBool::new(false),
            settings: parking_lot::Mutex::new(None),
            create: options.create,
            connect_errors,
            connected: AtomicBool::new(false),
        };
        // The listening connection is opened while the pool's first one is.
        let listening = options
            .listen
            .then(|| Listener::start(&config.into(), &connector, &store.channels));
        match options.schema_check {
            SchemaCheck::OnConnect => store.migrate()?,
            // Connected all the same: an unreachable server fails the connect, and what the
            // caller times after it (a job's creation) does not include connecting.
            SchemaCheck::WithFirstUse => drop(store.pooled("connect")?),
        }
        if let Some(listening) = listening {
            store.listener = listening
                .listening()
                .map_err(|e| store.error("listen for changes", TxError::Db(e)))?;
        }
        Ok(store)
    }

    /// The schema the queue lives in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The database in words (its URL without password, and the schema).
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Creates the schema or applies the migrations it lacks, in one transaction under an
    /// advisory lock on the schema's name: concurrent connects wait for each other. Once it
    /// succeeded, transactions no longer check the schema ([`SchemaCheck`]).
    fn migrate(&self) -> Result<()> {
        let op = if self.create {
            "create or upgrade the queue's schema"
        } else {
            "open the queue's schema"
        };
        // Not `connection`: its look at the tables' sizes needs the tables.
        let mut conn = self.pooled(op)?;
        let version_table = format!("{}.schema_version", self.quoted);
        let Conn {
            link, statements, ..
        } = &mut *conn;
        let result = (|| -> TxResult<()> {
            // The usual case in one round trip (no statement to prepare): the schema is there
            // and current. Anything else (no table yet, another version) takes the full path.
            let quick = link.simple(&format!("SELECT version FROM {version_table}"));
            if let Ok(messages) = quick {
                let current = messages.iter().find_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                });
                if current.as_deref() == Some(PG_SCHEMA_VERSION.to_string().as_str()) {
                    return Ok(());
                }
            }
            let mut tx = Db::begin(link, statements, &self.quoted, "BEGIN");
            let key = crc32fast::hash(self.schema.as_bytes()) as i32;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&schema::LOCK_CLASS, &key],
            )?;
            let contents: Vec<String> = tx
                .query(schema::CONTENTS, &[&self.schema])?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            self.check_ours(&contents)?;
            tx.batch_execute(&schema::BOOTSTRAP.replace("{s}", &self.quoted))?;
            let version: i32 =
                tx.query("SELECT version FROM {s}.schema_version", &[])?[0].try_get(0)?;
            let found = u32::try_from(version).unwrap_or(u32::MAX);
            if found > PG_SCHEMA_VERSION {
                return Err(StorageError::UnsupportedFormat {
                    path: PathBuf::from(&self.database),
                    found,
                    supported: PG_SCHEMA_VERSION,
                }
                .into());
            }
            if (1..PG_SCHEMA_VERSION).contains(&found) {
                // The tables an older build's writers take first, before any other a
                // migration changes: see `schema::LOCK_FIRST`.
                tx.batch_execute(&schema::LOCK_FIRST.replace("{s}", &self.quoted))?;
            }
            for migration in &schema::MIGRATIONS[found as usize..] {
                tx.batch_execute(&migration.replace("{s}", &self.quoted))?;
            }
            tx.execute(
                "UPDATE {s}.schema_version SET version = $1",
                &[&(PG_SCHEMA_VERSION as i32)],
            )?;
            tx.commit()
        })();
        result.map_err(|e| self.error(op, e))?;
        self.schema_checked.store(true, Ordering::Release);
        Ok(())
    }

    /// Refuses a schema that is not a queue's: one without the tables the first migration
    /// makes (`contents`: the names of what it holds, [`schema::CONTENTS`]) that holds
    /// anything. What someone added to a queue's schema (a view over its jobs, say) is left
    /// alone. An empty or missing schema is [`StorageError::NoStore`] unless the handle
    /// creates one.
    fn check_ours(&self, contents: &[String]) -> TxResult<()> {
        if contents.is_empty() {
            if !self.create {
                return Err(StorageError::NoStore {
                    path: PathBuf::from(&self.database),
                }
                .into());
            }
            return Ok(());
        }
        let has = |name: &str| contents.iter().any(|c| c == name);
        if has("schema_version") && has("meta") && has("jobs") {
            return Ok(());
        }
        let theirs: Vec<&str> = contents
            .iter()
            .map(String::as_str)
            .filter(|name| !schema::OURS.contains(name))
            .collect();
        let reason = if theirs.is_empty() {
            "the schema holds some of a queue's tables but not all: it was not made by \
             queuectl; choose another schema"
                .to_owned()
        } else {
            let shown = theirs
                .iter()
                .take(5)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            let more = if theirs.len() > 5 { ", …" } else { "" };
            format!(
                "the schema holds objects of another program ({shown}{more}); choose another \
                 schema"
            )
        };
        Err(StorageError::Conflict {
            path: PathBuf::from(&self.database),
            reason,
        }
        .into())
    }

    // ----- transactions -----

    /// A connection of the pool, its cached plans made again if the tables have outgrown
    /// them ([`PgStorage::replan_if_grown`]).
    fn connection(&self, op: &'static str) -> Result<r2d2::PooledConnection<Manager>> {
        let mut lost = 0;
        loop {
            let mut conn = self.pooled(op)?;
            match self.replan_if_grown(&mut conn) {
                Ok(()) => return Ok(conn),
                // A broken connection leaves the pool when it is given back.
                Err(e) if is_connection_error(&e) && lost < CONNECTION_RETRIES => {
                    drop(conn);
                    pause(lost);
                    lost += 1;
                }
                Err(e) => return Err(self.error(op, TxError::Db(e))),
            }
        }
    }

    /// A connection of the pool. Until one was ever opened, the first failure to open one
    /// is returned at once, with its cause (a database or user that does not exist, a server
    /// that refuses the connection): that is a mistake to report, not a moment to wait out.
    /// It is looked for at growing intervals (10 ms, 20 ms, …), each of which may have r2d2
    /// start one more connection when the server is slow to answer. Afterwards a connection
    /// that cannot be opened is tried again until `connect_timeout`, so that a server
    /// restarting under a running worker is waited for.
    fn pooled(&self, op: &'static str) -> Result<r2d2::PooledConnection<Manager>> {
        let since = Instant::now();
        let failed = |timeout: r2d2::Error| {
            let (fault, source): (_, Box<dyn std::error::Error + Send + Sync>) =
                match self.connect_errors.take_since(since) {
                    Some(ConnectError::Db(error)) => (fault_of(&error), Box::new(error)),
                    Some(other) => (DatabaseFault::Unreachable, Box::new(other)),
                    None => (DatabaseFault::Unreachable, Box::new(timeout)),
                };
            StorageError::Postgres {
                op,
                database: self.database.clone(),
                fault,
                source,
            }
        };
        if self.connected.load(Ordering::Acquire) {
            return self.pool.get().map_err(failed);
        }
        let deadline = since + self.pool.connection_timeout();
        let mut slice = Duration::from_millis(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.pool.get_timeout(slice.min(left)) {
                Ok(conn) => {
                    self.connected.store(true, Ordering::Release);
                    return Ok(conn);
                }
                Err(timeout) => {
                    if self.connect_errors.any_since(since) || Instant::now() >= deadline {
                        return Err(failed(timeout));
                    }
                }
            }
            slice *= 2;
        }
    }

    /// Every `replan_check`, reads the sizes of the queue's tables; when one has doubled
    /// (to at least 64 KiB) since the connection's plans were made, drops them (`DISCARD
    /// PLANS`: the statements stay prepared and are planned again at their next run). After
    /// five runs of a prepared statement PostgreSQL may keep a generic plan, made for the
    /// table as it was then: made while the queue was nearly empty, it scans `jobs` whole
    /// once the queue has grown (DECISIONS §15). A new connection counts its plans as made
    /// for empty tables, so that a command that is over within `replan_check` never looks.
    fn replan_if_grown(&self, conn: &mut Conn) -> std::result::Result<(), postgres::Error> {
        const MIN_GROWN: i64 = 64 * 1024;
        let (planned_for, looked_at) = &conn.planned_for;
        // The sizes are of tables that may not be there before the schema check.
        if looked_at.elapsed() < self.replan_check || !self.schema_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        let messages = conn.link.simple(&self.sizes_sql)?;
        let sizes: Vec<i64> = messages
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).and_then(|v| v.parse().ok()).unwrap_or(0))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        let grown = sizes
            .iter()
            .zip(planned_for)
            .any(|(now, then)| *now >= MIN_GROWN && *now >= then.saturating_mul(2));
        if grown {
            conn.link.simple("DISCARD PLANS")?;
            conn.planned_for = (sizes, Instant::now());
        } else {
            conn.planned_for.1 = Instant::now();
        }
        Ok(())
    }

    /// Runs `f` in one read-committed transaction and commits it; when it changed anything,
    /// bumps the change counter and notifies waiters in the same transaction. A transaction
    /// PostgreSQL aborted for a conflict with another is run again, as is one whose
    /// connection was found lost when it began; any other failure is returned (after a
    /// failure at commit, whether it committed is unknown).
    fn write<T>(&self, op: &'static str, mut f: impl FnMut(&mut Tx) -> TxResult<T>) -> Result<T> {
        let mut lost = 0;
        let mut conflicts = 0;
        loop {
            if lost > 0 {
                pause(lost - 1);
            }
            let mut conn = self.connection(op)?;
            let Conn {
                link, statements, ..
            } = &mut *conn;
            let mut db = Db::begin(link, statements, &self.quoted, "BEGIN");
            self.check_schema_with(&mut db);
            let mut tx = Tx::new(db, &self.channels);
            let mut began = false;
            let result = (|| {
                let out = f(&mut tx);
                // `BEGIN` goes with the first statement: a lost connection found before it
                // came back means nothing of the transaction was applied. `COMMIT` may go
                // with the first statement too (when every other was deferred): once it is
                // sent, a lost answer leaves the outcome unknown, not to be run again. (A
                // statement that commits itself, `Tx::insert_job_and_commit`, is run again
                // by an `f` that recognises what it added.)
                began = tx.began();
                let out = out?;
                began = true;
                tx.commit()?;
                Ok(out)
            })();
            match result {
                Ok(out) => return Ok(out),
                // Nothing was applied: once the schema is made current, run again.
                Err(TxError::Unchecked(_)) => {
                    drop(conn);
                    self.migrate()?;
                }
                Err(TxError::Db(e))
                    if !began && is_connection_error(&e) && lost < CONNECTION_RETRIES =>
                {
                    lost += 1;
                }
                Err(TxError::Db(e)) if is_conflict(&e) && conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                }
                // Built with settings changed since: run again with the stored ones.
                Err(TxError::Resettled(_)) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                }
                Err(e) => return Err(self.error(op, e)),
            }
        }
    }

    /// Looks for what the database's own checks cannot see: job counts per queue and state
    /// (what `status` shows) out of step with the jobs. Returns each problem in words, none
    /// when the queue is sound; the database itself is checked with its own tools (`amcheck`).
    pub fn check(&self) -> Result<Vec<String>> {
        self.read_single("check the job counts", |db| {
            db.query(queries::COUNTS_OUT_OF_STEP, &[])?
                .iter()
                .map(|row| {
                    let (queue, state): (String, String) = (row.try_get(0)?, row.try_get(1)?);
                    Ok(ops::count_out_of_step(&queue, &state, row.try_get(2)?))
                })
                .collect()
        })
    }

    /// How far the server's clock is ahead of this machine's (negative: behind), read around
    /// one round trip (the server's reading taken as made halfway). Every decision uses the
    /// callers' clocks (DECISIONS §15): a worker whose clock is off from the others' (here,
    /// from the server's) sees leases expire early or jobs come due late.
    pub fn clock_offset(&self) -> Result<time::Duration> {
        let before = crate::job::now();
        let server_us: i64 = self.read_single("read the server's clock", |db| {
            let rows = db.query(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
                &[],
            )?;
            Ok(rows[0].try_get(0)?)
        })?;
        let after = crate::job::now();
        let halfway = before + (after - before) / 2;
        let server =
            Timestamp::from_unix_timestamp_nanos(i128::from(server_us) * 1_000).unwrap_or(halfway);
        Ok(server - halfway)
    }

    /// Runs `f` in one read-only repeatable-read transaction (one consistent snapshot). A
    /// read whose connection was lost is run again, a few times, after a pause.
    fn read<T>(&self, op: &'static str, f: impl FnMut(&mut Db) -> TxResult<T>) -> Result<T> {
        self.read_in(op, Snapshot::Transaction, f)
    }

    /// [`PgStorage::read`] for a read of one statement: a statement sees one snapshot on its
    /// own, so it runs outside a transaction, in one round trip instead of three.
    fn read_single<T>(&self, op: &'static str, f: impl FnMut(&mut Db) -> TxResult<T>) -> Result<T> {
        self.read_in(op, Snapshot::Statement, f)
    }

    fn read_in<T>(
        &self,
        op: &'static str,
        snapshot: Snapshot,
        mut f: impl FnMut(&mut Db) -> TxResult<T>,
    ) -> Result<T> {
        let mut lost = 0;
        loop {
            if lost > 0 {
                pause(lost - 1);
            }
            let mut conn = self.connection(op)?;
            let Conn {
                link, statements, ..
            } = &mut *conn;
            let result = (|| {
                let mut db = match snapshot {
                    Snapshot::Statement => Db::single(link, statements, &self.quoted),
                    Snapshot::Transaction => Db::begin(
                        link,
                        statements,
                        &self.quoted,
                        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                    ),
                };
                self.check_schema_with(&mut db);
                let out = f(&mut db)?;
                db.commit()?;
                Ok(out)
            })();
            match result {
                // Nothing was applied: once the schema is made current, run again.
                Err(TxError::Unchecked(_)) => {
                    drop(conn);
                    self.migrate()?;
                }
                Err(TxError::Db(e)) if is_connection_error(&e) && lost < CONNECTION_RETRIES => {
                    lost += 1;
                }
                result => return result.map_err(|e| self.error(op, e)),
            }
        }
    }

    /// Blocks until the version has moved from `seen` (with [`Heard::Work`], its work part),
    /// or `timeout` passes; returns the version then, or `seen`.
    fn wait_for(&self, heard: Heard, seen: u64, timeout: Duration) -> Result<u64> {
        // A timeout too long to represent as an instant is as good as forever.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Read before looking, so a notification in between still ends the wait.
            let generation = self.listener.generation(heard);
            let current = self.change_version()?;
            let moved = match heard {
                Heard::Any => current != seen,
                Heard::Work => queries::work_part(current) != queries::work_part(seen),
            };
            if moved {
                return Ok(current);
            }
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Ok(seen);
            }
            self.listener
                .wait(heard, generation, left.min(self.poll_interval));
        }
    }

    /// Has `db` check the schema with its first round trip, until a check found it current.
    fn check_schema_with<'a>(&'a self, db: &mut Db<'a>) {
        if !self.schema_checked.load(Ordering::Acquire) {
            db.check_schema(&self.schema_checked);
        }
    }

    fn error(&self, op: &'static str, error: TxError) -> StorageError {
        let (fault, source): (_, Box<dyn std::error::Error + Send + Sync>) = match error {
            TxError::Storage(error) => return error,
            TxError::Db(error) | TxError::Unchecked(error) => (fault_of(&error), Box::new(error)),
            TxError::Decode(reason) => (DatabaseFault::Corrupt, reason.into()),
            TxError::Resettled(_) => (
                DatabaseFault::Other,
                "the settings kept changing while the jobs were built".into(),
            ),
        };
        StorageError::Postgres {
            op,
            database: self.database.clone(),
            fault,
            source,
        }
    }

    // ----- transitions -----

    /// Records `settlements`. The statements of `also` (reads) run in the round trip that
    /// locks the jobs, and their rows are returned.
    fn settle_in(
        tx: &mut Tx,
        settlements: &[Settlement],
        now: Timestamp,
        also: &[(&str, &[Param])],
    ) -> TxResult<(Vec<Result<Job>>, rows::Answers)> {
        let ids = settlements.iter().map(|s| s.lease().job_id.as_str());
        let (mut jobs, answers) = tx.lock_jobs_noting_dependents(ids, also)?;
        let mut outcomes = Vec::with_capacity(settlements.len());
        let mut pairs = Vec::new();
        let mut attempts = Vec::new();
        for settlement in settlements {
            let lease = settlement.lease();
            let checked = match jobs.get(&lease.job_id) {
                Some(old) => rules::check_lease(old, lease).map(|()| old.clone()),
                None => Err(lost(lease)),
            };
            match checked {
                Ok(old) => {
                    let mut job = old.clone();
                    let attempt = rules::settle(&mut job, settlement, now);
                    attempts.push((job.seq, attempt));
                    jobs.insert(job.id.clone(), job.clone());
                    outcomes.push(Ok(pairs.len()));
                    pairs.push((old, job));
                }
                Err(error) => outcomes.push(Err(error)),
            }
        }
        tx.update_jobs(&mut pairs, now)?;
        tx.insert_attempts(&mut attempts)?;
        let settled = outcomes
            .into_iter()
            .map(|outcome| outcome.map(|i| pairs[i].1.clone()))
            .collect();
        Ok((settled, answers))
    }

    /// Settles, then claims for `request`. The queues a claim may take from are read in the
    /// round trip that locks the settled jobs, before anything is written; with `polling`, so
    /// are the worker's registration and the change version, and nothing is claimed once the
    /// worker is asked to stop.
    fn settle_then_claim(
        &self,
        tx: &mut Tx,
        settlements: &[Settlement],
        request: &ClaimRequest,
        now: Timestamp,
        polling: bool,
    ) -> TxResult<Turn> {
        let worker: &str = &request.worker;
        let worker: [Param; 1] = [&worker];
        let claiming = request.max > 0;
        if claiming {
            // With the queues read, whether a settlement made room others wait for is known.
            tx.give_no_work();
        }
        // What is read with the lock, in one statement (see `VERSION_WORKER_AND_QUEUES`).
        let also: &[(&str, &[Param])] = match (polling, claiming) {
            (true, true) => &[(queries::VERSION_WORKER_AND_QUEUES, &worker)],
            (true, false) => &[(queries::VERSION_AND_WORKER, &worker)],
            (false, true) => &[(queries::CLAIMABLE_QUEUES, &[])],
            (false, false) => &[],
        };
        let (settled, answers) = Self::settle_in(tx, settlements, now, also)?;
        let rows = answers.into_iter().next().unwrap_or_default();
        let poll = if polling {
            Some(match rows.first() {
                Some(row) => {
                    rows::polled(row).map_err(|e| self.error("read a worker's registration", e))
                }
                None => return Err(TxError::Decode("the version was not read".to_owned())),
            })
        } else {
            None
        };
        let request = match &poll {
            Some(poll) => request.unless_stopping(poll),
            None => request.clone(),
        };
        let queues = if claiming {
            let queues =
                rows::claimable_queues(&rows, if polling { rows::POLLED_COLUMNS } else { 0 })?;
            if makes_awaited_room(&queues, &settled) {
                tx.give_work();
            }
            Some(queues)
        } else {
            None
        };
        let claimed = Self::claim_in(tx, &request, now, queues)?;
        Ok(Turn {
            settled,
            claimed,
            poll,
        })
    }

    /// Claims jobs for `request`. `queues` are what [`queries::CLAIMABLE_QUEUES`] read if
    /// this transaction read it already; counts are only written at commit, so rows read
    /// before this transaction's settlements are as good as rows read after them.
    fn claim_in(
        tx: &mut Tx,
        request: &ClaimRequest,
        now: Timestamp,
        queues: Option<Vec<rows::QueueCounts>>,
    ) -> TxResult<Vec<Job>> {
        if request.max == 0 {
            return Ok(Vec::new());
        }
        // Index bookkeeping, not a change anyone sees: it does not count as one.
        tx.promote_due(now);
        let read = match queues {
            Some(queues) => queues,
            None => rows::claimable_queues(&tx.query(queries::CLAIMABLE_QUEUES, &[])?, 0)?,
        };
        let mut queues = Vec::new();
        // The counts as stored, plus what settlements earlier in this transaction changed.
        for queue in read {
            let name = queue.name;
            let waiting = queue.waiting
                + tx.pending_count(&name, JobState::Pending)
                + tx.pending_count(&name, JobState::Failed);
            let running = queue.running + tx.pending_count(&name, JobState::Processing);
            if waiting > 0 && !queue.paused && request.takes(&name) {
                queues.push((name, running, queue.limit));
            }
        }
        // Claims of a limited queue follow one another: each locks the queue's settings, then
        // counts what runs (what the claims before it committed included).
        let limited: Vec<&str> = queues
            .iter()
            .filter(|(_, _, limit)| *limit > 0)
            .map(|(name, _, _)| name.as_str())
            .collect();
        if !limited.is_empty() {
            // One round trip: the count runs after the lock was granted (its own snapshot).
            let [locked, counted] = tx.query_all([
                (queries::LOCK_LIMITED, &[&limited]),
                (queries::RUNNING_IN, &[&limited]),
            ])?;
            let mut settings = HashMap::new();
            for row in &locked {
                let (name, setting) = rows::settings_from_row(row)?;
                settings.insert(name, setting);
            }
            let mut running = HashMap::new();
            for row in counted {
                let name = row.try_get::<_, String>(0)?;
                let stored = row.try_get::<_, i64>(1)?;
                let pending = tx.pending_count(&name, JobState::Processing);
                running.insert(name, stored + pending);
            }
            queues.retain_mut(|(name, now_running, limit)| {
                if *limit == 0 {
                    return true;
                }
                let (paused, current) = settings.get(name).copied().unwrap_or_default();
                *limit = i64::from(current);
                *now_running = running.get(name).copied().unwrap_or(0);
                !paused
            });
        }
        let rooms: Vec<(String, i64)> = queues
            .into_iter()
            .filter_map(|(name, running, limit)| {
                let room = rules::room_in_queue(
                    u32::try_from(limit).unwrap_or(u32::MAX),
                    usize::try_from(running).unwrap_or(0),
                    request.max,
                );
                (room > 0).then(|| (name, i64::try_from(room).unwrap_or(i64::MAX)))
            })
            .collect();
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let mut picked = rows::pick_ready(tx, &rooms, now)?;
        // The first jobs of each queue, merged in claim order.
        picked.sort_unstable_by_key(|job| (std::cmp::Reverse(job.priority), job.run_at, job.seq));
        if picked.len() > request.max {
            // Jobs locked and not kept: a worker that skipped them while they were locked
            // must hear that they are still there.
            tx.give_work();
            picked.truncate(request.max);
        }
        let mut pairs: Vec<(Job, Job)> = picked
            .into_iter()
            .map(|old| {
                let mut job = old.clone();
                rules::claim(&mut job, &request.worker, request.lease_for, now);
                (old, job)
            })
            .collect();
        tx.update_jobs(&mut pairs, now)?;
        Ok(pairs.into_iter().map(|(_, job)| job).collect())
    }

    fn recover_in(
        tx: &mut Tx,
        picked: Vec<Job>,
        why: Abandoned,
        now: Timestamp,
    ) -> TxResult<Vec<Job>> {
        let mut attempts = Vec::with_capacity(picked.len());
        let mut pairs: Vec<(Job, Job)> = picked
            .into_iter()
            .map(|old| {
                let mut job = old.clone();
                attempts.push((job.seq, rules::recover(&mut job, why, now)));
                (old, job)
            })
            .collect();
        tx.update_jobs(&mut pairs, now)?;
        tx.insert_attempts(&mut attempts)?;
        Ok(pairs.into_iter().map(|(_, job)| job).collect())
    }
}

/// Whether one of the `settled` jobs ran in a queue with a limit, as `queues` (read by
/// [`queries::CLAIMABLE_QUEUES`]) tell: the room it left is work for whoever waits for it.
/// Whether jobs wait there is not asked: one enqueued after the counts were read, by a
/// transaction that woke a worker before this one freed the room, would be missed.
fn makes_awaited_room(queues: &[rows::QueueCounts], settled: &[Result<Job>]) -> bool {
    queues.iter().any(|queue| {
        queue.limit > 0
            && settled
                .iter()
                .any(|job| job.as_ref().is_ok_and(|job| job.queue == queue.name))
    })
}

fn lost(lease: &Lease) -> StorageError {
    StorageError::LeaseLost {
        id: lease.job_id.clone(),
    }
}

/// Pauses before the `n`th retry (0-based) of an operation whose connection was lost.
fn pause(n: u32) {
    std::thread::sleep(FIRST_PAUSE * 4u32.pow(n));
}

/// Schema names the store accepts: they need no quoting rules beyond the quotes themselves,
/// and double as the name of the notification channel.
fn check_schema_name(name: &str, database: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(StorageError::Conflict {
            path: PathBuf::from(database),
            reason: format!(
                "the schema name {name:?} is not one of lowercase ASCII letters, digits and \
                 `_` (at most 63, not starting with a digit)"
            ),
        })
    }
}

/// The database of `config` in words: `postgres://user@host:port/dbname`, never the password.
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let dbname = config.get_dbname().unwrap_or_default();
    format!("postgres://{user}{}/{dbname}", hosts.join(","))
}

/// Whether the connection broke (or the server is going away): what an idempotent
/// operation may retry on a new connection.
fn is_connection_error(error: &postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(code) = error.code() {
        return code.code().starts_with("08")
            || [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
            ]
            .contains(code);
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Whether PostgreSQL aborted the transaction for a conflict with a concurrent one, so that
/// running it again (from the start) is safe.
fn is_conflict(error: &postgres::Error) -> bool {
    error.code().is_some_and(|code| {
        [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::UNIQUE_VIOLATION,
        ]
        .contains(code)
    })
}

/// A PostgreSQL error in words a user can act on.
fn fault_of(error: &postgres::Error) -> DatabaseFault {
    if tls::is_handshake_failure(error) {
        return DatabaseFault::Tls;
    }
    if is_connection_error(error) {
        return DatabaseFault::Unreachable;
    }
    let Some(code) = error.code() else {
        return DatabaseFault::Other;
    };
    // pg_hba.conf has `hostssl` lines only for this client. The words are the server's (in
    // English unless `lc_messages` says otherwise): without them, the refusal is the login's.
    let unencrypted = error
        .as_db_error()
        .is_some_and(|db| db.message().ends_with(", no encryption"));
    let login = [
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
    ];
    if code == &SqlState::INVALID_AUTHORIZATION_SPECIFICATION && unencrypted {
        DatabaseFault::NeedsTls
    } else if login.contains(code) {
        DatabaseFault::LoginRefused
    } else if code == &SqlState::INVALID_CATALOG_NAME {
        DatabaseFault::NoDatabase
    } else if [SqlState::DISK_FULL, SqlState::OUT_OF_MEMORY].contains(code) {
        DatabaseFault::DiskFull
    } else if [SqlState::DATA_CORRUPTED, SqlState::INDEX_CORRUPTED].contains(code) {
        DatabaseFault::Corrupt
    } else if [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::QUERY_CANCELED,
    ]
    .contains(code)
    {
        DatabaseFault::Busy
    } else if [
        SqlState::INSUFFICIENT_PRIVILEGE,
        SqlState::READ_ONLY_SQL_TRANSACTION,
    ]
    .contains(code)
    {
        DatabaseFault::Denied
    } else {
        DatabaseFault::Other
    }
}

impl fmt::Debug for PgStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStorage")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStorage {
    fn drop(&mut self) {
        let pool = &self.pool;
        self.listener.stop(|channel| {
            pool.get().is_ok_and(|conn| {
                let notify = format!("NOTIFY \"{channel}\"");
                conn.link.simple(&notify).is_ok()
            })
        });
    }
}

impl Storage for PgStorage {
    fn submit(&self, jobs: Vec<NewJob>, now: Timestamp) -> Result<Vec<Enqueued>> {
        for job in &jobs {
            job.validate()?;
        }
        let ids: Vec<JobId> = jobs
            .iter()
            .map(|new| new.id.clone().unwrap_or_else(JobId::generate))
            .collect();
        let simple = jobs
            .iter()
            .all(|new| new.unique_key.is_none() && new.after.is_empty());
        let plain = jobs.len() > 1 && simple;
        let alone = jobs.len() == 1 && simple;
        let generated = jobs.iter().all(|new| new.id.is_none());
        // The jobs the one-job insert sent and lost the answer for: its `COMMIT` goes in the
        // same round trip, so each may have gone in.
        let unanswered: std::cell::RefCell<Vec<Job>> = std::cell::RefCell::new(Vec::new());
        self.write("enqueue jobs", |tx| {
            if alone {
                // One job with no key and no dependency, what a `queuectl enqueue` mostly
                // adds: built with the settings last seen here (a handle that saw none takes
                // none to be stored, as on a new queue), then inserted if they are still
                // the stored ones, counted and committed, in one round trip.
                let assumed = self.settings.lock().clone().unwrap_or_default();
                let mut job = rules::new_job(
                    jobs[0].clone(),
                    ids[0].clone(),
                    0,
                    &[],
                    &assumed.config,
                    now,
                );
                let keep = self.pool.max_size() >= 2;
                let inserted = tx.insert_job_and_commit(&mut job, &assumed, keep, now);
                match &inserted {
                    Err(rows::TxError::Resettled(stored)) => {
                        *self.settings.lock() = Some(stored.clone());
                    }
                    Err(rows::TxError::Db(error)) if is_connection_error(error) => {
                        unanswered.borrow_mut().push(job.clone());
                    }
                    _ => {}
                }
                if !inserted? {
                    // Sent again, the insert finds its id taken: by the job a send whose
                    // answer was lost added, if it is that job.
                    if !unanswered.borrow().is_empty()
                        && let Some(stored) =
                            rows::select_jobs(tx, queries::BY_ID, &[&job.id.as_str()])?.pop()
                        && unanswered
                            .borrow()
                            .iter()
                            .any(|sent| same_enqueue(&stored, sent))
                    {
                        return Ok(vec![Enqueued {
                            job: stored,
                            duplicate: false,
                        }]);
                    }
                    return Err(StorageError::AlreadyExists { id: ids[0].clone() }.into());
                }
                self.settings.lock().get_or_insert(assumed);
                return Ok(vec![Enqueued {
                    job,
                    duplicate: false,
                }]);
            }
            rows::prepare_enqueue(tx, plain, generated);
            let known = if plain {
                self.settings.lock().clone()
            } else {
                None
            };
            let config = match &known {
                Some(settings) => settings.config.clone(),
                None => {
                    let stored = rows::settings(tx, false)?;
                    let config = stored.config.clone();
                    if plain {
                        *self.settings.lock() = Some(stored);
                    }
                    config
                }
            };
            if plain {
                // No key to look up and no dependency to check: one statement for all.
                let mut created: Vec<Job> = jobs
                    .iter()
                    .zip(&ids)
                    .map(|(new, id)| rules::new_job(new.clone(), id.clone(), 0, &[], &config, now))
                    .collect();
                let inserted = tx.insert_jobs(&mut created, generated, known.as_ref(), now);
                if let Err(rows::TxError::Resettled(stored)) = &inserted {
                    *self.settings.lock() = Some(stored.clone());
                }
                if let Some(id) = inserted? {
                    return Err(StorageError::AlreadyExists { id }.into());
                }
                return Ok(created
                    .into_iter()
                    .map(|job| Enqueued {
                        job,
                        duplicate: false,
                    })
                    .collect());
            }
            let mut entries = Vec::with_capacity(jobs.len());
            for (new, id) in jobs.iter().zip(&ids) {
                // At most a few rounds: each ends with the job added, a holder of its key
                // found, or its id taken; a round runs again only when what stood in the way
                // of the insert was gone by the time it looked.
                let mut rounds = 0;
                let entry = loop {
                    if let Some(key) = &new.unique_key
                        && let Some(mut holder) =
                            rows::select_jobs(tx, queries::UNIQUE_HOLDER, &[key])?.pop()
                    {
                        holder.output = rows::last_output(tx, holder.seq)?;
                        break Enqueued {
                            job: holder,
                            duplicate: true,
                        };
                    }
                    // Locked against changes: a dependency cannot end, or go, unseen before
                    // this job is committed as its dependent.
                    let dependencies = rows::dependency_states(tx, &new.after, true)?;
                    rules::check_dependencies(new.id.as_ref(), &dependencies)?;
                    let mut job =
                        rules::new_job(new.clone(), id.clone(), 0, &dependencies, &config, now);
                    if tx.insert_job(&mut job, now)? {
                        break Enqueued {
                            job,
                            duplicate: false,
                        };
                    }
                    if rows::job_by_id(tx, id)?.is_some() {
                        return Err(StorageError::AlreadyExists { id: id.clone() }.into());
                    }
                    rounds += 1;
                    if rounds == 100 {
                        return Err(TxError::Decode(format!(
                            "job {id} could neither be added nor found in the way"
                        )));
                    }
                };
                entries.push(entry);
            }
            Ok(entries)
        })
    }

    fn claim_jobs(&self, request: &ClaimRequest, now: Timestamp) -> Result<Vec<Job>> {
        if request.max == 0 {
            return Ok(Vec::new());
        }
        self.write("claim jobs", |tx| {
            tx.give_no_work();
            Self::claim_in(tx, request, now, None)
        })
    }

    fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
        now: Timestamp,
    ) -> Result<Vec<JobId>> {
        self.write("extend leases", |tx| {
            tx.give_no_work();
            let ids = leases.iter().map(|lease| lease.job_id.as_str());
            let jobs = rows::jobs_by_ids(tx, ids, queries::BY_IDS_FOR_UPDATE)?;
            let mut lost = Vec::new();
            let mut pairs = Vec::new();
            for lease in leases {
                match jobs.get(&lease.job_id) {
                    Some(old) if rules::check_lease(old, lease).is_ok() => {
                        let mut job = old.clone();
                        rules::extend_lease(&mut job, lease_for, now);
                        pairs.push((old.clone(), job));
                    }
                    _ => lost.push(lease.job_id.clone()),
                }
            }
            tx.update_jobs(&mut pairs, now)?;
            Ok(lost)
        })
    }

    fn settle(&self, settlements: Vec<Settlement>, now: Timestamp) -> Result<Vec<Result<Job>>> {
        self.write("record job results", |tx| {
            // With the queues read, whether the settlements made room others wait for is
            // known: only then (or when a job waits to run again) are idle workers woken.
            tx.give_no_work();
            let queues: [(&str, &[Param]); 1] = [(queries::CLAIMABLE_QUEUES, &[])];
            let (settled, answers) = Self::settle_in(tx, &settlements, now, &queues)?;
            let awaited = match answers.into_iter().next() {
                Some(rows) => makes_awaited_room(&rows::claimable_queues(&rows, 0)?, &settled),
                None => true,
            };
            if awaited {
                tx.give_work();
            }
            Ok(settled)
        })
    }

    /// Settlements and claims each take a pooled connection, and the server runs them at
    /// once: with two connections or more in the pool.
    fn writes_concurrently(&self) -> bool {
        self.pool.max_size() >= 2
    }

    fn settle_and_claim(
        &self,
        settlements: Vec<Settlement>,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<(Vec<Result<Job>>, Vec<Job>)> {
        self.write("record job results and claim jobs", |tx| {
            let turn = self.settle_then_claim(tx, &settlements, request, now, false)?;
            Ok((turn.settled, turn.claimed))
        })
    }

    fn settle_and_claim_polling(
        &self,
        settlements: Vec<Settlement>,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<Polled> {
        self.write("record job results and claim jobs", |tx| {
            let turn = self.settle_then_claim(tx, &settlements, request, now, true)?;
            Ok(Polled {
                settled: turn.settled,
                claimed: turn.claimed,
                poll: turn
                    .poll
                    .expect("a polling settlement reads the registration"),
            })
        })
    }

    fn record_output(&self, chunks: &[OutputChunk]) -> Result<Vec<JobId>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        self.write("record live output", |tx| {
            tx.give_no_work();
            // Locked against a settlement, which ends the attempt and drops its live output.
            let ids = chunks.iter().map(|chunk| chunk.lease.job_id.as_str());
            let jobs = rows::jobs_by_ids(tx, ids, queries::BY_IDS_FOR_SHARE)?;
            let mut lost = Vec::new();
            for chunk in chunks {
                match jobs.get(&chunk.lease.job_id) {
                    Some(job) if rules::check_lease(job, &chunk.lease).is_ok() => {
                        tx.append_output(job.seq, chunk)?;
                    }
                    _ => lost.push(chunk.lease.job_id.clone()),
                }
            }
            Ok(lost)
        })
    }

    fn output_since(&self, id: &JobId, offset: u64) -> Result<RunningOutput> {
        self.read("read a job's live output", |db| {
            ops::output_since(db, id, offset)
        })
    }

    fn recover_expired(&self, now: Timestamp) -> Result<Vec<Job>> {
        self.write("recover expired leases", |tx| {
            let picked = rows::select_jobs(tx, queries::EXPIRED, &[&micros(now)])?;
            Self::recover_in(tx, picked, Abandoned::LeaseExpired, now)
        })
    }

    fn recover_worker(&self, worker: &str, now: Timestamp) -> Result<Vec<Job>> {
        self.write("recover a dead worker's jobs", |tx| {
            let picked = rows::select_jobs(tx, queries::OF_WORKER, &[&worker])?;
            Self::recover_in(tx, picked, Abandoned::WorkerDied, now)
        })
    }

    fn get(&self, id: &JobId) -> Result<Job> {
        self.read("read a job", |db| ops::get(db, id))
    }

    fn attempts(&self, id: &JobId) -> Result<Vec<Attempt>> {
        self.read("read a job's attempts", |db| ops::attempts(db, id))
    }

    fn list(&self, query: &ListQuery) -> Result<Vec<Job>> {
        let limit = query
            .limit
            .map(|limit| i64::try_from(limit).unwrap_or(i64::MAX));
        let offset = i64::try_from(query.offset).unwrap_or(i64::MAX);
        let page = queries::page(
            query.state.is_some(),
            query.queue.is_some(),
            query.newest_first,
        );
        let state = query.state.map(JobState::as_str);
        let queue = query.queue.as_deref();
        self.read_single("list jobs", |db| {
            rows::select_jobs(db, &page, &[&state, &queue, &limit, &offset])
        })
    }

    fn counts(&self) -> Result<StateCounts> {
        self.read_single("count jobs", |db| ops::state_counts(db))
    }

    fn queues(&self) -> Result<Vec<QueueInfo>> {
        self.read("list queues", rows::queues)
    }

    fn activity(&self, since: Timestamp) -> Result<Activity> {
        self.read("read the recent history", |db| rows::activity(db, since))
    }

    fn change_queues(
        &self,
        names: Option<&[String]>,
        change: QueueChange,
    ) -> Result<Vec<QueueInfo>> {
        if let Some(names) = names {
            for name in names {
                crate::job::check_queue_name(name)?;
            }
        }
        self.write("change queue settings", |tx| {
            crate::ops::change_queues(tx, names, change)
        })
    }

    fn next_due(&self, after: Timestamp) -> Result<Option<Timestamp>> {
        self.read_single("find the next due job", |db| rows::next_due(db, after))
    }

    fn retry_dead(&self, ids: Option<&[JobId]>, now: Timestamp) -> Result<Vec<Job>> {
        self.write("retry dead jobs", |tx| match ids {
            Some(ids) => {
                let targets = crate::ops::checked(tx, ids, rules::check_retry)?;
                crate::ops::rerun(tx, targets, now)
            }
            None => {
                let dead = rows::select_jobs(tx, queries::DEAD, &[])?;
                crate::ops::retry_all_dead(tx, dead, now)
            }
        })
    }

    fn cancel(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>> {
        self.write("cancel jobs", |tx| crate::ops::cancel(tx, ids, now))
    }

    fn remove(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<JobId>> {
        self.write("remove jobs", |tx| crate::ops::remove(tx, ids, now))
    }

    fn retry(&self, ids: &[JobId], now: Timestamp) -> Result<Vec<Job>> {
        self.write("retry jobs", |tx| {
            let targets = crate::ops::checked(tx, ids, rules::check_rerun)?;
            crate::ops::rerun(tx, targets, now)
        })
    }

    fn clear_dead(&self, now: Timestamp) -> Result<usize> {
        self.write("delete dead jobs", |tx| {
            let dead = rows::select_jobs(tx, queries::DEAD, &[])?;
            tx.delete_jobs(&dead, Some(now))?;
            Ok(dead.len())
        })
    }

    fn purge_completed(&self, finished_before: Timestamp) -> Result<usize> {
        self.write("purge completed jobs", |tx| tx.purge(finished_before))
    }

    fn config(&self) -> Result<Config> {
        self.read_single("read the settings", |db| rows::config(db, false))
    }

    fn update_config(
        &self,
        update: &mut dyn FnMut(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<Config> {
        self.write("change the settings", |tx| {
            crate::ops::update_config(tx, update)
        })
    }

    // A worker coming or staying gives no other worker anything to claim: quiet changes,
    // which idle workers sleep through (a stop request, which is work, goes through
    // `request_stop`).
    fn register_worker(&self, worker: WorkerInfo) -> Result<()> {
        self.write("register a worker", |tx| {
            tx.give_no_work();
            tx.put_worker(&worker)
        })
    }

    fn worker_heartbeat(&self, worker: &str, now: Timestamp) -> Result<bool> {
        self.write("record a worker heartbeat", |tx| {
            tx.give_no_work();
            crate::ops::worker_heartbeat(tx, worker, now)
        })
    }

    fn deregister_worker(&self, worker: &str) -> Result<()> {
        // Work, unlike registering: the pool's own waker, waiting for work, wakes at it and
        // sees the pool closing (`Dispatcher::finish`).
        self.write("deregister a worker", |tx| {
            tx.write("DELETE FROM {s}.workers WHERE id = $1", &[&worker])?;
            Ok(())
        })
    }

    fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.read_single("list workers", |db| rows::workers(db, "ORDER BY id", &[]))
    }

    fn request_stop(&self) -> Result<usize> {
        self.write("ask workers to stop", |tx| crate::ops::request_stop(tx))
    }

    fn change_version(&self) -> Result<u64> {
        self.read_single("look for changes", |db| {
            let version: i64 = db.query(queries::VERSION, &[])?[0].try_get(0)?;
            Ok(version as u64)
        })
    }

    fn poll_worker(&self, worker: &str) -> Result<(u64, Option<WorkerInfo>)> {
        self.read_single("look for changes and stop requests", |db| {
            match db.query(queries::VERSION_AND_WORKER, &[&worker])?.first() {
                Some(row) => rows::polled(row),
                None => Err(TxError::Decode("no version read".to_owned())),
            }
        })
    }

    fn wait_for_change(&self, seen: u64, timeout: Duration) -> Result<u64> {
        self.wait_for(Heard::Any, seen, timeout)
    }

    /// Changes announced on the work channel only, counted in the version's high half
    /// (`queries::work_part`): a job finishing elsewhere does not end the wait.
    fn wait_for_work(&self, seen: u64, timeout: Duration) -> Result<u64> {
        self.wait_for(Heard::Work, seen, timeout)
    }
}
