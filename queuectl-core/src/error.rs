//! Errors of the storage layer.

use std::io;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::job::{InvalidJob, JobId, JobState};

/// Why a storage operation was refused or failed.
///
/// Refusals (`AlreadyExists`, `NotFound`, `LeaseLost`, `InvalidState`, `InvalidJob`, `Config`)
/// leave the store unchanged. Failures (`Io`, `Corrupt`, `Poisoned`, `Backend`, …) come from the
/// medium underneath and carry what was being done and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A job with this id is already in the store.
    #[error("job {id} already exists")]
    AlreadyExists {
        /// The duplicate id.
        id: JobId,
    },
    /// No job with this id.
    #[error("job {id} not found")]
    NotFound {
        /// The missing id.
        id: JobId,
    },
    /// The lease token no longer matches: the lease expired and the job was recovered or
    /// claimed again. The caller must not touch the job.
    #[error("lease on job {id} was lost (it expired and the job was handed back to the queue)")]
    LeaseLost {
        /// The job whose lease was lost.
        id: JobId,
    },
    /// The job is not in a state that allows the operation.
    #[error("cannot {op} job {id}: it is {state}")]
    InvalidState {
        /// The job.
        id: JobId,
        /// Its current state.
        state: JobState,
        /// The refused operation.
        op: &'static str,
    },
    /// The job description was refused.
    #[error(transparent)]
    InvalidJob(#[from] InvalidJob),
    /// A job names a dependency that is not in the store (nor earlier in its batch).
    #[error("{} cannot run after {after}: there is no such job", named(id))]
    DependencyNotFound {
        /// The job being enqueued, when its id was given (not one generated for it, which
        /// nobody has seen).
        id: Option<JobId>,
        /// The missing dependency.
        after: JobId,
    },
    /// A job names a dependency that has ended without completing, so it could never run.
    #[error(
        "{} cannot run after {after}: that job is {state} (retry it first)",
        named(id)
    )]
    DependencyFailed {
        /// The job being enqueued, when its id was given.
        id: Option<JobId>,
        /// The dependency.
        after: JobId,
        /// Its state (`dead` or `cancelled`).
        state: JobState,
    },
    /// Running the job again would give its unique key to a second job while another holds
    /// it.
    #[error("cannot retry job {id}: job {holder} with the same unique key {key:?} is {state}")]
    UniqueKeyTaken {
        /// The job to run again.
        id: JobId,
        /// Its key.
        key: String,
        /// The job holding the key.
        holder: JobId,
        /// That job's state.
        state: JobState,
    },
    /// A setting was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No worker with this id is registered.
    #[error("worker {id} is not registered")]
    UnknownWorker {
        /// The worker id.
        id: String,
    },
    /// An I/O operation on a store file failed.
    #[error("could not {op} {}", path.display())]
    Io {
        /// What was being done ("append to", "fsync", "open", …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The store's data failed an integrity check.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The store's format is not one this version reads.
    #[error("{} has format version {found}; this version of queuectl reads versions up to {supported}", path.display())]
    UnsupportedFormat {
        /// The store file.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The newest version supported.
        supported: u32,
    },
    /// An earlier failure left the handle unable to go on; it refuses everything until the
    /// store is reopened.
    #[error("store at {} refuses writes after an earlier failure; reopen it", path.display())]
    Poisoned {
        /// The store directory.
        path: PathBuf,
    },
    /// The directory is neither empty nor a queue store, so it is not used (and nothing in it
    /// was touched).
    #[error("{} is not a queuectl store: {reason}; choose an empty or new directory", path.display())]
    NotAStore {
        /// The directory.
        path: PathBuf,
        /// What was found there.
        reason: String,
    },
    /// There is no store at this path yet (and the operation does not create one).
    #[error("there is no queue at {} yet", path.display())]
    NoStore {
        /// The store directory.
        path: PathBuf,
    },
    /// The database file was deleted or replaced while this handle had it open: what it would
    /// write no other process would see, so it refuses everything from then on.
    #[error("the database {} was deleted or replaced while in use; restart to use the new one", path.display())]
    StoreMoved {
        /// The database file.
        path: PathBuf,
    },
    /// A store read without write access (as it was, with no shared memory) changed under
    /// the reader, so what it would read next could be wrong.
    #[error("the store {} changed while it was read without write access; run the command again", path.display())]
    StoreChanged {
        /// The database file.
        path: PathBuf,
    },
    /// The store cannot be used as it is.
    #[error("cannot use the store at {}: {reason}", path.display())]
    Conflict {
        /// The store directory.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// The store was opened read-only (or its files cannot be written), so it cannot change.
    #[error("cannot {op}: the store at {} is open read-only", path.display())]
    ReadOnly {
        /// What was refused.
        op: &'static str,
        /// The store directory.
        path: PathBuf,
    },
    /// The database failed, with what was being done and the cause in words.
    #[error("could not {op} in {}: {fault}", path.display())]
    Database {
        /// What was being done.
        op: &'static str,
        /// The database file.
        path: PathBuf,
        /// The cause, in words.
        fault: DatabaseFault,
        /// The database's own error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// PostgreSQL failed, with what was being done, the database and the cause in words.
    #[error("could not {op} in {database}: {fault}")]
    Postgres {
        /// What was being done.
        op: &'static str,
        /// The database: its URL without password, and the schema.
        database: String,
        /// The cause, in words.
        fault: DatabaseFault,
        /// PostgreSQL's own error (or the connection pool's).
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// An error from a database or another backend, with what was being done.
    #[error("{op} failed")]
    Backend {
        /// What was being done.
        op: String,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// What went wrong in a database, in words a user can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatabaseFault {
    /// No space left on the device.
    DiskFull,
    /// The database file is damaged or not a database.
    Corrupt,
    /// Another process held the database locked for longer than the busy timeout.
    Busy,
    /// The database or its directory cannot be written.
    ReadOnly,
    /// The database file cannot be opened.
    CannotOpen,
    /// The operating system reported an I/O error.
    Io,
    /// The database server cannot be reached, or the connection to it broke.
    Unreachable,
    /// The database refused the operation for this user.
    Denied,
    /// The database URL is not one the client reads.
    BadUrl,
    /// TLS with the server could not be set up as the URL asks (its certificate refused,
    /// most often).
    Tls,
    /// The server takes only encrypted connections, and the URL asked for none.
    NeedsTls,
    /// The server did not let this user in (no such role, a wrong password, no `pg_hba.conf`
    /// line for it).
    LoginRefused,
    /// The database named in the URL does not exist.
    NoDatabase,
    /// Anything else (the database's own message follows).
    Other,
}

impl std::fmt::Display for DatabaseFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatabaseFault::DiskFull => "the disk is full (nothing was changed; free some space and try again)",
            DatabaseFault::Corrupt => "the database is corrupt (`queuectl check` says what it finds; restore the store from a backup)",
            DatabaseFault::Busy => "another process kept the store locked for too long (try again)",
            DatabaseFault::ReadOnly => "the database cannot be written (check the permissions of the store directory and its files)",
            DatabaseFault::CannotOpen => "the database file cannot be opened (check that the directory exists and is accessible)",
            DatabaseFault::Io => "the operating system reported an I/O error",
            DatabaseFault::Unreachable => "the database server cannot be reached (is it running, and are the address and credentials right?)",
            DatabaseFault::Denied => "the database refused the operation (check the user's privileges on the database and the schema)",
            DatabaseFault::BadUrl => "it is not a PostgreSQL connection URL (postgres://user@host:port/dbname, or key=value pairs)",
            DatabaseFault::Tls => "TLS with the server could not be set up as the URL asks (the cause follows: a certificate refused by either side, a key or certificate file of ours, or a server without TLS)",
            DatabaseFault::LoginRefused => "the server did not let this user in (check the user name, the password or client certificate, and the server's pg_hba.conf)",
            DatabaseFault::NoDatabase => "the database does not exist (check its name in the URL, or create it: createdb NAME)",
            DatabaseFault::NeedsTls => "the server takes only encrypted connections from here: add sslmode=require, or a mode that checks its certificate, to the URL",
            DatabaseFault::Other => "the database reported an error",
        })
    }
}

impl StorageError {
    /// Whether this says the store's files cannot be opened or written with this user's
    /// permissions (a reader may still open them read-only).
    pub fn is_permission_problem(&self) -> bool {
        match self {
            StorageError::ReadOnly { .. } => true,
            StorageError::Io { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
            StorageError::Database { fault, .. } => {
                matches!(fault, DatabaseFault::ReadOnly | DatabaseFault::CannotOpen)
            }
            StorageError::Postgres { fault, .. } => *fault == DatabaseFault::Denied,
            _ => false,
        }
    }

    /// Whether the handle that returned this error can do nothing more (the store must be
    /// reopened): a pool stops at once instead of retrying.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StorageError::Poisoned { .. }
                | StorageError::StoreMoved { .. }
                | StorageError::StoreChanged { .. }
                | StorageError::Corrupt { .. }
                | StorageError::Database {
                    fault: DatabaseFault::Corrupt,
                    ..
                }
                | StorageError::Postgres {
                    fault: DatabaseFault::Corrupt,
                    ..
                }
        )
    }

    /// Whether this is a refusal of the request (the store is fine and unchanged) rather than
    /// a failure of the medium.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StorageError::AlreadyExists { .. }
                | StorageError::NotFound { .. }
                | StorageError::LeaseLost { .. }
                | StorageError::InvalidState { .. }
                | StorageError::InvalidJob(_)
                | StorageError::Config(_)
                | StorageError::UnknownWorker { .. }
        )
    }
}

/// Result alias for storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A job being enqueued, in words: by its id when it was given one.
fn named(id: &Option<JobId>) -> String {
    match id {
        Some(id) => format!("job {id}"),
        None => "the job".to_owned(),
    }
}
