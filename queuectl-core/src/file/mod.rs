//! `FileStorage`: the durable embedded default, one SQLite database in a directory.
//!
//! The directory holds `queuectl.db` (and, while it is open, SQLite's `queuectl.db-wal` and
//! `queuectl.db-shm`); the schema is documented in `docs/schema.md`. The database runs in WAL
//! mode with `synchronous=FULL`, so a method that returned `Ok` has its change on disk, and
//! readers never wait for writers.
//!
//! Every [`Storage`] method is one transaction (`BEGIN IMMEDIATE` when it writes), on the
//! handle's one connection. What a transition does to a job is a rule of the crate's `rules` module,
//! shared with [`MemoryStorage`](crate::MemoryStorage); SQL only selects the rows a transition
//! applies to (through an index), and writes back the columns the rule changed. Per-state
//! counts are kept in a table updated by the same transactions, so `counts` reads five rows.

mod home;
mod legacy;
mod queries;
pub(crate) mod rows;
mod schema;
mod watch;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use self::home::Home;
use self::rows::{Tx, TxError, TxResult, micros};
use self::watch::Notifier;
use crate::config::{Config, ConfigError};
use crate::error::{DatabaseFault, Result, StorageError};
use crate::job::{Attempt, AttemptOutcome, Job, JobId, JobState, Lease, NewJob, Timestamp};
use crate::ops;
use crate::rules::{self, Abandoned};
use crate::storage::{
    Activity, ClaimRequest, Enqueued, ListQuery, OutputChunk, QueueChange, QueueInfo,
    RunningOutput, Settlement, StateCounts, Storage, WorkerInfo,
};

pub use self::schema::SCHEMA_VERSION;

/// How many times an operation is re-run after SQLite reported the store busy past its busy
/// timeout (each run waits up to the timeout again).
const BUSY_RETRIES: u32 = 2;
/// The shortest [`FileOptions::poll_interval`] used.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The WAL is truncated to this size after a checkpoint, so a burst does not leave it large.
const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

/// How to open a [`FileStorage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// Create the store when the directory is absent or empty (default). Without it, opening
    /// such a directory is [`StorageError::NoStore`] and creates nothing.
    pub create: bool,
    /// Open without ever writing (for commands that only read, on stores they cannot or must
    /// not change). Implies no `create`; every mutating method is [`StorageError::ReadOnly`].
    pub read_only: bool,
    /// How long an operation waits for another process's write transaction to finish before
    /// it fails as busy.
    pub busy_timeout: Duration,
    /// Longest a [`Storage::wait_for_change`] goes without looking at the store again (at
    /// least 10 ms). It
    /// wakes on file events (any commit, by any process, writes the database's WAL file); this
    /// bounds the wait should an event be lost, and how soon an idle waiter notices that its
    /// database was deleted.
    pub poll_interval: Duration,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            create: true,
            read_only: false,
            busy_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
        }
    }
}

impl FileOptions {
    /// Options for a command that only reads: never creates a store, never writes.
    pub fn read_only() -> Self {
        Self {
            create: false,
            read_only: true,
            ..Self::default()
        }
    }
}

/// What opening a store of the journal format (version 1) imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// How many jobs were imported.
    pub jobs: usize,
    /// Where the old files were moved.
    pub moved_to: PathBuf,
    /// A torn last journal record that was dropped (an operation that never returned), in
    /// words.
    pub dropped_tail: Option<String>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "imported {} job(s) from the journal of an earlier version; its files were moved to {}",
            self.jobs,
            self.moved_to.display()
        )?;
        if let Some(tail) = &self.dropped_tail {
            write!(f, " (dropped a torn last record: {tail})")?;
        }
        Ok(())
    }
}

/// What `queuectl check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The database file.
    pub path: PathBuf,
    /// Each problem, in words; empty when the store is sound.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A store in a directory on local disk, safe to share between threads, handles and processes.
///
/// See the [module documentation](self) for the design. Opening a directory that is absent or
/// empty creates a store in it (the directory with mode 0700, files with 0600); a directory
/// that holds anything else is refused untouched ([`StorageError::NotAStore`]).
///
/// ```
/// use queuectl_core::{FileStorage, NewJob, Storage, StorageExt, now};
/// let dir = tempfile::tempdir()?;
/// let store = FileStorage::open(dir.path().join("queue"))?;
/// store.enqueue(NewJob::new("echo hi").id("hi")?, now())?;
/// drop(store);
/// let again = FileStorage::open(dir.path().join("queue"))?;
/// assert_eq!(again.get(&"hi".parse()?)?.command, "echo hi");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct FileStorage {
    dir: PathBuf,
    db_path: PathBuf,
    read_only: bool,
    poll_interval: Duration,
    /// Size and modification time of the database when a handle opened it as `immutable`
    /// (read-only, without the shared memory of WAL readers): any change ends its use.
    frozen: Option<(u64, std::time::SystemTime)>,
    /// Device and inode of the database file when it was opened.
    identity: (u64, u64),
    /// Set once the file at `db_path` is no longer the one this handle has open.
    moved: AtomicBool,
    conn: Mutex<Connection>,
    /// Committed transactions of this handle that changed something (`PRAGMA data_version`
    /// counts only other connections' commits).
    local_changes: AtomicU64,
    /// The files this handle writes to after each commit that changed something, to wake
    /// waiters in every process: the wake file, and the work file too after a commit that may
    /// give a worker something to do (`None` when read-only).
    wake: Option<(fs::File, fs::File)>,
    /// Wakes this handle's waiters on other handles' commits.
    notifier: Notifier,
    imported: Option<ImportReport>,
}

impl FileStorage {
    /// Opens the store in `dir`, creating it if the directory is absent or empty.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, FileOptions::default())
    }

    /// Opens the store in `dir` as `options` say.
    pub fn open_with(dir: impl AsRef<Path>, options: FileOptions) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        let db_path = dir.join(schema::DB_FILE);
        let create = options.create && !options.read_only;
        let mut legacy_store = None;
        loop {
            match home::classify(&dir)? {
                Home::Absent | Home::Empty if !create => {
                    return Err(StorageError::NoStore { path: dir });
                }
                Home::Legacy if options.read_only => {
                    return Err(StorageError::ReadOnly {
                        op: "import the queue of an earlier version (run it as a user who may write it)",
                        path: dir,
                    });
                }
                Home::Absent => {
                    if !home::create_dir(&dir)? {
                        // Someone else created it meanwhile: look at what it is now.
                        continue;
                    }
                    home::create_db_file(&db_path)?;
                }
                Home::Empty => home::create_db_file(&db_path)?,
                Home::Legacy => {
                    // Read (and so validate) the old store before creating anything, under
                    // its lock so a worker of the old version cannot append meanwhile.
                    let lock = legacy::lock(&dir)?;
                    let old = legacy::read_store(&dir)?;
                    home::create_db_file(&db_path)?;
                    legacy_store = Some((old, lock));
                }
                Home::Store => {}
            }
            break;
        }
        let (conn, immutable) =
            connect(&db_path, &options).map_err(|e| db_error("open the store", &db_path, e))?;
        // SQLite opens a file it may not write read-only without saying so.
        let read_only = options.read_only
            || conn
                .is_readonly(rusqlite::MAIN_DB)
                .map_err(|e| db_error("open the store", &db_path, e))?;
        let identity = file_identity(&db_path)?;
        let frozen = if immutable {
            Some(file_state(&db_path)?)
        } else {
            None
        };
        let mut store = Self {
            notifier: Notifier::new(&dir),
            dir,
            db_path,
            read_only,
            // A zero interval would make waiting a busy loop.
            poll_interval: options.poll_interval.max(MIN_POLL_INTERVAL),
            identity,
            frozen,
            moved: AtomicBool::new(false),
            conn: Mutex::new(conn),
            local_changes: AtomicU64::new(0),
            wake: None,
            imported: None,
        };
        store.imported = store.prepare(legacy_store, options.busy_timeout)?;
        if !read_only {
            // Only once the database is known to be ours.
            let open = |name| {
                watch::open_wake_file(&store.dir, name).map_err(|source| StorageError::Io {
                    op: "open the wake file",
                    path: store.dir.join(name),
                    source,
                })
            };
            store.wake = Some((open(watch::WAKE_FILE)?, open(watch::WORK_FILE)?));
        }
        Ok(store)
    }

    /// Runs SQLite's integrity check on the store in `dir` (without opening it as a store,
    /// so a store too damaged to open is still examined), and checks the per-state counts.
    pub fn check(dir: impl AsRef<Path>) -> Result<CheckReport> {
        let dir = dir.as_ref();
        let path = dir.join(schema::DB_FILE);
        match home::classify(dir)? {
            Home::Store => {}
            Home::Legacy => {
                return Err(StorageError::ReadOnly {
                    op: "check a queue of an earlier version before it is imported",
                    path: dir.to_owned(),
                });
            }
            Home::Absent | Home::Empty => {
                return Err(StorageError::NoStore {
                    path: dir.to_owned(),
                });
            }
        }
        let mut report = CheckReport {
            path: path.clone(),
            problems: Vec::new(),
        };
        let found = connect(&path, &FileOptions::read_only()).and_then(|(conn, _)| {
            let (_, version) = header(&conn)?;
            if version == 0 {
                return Ok(vec![
                    "the database was never set up (its creation or an import was interrupted); \
                     open the store with a command that may write to finish it"
                        .to_owned(),
                ]);
            }
            let mut problems: Vec<String> = conn
                .prepare("PRAGMA integrity_check")?
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<_>>()?;
            problems.retain(|line| line != "ok");
            if problems.is_empty() {
                let off: Vec<(String, String, i64)> = conn
                    .prepare(
                        "SELECT queue, state, sum(n) FROM ( \
                         SELECT queue, state, jobs AS n FROM counts UNION ALL \
                         SELECT queue, state, -count(*) FROM jobs GROUP BY queue, state) \
                         GROUP BY queue, state HAVING sum(n) != 0 ORDER BY queue, state",
                    )?
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                for (queue, state, off_by) in off {
                    problems.push(crate::ops::count_out_of_step(&queue, &state, off_by));
                }
            }
            Ok(problems)
        });
        match found {
            Ok(problems) => report.problems = problems,
            Err(e) => match db_error("check", &path, e) {
                StorageError::Database {
                    fault: DatabaseFault::Corrupt,
                    source,
                    ..
                } => report
                    .problems
                    .push(format!("the database is unreadable: {source}")),
                other => return Err(other),
            },
        }
        Ok(report)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// Whether this handle was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Copies everything in the WAL into the database file and truncates the WAL (SQLite also
    /// does this on its own as the WAL grows; this is for backups and tests).
    pub fn checkpoint(&self) -> Result<()> {
        let conn = self.conn.lock();
        self.check_identity()?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| db_error("checkpoint", &self.db_path, e))
    }

    /// What opening imported from a store of the journal format, if it did.
    pub fn imported(&self) -> Option<&ImportReport> {
        self.imported.as_ref()
    }

    // ----- opening -----

    /// Checks that the database is ours and of a version this build reads, applies pending
    /// migrations, and imports a version 1 journal found beside a new database.
    ///
    /// Processes creating one store at once can see `SQLITE_BUSY` without SQLite waiting
    /// first (switching a new file to WAL needs it alone); every step is transactional, so the
    /// whole preparation is run again until `busy_timeout` has passed.
    fn prepare(
        &self,
        mut legacy_store: Option<(legacy::LegacyStore, Option<fs::File>)>,
        busy_timeout: Duration,
    ) -> Result<Option<ImportReport>> {
        let deadline = Instant::now() + busy_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.prepare_once(&mut legacy_store) {
                Err(StorageError::Database {
                    fault: DatabaseFault::Busy,
                    ..
                }) if Instant::now() + pause < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                result => return result,
            }
        }
    }

    fn prepare_once(
        &self,
        legacy_store: &mut Option<(legacy::LegacyStore, Option<fs::File>)>,
    ) -> Result<Option<ImportReport>> {
        let mut conn = self.conn.lock();
        let path = &self.db_path;
        // One snapshot: another process creating the store commits its id, version and tables
        // together, so they are seen all or none.
        let (app_id, version, tables) = conn
            .transaction()
            .and_then(|tx| {
                let (app_id, version) = header(&tx)?;
                let tables: i64 =
                    tx.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
                Ok((app_id, version, tables))
            })
            .map_err(|e| self.storage_error("open the store", TxError::Db(e)))?;
        let new = app_id == 0 && version == 0 && tables == 0;
        if app_id != schema::APPLICATION_ID && !new {
            return Err(StorageError::NotAStore {
                path: self.dir.clone(),
                reason: format!("{} is a database of another program", path.display()),
            });
        }
        if version > SCHEMA_VERSION {
            return Err(StorageError::UnsupportedFormat {
                path: path.clone(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version == SCHEMA_VERSION {
            drop(conn);
            return self.finish_import();
        }
        if self.read_only {
            return Err(StorageError::ReadOnly {
                op: "upgrade the store's schema (run any command that may write)",
                path: self.dir.clone(),
            });
        }
        if version == 0 {
            // Both are settings of the file that must be chosen before the first table.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .and_then(|()| conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(())))
                .map_err(|e| db_error("create the database", path, e))?;
        }
        if version == 0 && legacy_store.is_none() && legacy::has_data(&self.dir) {
            // A creation or an import that stopped before its commit: import now.
            let lock = legacy::lock(&self.dir)?;
            *legacy_store = Some((legacy::read_store(&self.dir)?, lock));
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| db_error("upgrade the schema", path, e))?;
        let mut tx = Tx::new(tx);
        let imported = (|| -> TxResult<Option<(usize, Option<String>)>> {
            // Another process may have migrated meanwhile: look again under the write lock.
            let (_, version) = header(&tx)?;
            for migration in &schema::MIGRATIONS[version as usize..] {
                tx.execute_batch(migration)?;
            }
            tx.pragma_update(None, "application_id", schema::APPLICATION_ID)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            match &*legacy_store {
                Some((old, _)) if version == 0 => Ok(Some(import(&mut tx, old)?)),
                _ => Ok(None),
            }
        })()
        .map_err(|e| self.storage_error("upgrade the schema", e))?;
        tx.commit()
            .map_err(|e| db_error("upgrade the schema", path, e))?;
        drop(conn);
        match imported {
            Some((jobs, dropped_tail)) => {
                let moved_to = legacy::move_aside(&self.dir)?;
                // Releases the old store's lock.
                legacy_store.take();
                Ok(Some(ImportReport {
                    jobs,
                    moved_to,
                    dropped_tail,
                }))
            }
            None => Ok(None),
        }
    }

    /// Moves aside the files of an imported version 1 store that are still in place (opening
    /// stopped between the import's commit and the move).
    fn finish_import(&self) -> Result<Option<ImportReport>> {
        if self.read_only || !legacy::has_data(&self.dir) {
            return Ok(None);
        }
        let imported = self.read("open the store", |conn| rows::meta(conn, "imported_from"))?;
        match imported {
            // The import committed but stopped before the old files were moved.
            Some(fingerprint) if fingerprint == legacy::fingerprint(&self.dir)? => {
                legacy::move_aside(&self.dir)?;
                Ok(None)
            }
            _ => Err(StorageError::Conflict {
                path: self.dir.clone(),
                reason: "it holds the journal files of an earlier version besides its database, \
                         and they are not the ones that were imported (is a worker of the \
                         earlier version still running?); stop it, then move `journal` and \
                         `snapshot` out of the directory"
                    .to_owned(),
            }),
        }
    }

    // ----- transactions -----

    /// Fails once the database file at the store's path is not the one this handle has open
    /// (deleted, or replaced by another): writing on would write where nobody looks.
    fn check_identity(&self) -> Result<()> {
        if let Some(frozen) = self.frozen {
            let changed = wal_path(&self.db_path).exists()
                || file_state(&self.db_path).map_or(true, |now| now != frozen);
            if changed {
                return Err(StorageError::StoreChanged {
                    path: self.db_path.clone(),
                });
            }
        }
        if !self.moved.load(Ordering::Relaxed) {
            match file_identity(&self.db_path) {
                Ok(identity) if identity == self.identity => return Ok(()),
                Ok(_) => {}
                Err(StorageError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
            self.moved.store(true, Ordering::Relaxed);
        }
        Err(StorageError::StoreMoved {
            path: self.db_path.clone(),
        })
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction and commits it.
    fn write<T>(&self, op: &'static str, mut f: impl FnMut(&mut Tx) -> TxResult<T>) -> Result<T> {
        if self.read_only {
            return Err(StorageError::ReadOnly {
                op,
                path: self.dir.clone(),
            });
        }
        let mut conn = self.conn.lock();
        self.check_identity()?;
        let before = conn.total_changes();
        let mut tries = 0;
        loop {
            let result = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(TxError::from)
                .and_then(|tx| {
                    let mut tx = Tx::new(tx);
                    let out = f(&mut tx)?;
                    let quiet = tx.commit()?;
                    Ok((out, quiet))
                });
            match result {
                Ok((out, quiet)) => {
                    if conn.total_changes() != before {
                        self.local_changes.fetch_add(1, Ordering::Relaxed);
                        drop(conn);
                        if let Some((wake, work)) = &self.wake {
                            // The change is committed, so the operation succeeded whatever
                            // happens here: a lost wake-up only delays waiters until their
                            // next poll (`FileOptions::poll_interval`). The wake file is
                            // written for work too, for the waiters of earlier versions.
                            // The work file first: a watcher that counts the wake file's
                            // event has counted the work file's.
                            if !quiet {
                                let _ = watch::wake(work);
                            }
                            let _ = watch::wake(wake);
                        }
                    }
                    return Ok(out);
                }
                Err(TxError::Db(e)) if is_busy(&e) && tries < BUSY_RETRIES => tries += 1,
                Err(e) => return Err(self.storage_error(op, e)),
            }
        }
    }

    /// Runs `f` in one read transaction (one consistent snapshot).
    fn read<T>(
        &self,
        op: &'static str,
        mut f: impl FnMut(&Connection) -> TxResult<T>,
    ) -> Result<T> {
        let mut conn = self.conn.lock();
        self.check_identity()?;
        let mut tries = 0;
        loop {
            let result = conn.transaction().map_err(TxError::from).and_then(|tx| {
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            });
            match result {
                Ok(out) => return Ok(out),
                Err(TxError::Db(e)) if is_busy(&e) && tries < BUSY_RETRIES => tries += 1,
                Err(e) => return Err(self.storage_error(op, e)),
            }
        }
    }

    fn storage_error(&self, op: &'static str, error: TxError) -> StorageError {
        match error {
            TxError::Storage(error) => error,
            TxError::Db(error) => match db_error(op, &self.db_path, error) {
                // Read without the shared memory, a file that changed can look damaged.
                StorageError::Database {
                    fault: DatabaseFault::Corrupt,
                    ..
                } if self.frozen.is_some() => StorageError::StoreChanged {
                    path: self.db_path.clone(),
                },
                other => other,
            },
        }
    }

    fn settle_in(
        tx: &mut Tx,
        settlements: &[Settlement],
        now: Timestamp,
    ) -> TxResult<Vec<Result<Job>>> {
        let mut results = Vec::with_capacity(settlements.len());
        for settlement in settlements {
            let lease = settlement.lease();
            let Some(old) = rows::job_by_id(tx, &lease.job_id)? else {
                results.push(Err(lost(lease)));
                continue;
            };
            if let Err(error) = rules::check_lease(&old, lease) {
                results.push(Err(error));
                continue;
            }
            let mut job = old.clone();
            let mut attempt = rules::settle(&mut job, settlement, now);
            tx.update_job(&old, &mut job, now)?;
            tx.insert_attempt(job.seq, &mut attempt)?;
            results.push(Ok(job));
        }
        Ok(results)
    }

    fn claim_in(tx: &mut Tx, request: &ClaimRequest, now: Timestamp) -> TxResult<Vec<Job>> {
        if request.max == 0 {
            return Ok(Vec::new());
        }
        let now_us = micros(now);
        // Scheduled jobs that became due join the ready ones (the lane is index bookkeeping,
        // not job state).
        tx.prepare_cached(queries::PROMOTE)?.execute([now_us])?;
        // Settlements earlier in this transaction changed the counts a claim reads.
        tx.flush_counts()?;
        let settings = rows::queue_settings(tx)?;
        let mut picked = Vec::new();
        let queues = tx
            .prepare_cached(queries::CLAIMABLE_QUEUES)?
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Option<i64>>(1)?.unwrap_or(0),
                    row.get::<_, Option<i64>>(2)?.unwrap_or(0),
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (queue, waiting, running) in queues {
            let (paused, limit) = settings.get(&queue).copied().unwrap_or_default();
            if waiting == 0 || paused || !request.takes(&queue) {
                continue;
            }
            let room =
                rules::room_in_queue(limit, usize::try_from(running).unwrap_or(0), request.max);
            if room == 0 {
                continue;
            }
            let limit = i64::try_from(room).unwrap_or(i64::MAX);
            picked.extend(rows::select_jobs(
                tx,
                queries::PICK_READY,
                rusqlite::params![queue, now_us, limit],
            )?);
        }
        // The first jobs of each queue, merged in claim order.
        picked.sort_unstable_by_key(|job| (std::cmp::Reverse(job.priority), job.run_at, job.seq));
        picked.truncate(request.max);
        let mut claimed = Vec::with_capacity(picked.len());
        for old in picked {
            let mut job = old.clone();
            rules::claim(&mut job, &request.worker, request.lease_for, now);
            tx.update_job(&old, &mut job, now)?;
            claimed.push(job);
        }
        Ok(claimed)
    }

    fn recover_in(
        tx: &mut Tx,
        picked: Vec<Job>,
        why: Abandoned,
        now: Timestamp,
    ) -> TxResult<Vec<Job>> {
        let mut recovered = Vec::with_capacity(picked.len());
        for old in picked {
            let mut job = old.clone();
            let mut attempt = rules::recover(&mut job, why, now);
            tx.update_job(&old, &mut job, now)?;
            tx.insert_attempt(job.seq, &mut attempt)?;
            recovered.push(job);
        }
        Ok(recovered)
    }
}

/// What a wait waits for: any change, or one that may give a worker something to do.
#[derive(Clone, Copy)]
enum Kind {
    Any,
    Work,
}

impl FileStorage {
    /// Blocks until the version moved from `seen` (in its high half, the work count, for
    /// [`Kind::Work`]) or `timeout` passes; returns the current version, or `seen`.
    fn wait_for(&self, kind: Kind, seen: u64, timeout: Duration) -> Result<u64> {
        let moved = |current: u64| match kind {
            Kind::Any => current != seen,
            Kind::Work => current >> 32 != seen >> 32,
        };
        let current = self.change_version()?;
        if moved(current) {
            return Ok(current);
        }
        // A timeout too long to represent as an instant is as good as forever.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Read before looking again, so an event in between still ends the wait.
            let generation = match kind {
                Kind::Any => self.notifier.generation(),
                Kind::Work => self.notifier.work_generation(),
            };
            let current = self.change_version()?;
            if moved(current) {
                return Ok(current);
            }
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Ok(seen);
            }
            let step = left.min(self.poll_interval);
            match kind {
                Kind::Any => self.notifier.wait(generation, step),
                Kind::Work => self.notifier.wait_work(generation, step),
            }
        }
    }
}

fn lost(lease: &Lease) -> StorageError {
    StorageError::LeaseLost {
        id: lease.job_id.clone(),
    }
}

/// Imports a version 1 store into the (new, empty) database of `tx`. Returns how many jobs
/// it held and the torn tail it dropped.
fn import(tx: &mut Tx, old: &legacy::LegacyStore) -> TxResult<(usize, Option<String>)> {
    let now = crate::job::now();
    for job in &old.jobs {
        let mut job = job.clone();
        let output = job.output.take();
        // The journal kept no life-long count: the budget used is the best there is.
        job.runs = job.runs.max(job.attempts);
        if job.state == JobState::Processing && job.lease.is_none() {
            // Nothing could ever recover it: it runs again.
            job.state = JobState::Pending;
        }
        tx.insert_job(&mut job, now)?;
        // The journal kept only the last attempt's summary on the job: it becomes the history.
        let outcome = match job.state {
            JobState::Completed => Some(AttemptOutcome::Succeeded),
            JobState::Failed | JobState::Dead => Some(AttemptOutcome::Failed),
            _ => None,
        };
        if let (Some(outcome), Some(started_at)) = (outcome, job.started_at) {
            let mut attempt = Attempt {
                number: job.attempts,
                worker: "(imported)".to_owned(),
                started_at,
                finished_at: job.finished_at,
                outcome,
                exit_code: job.exit_code,
                signal: None,
                error: job
                    .last_error
                    .clone()
                    .filter(|_| outcome == AttemptOutcome::Failed),
                output,
                due_at: None,
            };
            tx.insert_attempt(job.seq, &mut attempt)?;
        }
    }
    let config = serde_json::to_string(&old.config).expect("settings serialise");
    tx.set_meta("config", &config)?;
    for worker in &old.workers {
        tx.put_worker(worker)?;
    }
    tx.set_meta("imported_from", &old.fingerprint)?;
    Ok((old.jobs.len(), old.dropped_tail.clone()))
}

/// Opens a connection with the settings every connection needs.
///
/// A read-only connection to a store in a directory this user cannot write (another user's
/// store, a read-only disk) cannot create the `-shm` file WAL readers need. When no `-wal`
/// file exists either, no process is writing to the store, and the file is read as it is
/// (SQLite's `immutable`): a reader that races a writer starting up may then see an error,
/// never a wrong change, since it writes nothing.
fn connect(path: &Path, options: &FileOptions) -> rusqlite::Result<(Connection, bool)> {
    if !options.read_only {
        return Ok((connect_plain(path, options)?, false));
    }
    match connect_plain(path, options).and_then(|conn| header(&conn).map(|_| conn)) {
        Err(e)
            if matches!(
                e.sqlite_error_code(),
                Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly)
            ) && !wal_path(path).exists() =>
        {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(immutable_uri(path), flags)?;
            conn.busy_timeout(options.busy_timeout)?;
            header(&conn)?;
            Ok((conn, true))
        }
        other => other.map(|conn| (conn, false)),
    }
}

/// Size and modification time of a file.
fn file_state(path: &Path) -> Result<(u64, std::time::SystemTime)> {
    fs::metadata(path)
        .and_then(|meta| Ok((meta.len(), meta.modified()?)))
        .map_err(|source| StorageError::Io {
            op: "look at",
            path: path.to_owned(),
            source,
        })
}

fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// `file:PATH?immutable=1`, with the path percent-encoded as SQLite's URIs need.
fn immutable_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            uri.push(byte as char);
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    uri
}

fn connect_plain(path: &Path, options: &FileOptions) -> rusqlite::Result<Connection> {
    // Never SQLITE_OPEN_CREATE: the store creates the file itself, with its permissions, and
    // only where it decided to.
    let access = if options.read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    };
    let conn = Connection::open_with_flags(path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    // First, so that even the pragmas below wait for a store another process is opening.
    conn.busy_timeout(options.busy_timeout)?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.pragma_update(None, "synchronous", "FULL")?;
    if cfg!(target_os = "macos") {
        conn.pragma_update(None, "fullfsync", true)?;
    }
    if !options.read_only {
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    }
    Ok(conn)
}

/// `PRAGMA application_id` and `PRAGMA user_version`: the two fields of the file header a
/// store looks at when it opens.
fn header(conn: &Connection) -> rusqlite::Result<(i32, u32)> {
    let app_id = conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
    let version = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    Ok((app_id, version))
}

fn file_identity(path: &Path) -> Result<(u64, u64)> {
    fs::metadata(path)
        .map(|meta| (meta.dev(), meta.ino()))
        .map_err(|source| StorageError::Io {
            op: "look at",
            path: path.to_owned(),
            source,
        })
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// A database error, with what was being done, the file, and the cause in words.
fn db_error(op: &'static str, path: &Path, error: rusqlite::Error) -> StorageError {
    let fault = match error.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => DatabaseFault::DiskFull,
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => DatabaseFault::Corrupt,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => DatabaseFault::Busy,
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => DatabaseFault::ReadOnly,
        Some(ErrorCode::CannotOpen) => DatabaseFault::CannotOpen,
        Some(ErrorCode::SystemIoFailure) => DatabaseFault::Io,
        // A row that does not decode is damage too.
        None if matches!(
            error,
            rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::InvalidColumnType(..)
        ) =>
        {
            DatabaseFault::Corrupt
        }
        _ => DatabaseFault::Other,
    };
    StorageError::Database {
        op,
        path: path.to_owned(),
        fault,
        source: Box::new(error),
    }
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorage")
            .field("db_path", &self.db_path)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Storage for FileStorage {
    fn submit(&self, jobs: Vec<NewJob>, now: Timestamp) -> Result<Vec<Enqueued>> {
        for job in &jobs {
            job.validate()?;
        }
        let ids: Vec<JobId> = jobs
            .iter()
            .map(|new| new.id.clone().unwrap_or_else(JobId::generate))
            .collect();
        self.write("enqueue jobs", |tx| {
            let config = rows::config(tx)?;
            let mut entries = Vec::with_capacity(jobs.len());
            for (new, id) in jobs.iter().zip(&ids) {
                let holder = match &new.unique_key {
                    Some(key) => rows::select_jobs(tx, queries::UNIQUE_HOLDER, [key])?.pop(),
                    None => None,
                };
                if let Some(mut holder) = holder {
                    holder.output = rows::last_output(tx, holder.seq)?;
                    entries.push(Enqueued {
                        job: holder,
                        duplicate: true,
                    });
                    continue;
                }
                let dependencies = new
                    .after
                    .iter()
                    .map(|after| Ok((after.clone(), rows::state_of(tx, after)?)))
                    .collect::<TxResult<Vec<_>>>()?;
                rules::check_dependencies(new.id.as_ref(), &dependencies)?;
                let mut job =
                    rules::new_job(new.clone(), id.clone(), 0, &dependencies, &config, now);
                tx.insert_job(&mut job, now)?;
                entries.push(Enqueued {
                    job,
                    duplicate: false,
                });
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
            Self::claim_in(tx, request, now)
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
            let mut lost = Vec::new();
            for lease in leases {
                match rows::job_by_id(tx, &lease.job_id)? {
                    Some(old) if rules::check_lease(&old, lease).is_ok() => {
                        let mut job = old.clone();
                        rules::extend_lease(&mut job, lease_for, now);
                        tx.update_job(&old, &mut job, now)?;
                    }
                    _ => lost.push(lease.job_id.clone()),
                }
            }
            Ok(lost)
        })
    }

    fn settle(&self, settlements: Vec<Settlement>, now: Timestamp) -> Result<Vec<Result<Job>>> {
        self.write("record job results", |tx| {
            Self::settle_in(tx, &settlements, now)
        })
    }

    fn settle_and_claim(
        &self,
        settlements: Vec<Settlement>,
        request: &ClaimRequest,
        now: Timestamp,
    ) -> Result<(Vec<Result<Job>>, Vec<Job>)> {
        self.write("record job results and claim jobs", |tx| {
            // A busy worker's turn: quiet, unless it leaves a job waiting to run or frees
            // room in a limited queue, for which other workers may wait. (Without a claim it
            // is work: a stopping worker's last results, say.)
            if request.max > 0 {
                tx.give_no_work();
            }
            let settled = Self::settle_in(tx, &settlements, now)?;
            if request.max > 0 && !settlements.is_empty() {
                let settings = rows::queue_settings(tx)?;
                let limited = |job: &Job| settings.get(&job.queue).is_some_and(|q| q.1 > 0);
                if settled.iter().flatten().any(limited) {
                    tx.give_work();
                }
            }
            let claimed = Self::claim_in(tx, request, now)?;
            Ok((settled, claimed))
        })
    }

    fn record_output(&self, chunks: &[OutputChunk]) -> Result<Vec<JobId>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        self.write("record live output", |tx| {
            tx.give_no_work();
            let mut lost = Vec::new();
            for chunk in chunks {
                match rows::job_by_id(tx, &chunk.lease.job_id)? {
                    Some(job) if rules::check_lease(&job, &chunk.lease).is_ok() => {
                        tx.append_output(job.seq, chunk)?;
                    }
                    _ => lost.push(chunk.lease.job_id.clone()),
                }
            }
            Ok(lost)
        })
    }

    fn output_since(&self, id: &JobId, offset: u64) -> Result<RunningOutput> {
        self.read("read a job's live output", |mut conn| {
            ops::output_since(&mut conn, id, offset)
        })
    }

    fn recover_expired(&self, now: Timestamp) -> Result<Vec<Job>> {
        self.write("recover expired leases", |tx| {
            let picked = rows::select_jobs(tx, queries::EXPIRED, [micros(now)])?;
            Self::recover_in(tx, picked, Abandoned::LeaseExpired, now)
        })
    }

    fn recover_worker(&self, worker: &str, now: Timestamp) -> Result<Vec<Job>> {
        self.write("recover a dead worker's jobs", |tx| {
            let picked = rows::select_jobs(tx, queries::OF_WORKER, [worker])?;
            Self::recover_in(tx, picked, Abandoned::WorkerDied, now)
        })
    }

    fn get(&self, id: &JobId) -> Result<Job> {
        self.read("read a job", |mut conn| ops::get(&mut conn, id))
    }

    fn attempts(&self, id: &JobId) -> Result<Vec<Attempt>> {
        self.read("read a job's attempts", |mut conn| {
            ops::attempts(&mut conn, id)
        })
    }

    fn list(&self, query: &ListQuery) -> Result<Vec<Job>> {
        let limit = query
            .limit
            .map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
        let offset = i64::try_from(query.offset).unwrap_or(i64::MAX);
        let page = queries::page(
            query.state.is_some(),
            query.queue.is_some(),
            query.newest_first,
        );
        let state = query.state.map(JobState::as_str);
        self.read("list jobs", |conn| {
            rows::select_jobs(
                conn,
                &page,
                rusqlite::params![state, query.queue, limit, offset],
            )
        })
    }

    fn counts(&self) -> Result<StateCounts> {
        self.read("count jobs", |mut conn| ops::state_counts(&mut conn))
    }

    fn queues(&self) -> Result<Vec<QueueInfo>> {
        self.read("list queues", rows::queues)
    }

    fn activity(&self, since: Timestamp) -> Result<Activity> {
        self.read("read the recent history", |conn| {
            rows::activity(conn, since)
        })
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
        self.read("find the next due job", |conn| {
            let mut earliest = None;
            for query in [queries::NEXT_SCHEDULED, queries::NEXT_READY] {
                let us: Option<i64> = conn
                    .prepare_cached(query)?
                    .query_row([micros(after)], |row| row.get(0))?;
                earliest = match (earliest, us) {
                    (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                    (a, b) => a.or(b),
                };
            }
            earliest
                .map(|us| {
                    Timestamp::from_unix_timestamp_nanos(i128::from(us) * 1_000).map_err(|e| {
                        TxError::Db(rusqlite::Error::FromSqlConversionFailure(
                            0,
                            rusqlite::types::Type::Integer,
                            e.into(),
                        ))
                    })
                })
                .transpose()
        })
    }

    fn retry_dead(&self, ids: Option<&[JobId]>, now: Timestamp) -> Result<Vec<Job>> {
        self.write("retry dead jobs", |tx| match ids {
            Some(ids) => {
                let targets = crate::ops::checked(tx, ids, rules::check_retry)?;
                crate::ops::rerun(tx, targets, now)
            }
            None => {
                let dead = rows::select_jobs(tx, queries::DEAD, [])?;
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
            let dead = rows::select_jobs(tx, queries::DEAD, [])?;
            for job in &dead {
                tx.delete_job(job, now)?;
            }
            rows::incremental_vacuum(tx)?;
            Ok(dead.len())
        })
    }

    fn purge_completed(&self, finished_before: Timestamp) -> Result<usize> {
        self.write("purge completed jobs", |tx| {
            let before = micros(finished_before);
            let deleted = tx.delete_completed(queries::SELECT_PURGEABLE, &[&before])?;
            rows::incremental_vacuum(tx)?;
            Ok(deleted)
        })
    }

    fn config(&self) -> Result<Config> {
        self.read("read the settings", rows::config)
    }

    fn update_config(
        &self,
        update: &mut dyn FnMut(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<Config> {
        self.write("change the settings", |tx| {
            crate::ops::update_config(tx, update)
        })
    }

    // A worker coming or staying gives no other worker anything to claim (a stop request is
    // `request_stop`'s, which is work).
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
            tx.prepare_cached("DELETE FROM workers WHERE id = ?1")?
                .execute([worker])?;
            Ok(())
        })
    }

    fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.read("list workers", rows::workers)
    }

    fn request_stop(&self) -> Result<usize> {
        self.write("ask workers to stop", |tx| crate::ops::request_stop(tx))
    }

    /// The commits this handle has seen (others' counted by SQLite's `data_version`, its own
    /// by itself) in the low 32 bits, and in the high 32 the stored count of commits that may
    /// have given a worker something to do ([`FileStorage::wait_for_work`]).
    fn change_version(&self) -> Result<u64> {
        let conn = self.conn.lock();
        self.check_identity()?;
        let read = || -> rusqlite::Result<(i64, i64)> {
            let theirs: i64 = conn.pragma_query_value(None, "data_version", |row| row.get(0))?;
            let work: Option<i64> = conn
                .prepare_cached(rows::WORK_COUNT)?
                .query_row([], |row| row.get(0))
                .optional()?;
            Ok((theirs, work.unwrap_or(0)))
        };
        let (theirs, work) = read().map_err(|e| db_error("look for changes", &self.db_path, e))?;
        let changes = (theirs as u64).wrapping_add(self.local_changes.load(Ordering::Relaxed));
        Ok((work as u64) << 32 | (changes & u64::from(u32::MAX)))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn wait_for_change(&self, seen: u64, timeout: Duration) -> Result<u64> {
        self.wait_for(Kind::Any, seen, timeout)
    }

    /// Waits until the stored work count (the version's high half) moves: commits that may
    /// give a worker something to do count there and write the work file, which wakes this
    /// wait (`rows::Tx::give_no_work`); a job finishing elsewhere does not end it. A work
    /// file write that was lost is found at the next look, every `poll_interval`. (Commits of
    /// earlier versions count nothing: an idle pool finds their jobs at its next turn, at
    /// most a second away.) Where the directory cannot be watched, it looks in short steps.
    fn wait_for_work(&self, seen: u64, timeout: Duration) -> Result<u64> {
        self.wait_for(Kind::Work, seen, timeout)
    }
}
