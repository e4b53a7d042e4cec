//! `FileStorage`: the durable embedded default.
//!
//! A store is a directory of three files (the format is documented in `docs/file-format.md`):
//!
//! - `journal`: one framed, checksummed record per mutating operation, appended and fsynced
//!   before the operation returns;
//! - `snapshot`: the whole state as of the start of the journal's generation, rewritten by
//!   compaction (temp file, fsync, rename, directory fsync);
//! - `lock`: the file every write locks exclusively, and every read that must catch up locks
//!   shared (it is never replaced, unlike the other two, so every process always locks the
//!   same inode).
//!
//! Each handle keeps a replica of the state (the job state machine shared with
//! [`MemoryStorage`](crate::MemoryStorage)) and catches up with other handles and processes by
//! reading only the journal bytes past the offset it last reached. A mutation takes the
//! exclusive lock, catches up, runs the transition on the replica, and appends the changes the
//! transition recorded as one record, so it costs one `write` and one `fdatasync` whatever the
//! size of the store.

mod format;
mod watch;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::format::{FileKind, Record};
use self::watch::Watcher;
use crate::config::{Config, ConfigError};
use crate::error::{Result, StorageError};
use crate::job::{Job, JobId, Lease, NewJob, Timestamp};
use crate::state::{Change, QueueState};
use crate::storage::{ListQuery, Settlement, StateCounts, Storage, WorkerInfo};

pub use self::format::FORMAT_VERSION;

const JOURNAL: &str = "journal";
const SNAPSHOT: &str = "snapshot";
const LOCK: &str = "lock";
/// Prefix of the temporary files compaction writes; leftovers of a crash are removed on open.
const TEMP_PREFIX: &str = ".tmp-";
/// Bits of [`Storage::change_version`] holding the journal offset; the generation is above.
const OFFSET_BITS: u32 = 40;

/// When a mutating operation's record is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every mutating operation fsyncs the journal before it returns: once it returned `Ok`,
    /// its change survives a crash of the process, the OS or the machine.
    #[default]
    Always,
    /// The journal is fsynced by the first mutating operation at least `interval` after the
    /// previous fsync, by every compaction, by [`FileStorage::sync`], and when the handle is
    /// dropped. Each record is still written (visible to every process, and safe from a crash
    /// of the process) before the operation returns, but a crash of the OS or a power failure
    /// loses the operations this handle acknowledged since its last fsync: those of the last
    /// `interval` while writes keep coming, all of them since the last fsync once they stop.
    /// Such a crash can also leave damage before the end of the journal (the OS may write later
    /// pages first), which opening refuses as [`StorageError::Corrupt`].
    Batch {
        /// Longest time between fsyncs while writes keep coming.
        interval: Duration,
    },
}

/// A point where the store writes or syncs, for fault injection in tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPoint {
    /// Appending a record to the journal.
    AppendJournal,
    /// Fsyncing the journal after an append.
    SyncJournal,
    /// Cutting a torn record off the end of the journal.
    TruncateJournal,
    /// Writing a snapshot or a new journal to its temporary file.
    WriteFile,
    /// Fsyncing that temporary file.
    SyncFile,
    /// Renaming it into place.
    Rename,
    /// Fsyncing the store directory after a rename.
    SyncDir,
}

/// Called before each write or fsync; an `Err` is used as the result of that call.
#[doc(hidden)]
pub type FaultHook = Arc<dyn Fn(IoPoint) -> io::Result<()> + Send + Sync>;

/// How to open a [`FileStorage`].
#[derive(Clone)]
pub struct FileOptions {
    /// When records are forced to disk.
    pub durability: Durability,
    /// The journal is compacted into a new snapshot when it is larger than both this many
    /// bytes and twice the snapshot. A compaction rewrites the state only after at least twice
    /// as many bytes of operations were appended (O(1) amortised per operation, and half the
    /// rewriting of a once-the-snapshot trigger), and opening reads at most about three times
    /// the state.
    pub compact_min_bytes: u64,
    /// Fault injection for tests: not part of the stable API.
    #[doc(hidden)]
    pub fault_hook: Option<FaultHook>,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Always,
            compact_min_bytes: 4 << 20,
            fault_hook: None,
        }
    }
}

impl fmt::Debug for FileOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileOptions")
            .field("durability", &self.durability)
            .field("compact_min_bytes", &self.compact_min_bytes)
            .field("fault_hook", &self.fault_hook.is_some())
            .finish()
    }
}

/// A torn record dropped from the end of the journal: the remains of an append that was
/// interrupted by a crash, so an operation that never returned `Ok` (with
/// [`Durability::Always`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryWarning {
    /// The journal.
    pub path: PathBuf,
    /// Where the dropped bytes start.
    pub offset: u64,
    /// How many bytes were dropped.
    pub bytes: u64,
    /// What is wrong with them.
    pub reason: String,
}

impl fmt::Display for RecoveryWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dropped a torn record at the end of {} (byte offset {}, {} bytes): {}",
            self.path.display(),
            self.offset,
            self.bytes,
            self.reason
        )
    }
}

/// A store in a directory on local disk, safe to share between threads, handles and processes.
///
/// See the [module documentation](self) for the design and `docs/file-format.md` for the
/// format. Opening a store that does not exist creates it (the directory with mode 0700, files
/// with 0600).
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
    journal_path: PathBuf,
    snapshot_path: PathBuf,
    lock_path: PathBuf,
    options: FileOptions,
    /// Locked only while `inner` is held: `flock` locks belong to the open file, so two
    /// threads locking this one `File` would not exclude each other.
    lock: File,
    /// Set by any failed write or fsync: what is on disk is then unknown, so writes are refused
    /// until the store is reopened.
    poisoned: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `None` before the first load and after a failed operation: rebuilt from the files.
    replica: Option<Replica>,
    warnings: Vec<RecoveryWarning>,
}

/// The state and where it was read from.
struct Replica {
    state: QueueState,
    /// Generation of the snapshot the state was built on (0: no snapshot yet).
    generation: u64,
    snapshot: Option<FileId>,
    snapshot_len: u64,
    journal: File,
    journal_id: FileId,
    /// End of the last whole journal record applied.
    offset: u64,
    /// The journal predates the snapshot (a compaction stopped between its two renames): all
    /// its records are in the snapshot, so it is ignored, and replaced before the next append.
    stale: bool,
    /// The bytes past `offset` are a torn record, cut off before the next append.
    torn: bool,
    /// [`Durability::Batch`]: records appended since the last fsync, and when that was.
    unsynced: bool,
    last_sync: Instant,
}

impl Replica {
    fn version(&self) -> u64 {
        let offset = if self.stale { 0 } else { self.offset };
        (self.generation << OFFSET_BITS) | (offset & ((1 << OFFSET_BITS) - 1))
    }
}

/// Identity of a file: tells a replaced file from one that was appended to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Holds the OS lock; releases it when dropped.
struct OsLock<'a>(&'a File);

impl Drop for OsLock<'_> {
    fn drop(&mut self) {
        // Cannot fail on an open file; closing the file would release the lock anyway.
        let _ = self.0.unlock();
    }
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Reads `file` from `offset` to its end.
fn read_from(file: &File, offset: u64, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut reader = file;
    reader
        .seek(SeekFrom::Start(offset))
        .and_then(|_| reader.read_to_end(&mut bytes))
        .map_err(io_error("read", path))?;
    Ok(bytes)
}

fn file_id(file: &File, path: &Path) -> Result<FileId> {
    let meta = file.metadata().map_err(io_error("stat", path))?;
    Ok(FileId::of(&meta))
}

/// Creates the store directory (and missing parents) with mode 0700.
fn create_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // The directories about to be created, deepest first: each one's entry must reach the disk
    // (an fsync of its parent), or a power failure could lose the store with its acknowledged
    // jobs.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("create directory", dir))?;
    for created in missing {
        let parent = match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(io_error("fsync", parent))?;
    }
    Ok(())
}

impl FileStorage {
    /// Opens the store in `dir` with default options, creating it if missing.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, FileOptions::default())
    }

    /// Opens the store in `dir`, creating it if missing.
    ///
    /// Loads the snapshot and the journal, drops a torn record at the end of the journal (see
    /// [`FileStorage::recovery_warnings`]), and removes temporary files left by a crash.
    /// Damage anywhere else is [`StorageError::Corrupt`]; a store written by a newer version
    /// is [`StorageError::UnsupportedFormat`].
    pub fn open_with(dir: impl AsRef<Path>, options: FileOptions) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        create_dir(&dir)?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        let store = Self {
            journal_path: dir.join(JOURNAL),
            snapshot_path: dir.join(SNAPSHOT),
            lock_path,
            dir,
            options,
            lock,
            poisoned: AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
        };
        store.initialize()?;
        Ok(store)
    }

    /// Loads the state. A store that needs nothing done to it is loaded under the shared lock,
    /// so opening one (every `queuectl status`, say) does not hold up the workers' writes; a new
    /// store, or one with leftovers of a crashed compaction, is set up under the exclusive lock:
    /// clean-up, a first journal, and the repair of a torn journal. (A store that is only torn
    /// is repaired by its first write.)
    fn initialize(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        {
            let _lock = self.os_lock(false)?;
            if self
                .journal_path
                .try_exists()
                .map_err(io_error("stat", &self.journal_path))?
                && !self.has_temp_files()?
            {
                return self.catch_up(&mut inner, false).map(drop);
            }
        }
        let _lock = self.os_lock(true)?;
        self.remove_temp_files()?;
        let exists = |path: &Path| path.try_exists().map_err(io_error("stat", path));
        if !exists(&self.journal_path)? && !exists(&self.snapshot_path)? {
            self.publish_journal(0)?;
        }
        self.catch_up(&mut inner, true).map(drop)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Torn records this handle found at the end of the journal and dropped (each was an append
    /// interrupted by a crash). Empty when nothing was lost.
    pub fn recovery_warnings(&self) -> Vec<RecoveryWarning> {
        self.inner.lock().warnings.clone()
    }

    /// Compacts now: writes the whole state as a new snapshot and starts an empty journal.
    /// Compaction also happens on its own as the journal grows (see
    /// [`FileOptions::compact_min_bytes`]).
    pub fn compact(&self) -> Result<()> {
        self.locked_write(|store, replica| store.compact_replica(replica))
    }

    /// Forces records appended by this handle to disk ([`Durability::Batch`]; with
    /// [`Durability::Always`] there is never anything to do).
    pub fn sync(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        self.check_poisoned()?;
        match inner.replica.as_mut() {
            Some(replica) if replica.unsynced => {
                let result = self.sync_journal(replica, true);
                if result.is_err() {
                    inner.replica = None;
                }
                result
            }
            _ => Ok(()),
        }
    }

    // ----- locking and catching up -----

    fn os_lock(&self, exclusive: bool) -> Result<OsLock<'_>> {
        loop {
            let locked = if exclusive {
                self.lock.lock()
            } else {
                self.lock.lock_shared()
            };
            match locked {
                Ok(()) => return Ok(OsLock(&self.lock)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(io_error("lock", &self.lock_path)(source)),
            }
        }
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(StorageError::Poisoned {
                path: self.dir.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Runs a read on an up-to-date replica.
    fn read<T>(&self, f: impl FnOnce(&Replica) -> T) -> Result<T> {
        let mut inner = self.inner.lock();
        // Fast path, without the OS lock: the journal was neither replaced nor appended to
        // since we last looked, so the replica is current. (A compaction that has renamed the
        // snapshot but not yet the journal does not change the state.)
        if let Some(replica) = &inner.replica
            && !replica.torn
        {
            let meta =
                fs::metadata(&self.journal_path).map_err(io_error("stat", &self.journal_path))?;
            if FileId::of(&meta) == replica.journal_id
                && (replica.stale || meta.len() == replica.offset)
            {
                return Ok(f(replica));
            }
        }
        let _lock = self.os_lock(false)?;
        let replica = self.catch_up(&mut inner, false)?;
        Ok(f(replica))
    }

    /// Runs a transition: under the exclusive lock, on an up-to-date replica, then persists
    /// the changes it recorded as one journal record.
    fn write<T>(&self, f: impl FnOnce(&mut QueueState) -> T) -> Result<T> {
        self.locked_write(|store, replica| {
            store.compact_if_due(replica)?;
            let out = f(&mut replica.state);
            let changes = replica.state.take_changes();
            if !changes.is_empty() {
                store.append(replica, changes)?;
            }
            Ok(out)
        })
    }

    fn locked_write<T>(&self, f: impl FnOnce(&Self, &mut Replica) -> Result<T>) -> Result<T> {
        let mut inner = self.inner.lock();
        self.check_poisoned()?;
        let _lock = self.os_lock(true)?;
        let result = self.catch_up(&mut inner, true).and_then(|r| f(self, r));
        if result.is_err() {
            // The replica may hold changes that did not reach the disk: rebuild it from the
            // files before it is used again.
            inner.replica = None;
        }
        result
    }

    /// Brings the replica up to date with the files, under the OS lock. With `exclusive`, also
    /// repairs the journal so it can take an append.
    fn catch_up<'a>(&self, inner: &'a mut Inner, exclusive: bool) -> Result<&'a mut Replica> {
        // A replica whose tail fails to read is dropped: the next access rebuilds it.
        let current = match inner.replica.take() {
            Some(mut replica) => {
                if self.tail(&mut replica, &mut inner.warnings, exclusive)? {
                    replica
                } else {
                    self.load(&mut inner.warnings)?
                }
            }
            None => self.load(&mut inner.warnings)?,
        };
        let replica = inner.replica.insert(current);
        if exclusive {
            self.repair(replica)?;
        }
        Ok(replica)
    }

    /// Applies what was appended to the journal since the last look. Returns `false` when the
    /// replica must be rebuilt instead: the journal was replaced (compaction), shrank, or, for
    /// a writer, the snapshot was replaced.
    fn tail(
        &self,
        replica: &mut Replica,
        warnings: &mut Vec<RecoveryWarning>,
        exclusive: bool,
    ) -> Result<bool> {
        let path = &self.journal_path;
        let meta = fs::metadata(path).map_err(io_error("stat", path))?;
        if FileId::of(&meta) != replica.journal_id || meta.len() < replica.offset {
            return Ok(false);
        }
        // A writer also checks the snapshot: after a compaction that stopped between its two
        // renames, the journal in place is stale although it was not replaced, and a record
        // appended to it would be ignored by every later load.
        if exclusive && self.snapshot_id()? != replica.snapshot {
            return Ok(false);
        }
        if replica.stale || meta.len() == replica.offset {
            return Ok(true);
        }
        let bytes = read_from(&replica.journal, replica.offset, path)?;
        let replay = format::replay_journal(&bytes, replica.offset, path, &mut replica.state)?;
        replica.offset = replay.end;
        replica.torn = replay.torn.is_some();
        warn(warnings, replay.torn);
        Ok(true)
    }

    fn snapshot_id(&self) -> Result<Option<FileId>> {
        match fs::metadata(&self.snapshot_path) {
            Ok(meta) => Ok(Some(FileId::of(&meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("stat", &self.snapshot_path)(e)),
        }
    }

    /// Builds a replica from the snapshot and the journal.
    fn load(&self, warnings: &mut Vec<RecoveryWarning>) -> Result<Replica> {
        let mut state = QueueState::new(true);
        let (snapshot, generation, snapshot_len) = match File::open(&self.snapshot_path) {
            Ok(file) => {
                let path = &self.snapshot_path;
                let id = file_id(&file, path)?;
                let bytes = read_from(&file, 0, path)?;
                let generation = format::load_snapshot(&bytes, path, &mut state)?;
                (Some(id), generation, bytes.len() as u64)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (None, 0, 0),
            Err(e) => return Err(io_error("open", &self.snapshot_path)(e)),
        };
        let path = &self.journal_path;
        let journal = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::Corrupt {
                    path: path.clone(),
                    offset: 0,
                    reason: "the journal is missing".to_owned(),
                });
            }
            Err(e) => return Err(io_error("open", path)(e)),
        };
        let journal_id = file_id(&journal, path)?;
        let bytes = read_from(&journal, 0, path)?;
        let (journal_generation, start) = format::read_header(&bytes, path, FileKind::Journal)?;
        let start = start as u64;
        let (stale, offset, torn) = if journal_generation == generation {
            let replay = format::replay_journal(&bytes[start as usize..], start, path, &mut state)?;
            (false, replay.end, replay.torn)
        } else if journal_generation < generation {
            (true, start, None)
        } else {
            return Err(StorageError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: format!(
                    "journal generation {journal_generation} is newer than the snapshot's \
                     ({generation}): the snapshot is missing or was replaced"
                ),
            });
        };
        let torn_now = torn.is_some();
        warn(warnings, torn);
        Ok(Replica {
            state,
            generation,
            snapshot,
            snapshot_len,
            journal,
            journal_id,
            offset,
            stale,
            torn: torn_now,
            unsynced: false,
            last_sync: Instant::now(),
        })
    }

    // ----- writing -----

    /// Runs one write or fsync through the fault-injection hook; a failure poisons the handle.
    fn io<T>(
        &self,
        point: IoPoint,
        op: &'static str,
        path: &Path,
        f: impl FnOnce() -> io::Result<T>,
    ) -> Result<T> {
        let injected = self
            .options
            .fault_hook
            .as_ref()
            .map_or(Ok(()), |hook| hook(point));
        injected.and_then(|()| f()).map_err(|source| {
            self.poisoned.store(true, Ordering::SeqCst);
            io_error(op, path)(source)
        })
    }

    /// Makes the journal ready to take an append: replaces a stale one, cuts off a torn
    /// record.
    fn repair(&self, replica: &mut Replica) -> Result<()> {
        if replica.stale {
            self.replace_journal(replica)?;
        } else if replica.torn {
            let path = &self.journal_path;
            self.io(IoPoint::TruncateJournal, "truncate", path, || {
                replica.journal.set_len(replica.offset)
            })?;
            replica.torn = false;
        }
        Ok(())
    }

    /// Compacts when the journal has outgrown the snapshot (see
    /// [`FileOptions::compact_min_bytes`]). Done by mutations only, before their append, so
    /// opening or reading a store never pays for it.
    fn compact_if_due(&self, replica: &mut Replica) -> Result<()> {
        let outgrown = replica.snapshot_len.saturating_mul(2);
        if replica.offset > outgrown.max(self.options.compact_min_bytes) {
            self.compact_replica(replica)?;
        }
        Ok(())
    }

    /// Appends `changes` as one record at the end of the journal.
    fn append(&self, replica: &mut Replica, changes: Vec<Change>) -> Result<()> {
        let path = &self.journal_path;
        let mut record = Vec::with_capacity(512 * changes.len());
        format::encode(&Record::Batch(changes), &mut record)
            .map_err(io_error("encode a record for", path))?;
        let start = replica.offset;
        let appended = self
            .io(IoPoint::AppendJournal, "append to", path, || {
                replica.journal.write_all_at(&record, start)
            })
            .and_then(|()| {
                replica.offset = start + record.len() as u64;
                replica.unsynced = true;
                self.sync_journal(replica, false)
            });
        if appended.is_err() {
            // The operation reports failure, so no one may act on it: take the record back
            // while the exclusive lock still keeps every other reader out. If even that fails,
            // say so instead: the journal may then hold the record.
            replica.offset = start;
            self.io(
                IoPoint::TruncateJournal,
                "remove a failed record from",
                path,
                || replica.journal.set_len(start),
            )?;
        }
        appended
    }

    /// Fsyncs the journal if the durability option asks for it now (or `force`).
    fn sync_journal(&self, replica: &mut Replica, force: bool) -> Result<()> {
        let due = match self.options.durability {
            Durability::Always => true,
            Durability::Batch { interval } => force || replica.last_sync.elapsed() >= interval,
        };
        if due {
            self.io(IoPoint::SyncJournal, "fsync", &self.journal_path, || {
                replica.journal.sync_data()
            })?;
            replica.unsynced = false;
            replica.last_sync = Instant::now();
        }
        Ok(())
    }

    /// Writes the state as the snapshot of the next generation, then starts its journal.
    ///
    /// Crash-atomic: until the snapshot rename the old snapshot and journal are in place;
    /// between the two renames the old journal is stale (its generation is older than the
    /// snapshot's) and every load ignores it, its records all being in the new snapshot.
    fn compact_replica(&self, replica: &mut Replica) -> Result<()> {
        let generation = replica.generation + 1;
        let changes = replica.state.snapshot();
        let (snapshot, len) = self.publish(&self.snapshot_path, |out| {
            format::write_snapshot(out, generation, changes)
        })?;
        replica.snapshot = Some(file_id(&snapshot, &self.snapshot_path)?);
        replica.snapshot_len = len;
        replica.generation = generation;
        replica.stale = true;
        self.replace_journal(replica)
    }

    /// Starts an empty journal for the replica's generation.
    fn replace_journal(&self, replica: &mut Replica) -> Result<()> {
        let (journal, len) = self.publish_journal(replica.generation)?;
        replica.journal_id = file_id(&journal, &self.journal_path)?;
        replica.journal = journal;
        replica.offset = len;
        replica.stale = false;
        replica.torn = false;
        replica.unsynced = false;
        Ok(())
    }

    fn publish_journal(&self, generation: u64) -> Result<(File, u64)> {
        let header = format::header(FileKind::Journal, generation)
            .map_err(io_error("encode a header for", &self.journal_path))?;
        self.publish(&self.journal_path, |out| {
            out.write_all(&header)?;
            Ok(header.len() as u64)
        })
    }

    /// Replaces `path` atomically: writes a temporary file in the store directory, fsyncs it,
    /// renames it over `path` and fsyncs the directory. Returns the new file (open for reading
    /// and writing) and its length.
    fn publish(
        &self,
        path: &Path,
        write: impl FnOnce(&mut BufWriter<&File>) -> io::Result<u64>,
    ) -> Result<(File, u64)> {
        let temp = self.io(
            IoPoint::WriteFile,
            "create a temporary file in",
            &self.dir,
            || {
                tempfile::Builder::new()
                    .prefix(TEMP_PREFIX)
                    .tempfile_in(&self.dir)
            },
        )?;
        let len = self.io(IoPoint::WriteFile, "write", temp.path(), || {
            let mut out = BufWriter::new(temp.as_file());
            let len = write(&mut out)?;
            out.flush()?;
            Ok(len)
        })?;
        self.io(IoPoint::SyncFile, "fsync", temp.path(), || {
            temp.as_file().sync_all()
        })?;
        let file = self.io(IoPoint::Rename, "rename a temporary file to", path, || {
            temp.persist(path).map_err(|e| e.error)
        })?;
        self.io(IoPoint::SyncDir, "fsync", &self.dir, || {
            File::open(&self.dir)?.sync_all()
        })?;
        Ok((file, len))
    }

    /// Removes temporary files left by a compaction that crashed (under the exclusive lock, so
    /// no compaction is running).
    fn has_temp_files(&self) -> Result<bool> {
        let entries = fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn remove_temp_files(&self) -> Result<()> {
        let entries = fs::read_dir(&self.dir).map_err(io_error("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_error("list", &self.dir))?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_error("remove", &path)(e));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// Records a torn tail once, however often it is seen before a writer cuts it off.
fn warn(warnings: &mut Vec<RecoveryWarning>, torn: Option<RecoveryWarning>) {
    if let Some(torn) = torn
        && !warnings.contains(&torn)
    {
        warnings.push(torn);
    }
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorage")
            .field("dir", &self.dir)
            .field("options", &self.options)
            .field("poisoned", &self.poisoned.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Durability::Batch: make what this handle acknowledged durable. An error cannot be
        // reported from here; `sync` is the way to see it.
        if let Some(replica) = &self.inner.get_mut().replica
            && replica.unsynced
        {
            let _ = replica.journal.sync_data();
        }
    }
}

impl Storage for FileStorage {
    fn enqueue_batch(&self, jobs: Vec<NewJob>, now: Timestamp) -> Result<Vec<Job>> {
        self.write(|s| s.enqueue_batch(jobs, now))?
    }

    fn claim(
        &self,
        worker: &str,
        max: usize,
        lease_for: Duration,
        now: Timestamp,
    ) -> Result<Vec<Job>> {
        self.write(|s| s.claim(worker, max, lease_for, now))
    }

    fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
        now: Timestamp,
    ) -> Result<Vec<JobId>> {
        self.write(|s| s.extend_leases(leases, lease_for, now))
    }

    fn settle(&self, settlements: Vec<Settlement>, now: Timestamp) -> Result<Vec<Result<Job>>> {
        self.write(|s| s.settle(settlements, now))
    }

    fn settle_and_claim(
        &self,
        settlements: Vec<Settlement>,
        worker: &str,
        max: usize,
        lease_for: Duration,
        now: Timestamp,
    ) -> Result<(Vec<Result<Job>>, Vec<Job>)> {
        self.write(|s| s.settle_and_claim(settlements, worker, max, lease_for, now))
    }

    fn recover_expired(&self, now: Timestamp) -> Result<Vec<Job>> {
        self.write(|s| s.recover_expired(now))
    }

    fn recover_worker(&self, worker: &str, now: Timestamp) -> Result<Vec<Job>> {
        self.write(|s| s.recover_worker(worker, now))
    }

    fn get(&self, id: &JobId) -> Result<Job> {
        self.read(|r| r.state.get(id))?
    }

    fn list(&self, query: &ListQuery) -> Result<Vec<Job>> {
        self.read(|r| r.state.list(query))
    }

    fn counts(&self) -> Result<StateCounts> {
        self.read(|r| r.state.counts())
    }

    fn next_due(&self) -> Result<Option<Timestamp>> {
        self.read(|r| r.state.next_due())
    }

    fn retry_dead(&self, ids: Option<&[JobId]>, now: Timestamp) -> Result<Vec<Job>> {
        self.write(|s| s.retry_dead(ids, now))?
    }

    fn clear_dead(&self) -> Result<usize> {
        self.write(|s| s.clear_dead())
    }

    fn purge_completed(&self, finished_before: Timestamp) -> Result<usize> {
        self.write(|s| s.purge_completed(finished_before))
    }

    fn config(&self) -> Result<Config> {
        self.read(|r| r.state.config().clone())
    }

    fn update_config(
        &self,
        update: &mut dyn FnMut(&mut Config) -> Result<(), ConfigError>,
    ) -> Result<Config> {
        self.write(|s| s.update_config(update))?
    }

    fn register_worker(&self, worker: WorkerInfo) -> Result<()> {
        self.write(|s| s.register_worker(worker))
    }

    fn worker_heartbeat(&self, worker: &str, now: Timestamp) -> Result<bool> {
        self.write(|s| s.worker_heartbeat(worker, now))?
    }

    fn deregister_worker(&self, worker: &str) -> Result<()> {
        self.write(|s| s.deregister_worker(worker))
    }

    fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.read(|r| r.state.workers())
    }

    fn request_stop(&self) -> Result<usize> {
        self.write(|s| s.request_stop())
    }

    /// The journal position (generation and offset) this handle has caught up to.
    fn change_version(&self) -> Result<u64> {
        self.read(Replica::version)
    }

    /// Waits on inotify events in the store directory (so a change by another process wakes
    /// it at once), or, where inotify is unavailable, looks again every 25 ms.
    fn wait_for_change(&self, seen: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now().checked_add(timeout);
        let watcher = Watcher::new(&self.dir);
        loop {
            let version = self.change_version()?;
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if version != seen || left.is_zero() {
                return Ok(version);
            }
            watcher.wait(left);
        }
    }
}
