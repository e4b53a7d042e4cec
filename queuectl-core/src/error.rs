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
    /// A record failed its integrity check.
    #[error("corrupt record in {} at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The store's format is not one this version reads.
    #[error("{} has format version {found}; this version of queuectl reads version {supported}", path.display())]
    UnsupportedFormat {
        /// The store file.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version supported.
        supported: u32,
    },
    /// An earlier write failed, so what is on disk is unknown; the store refuses writes until
    /// it is reopened.
    #[error("store at {} refuses writes after an earlier failure; reopen it", path.display())]
    Poisoned {
        /// The store directory.
        path: PathBuf,
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

impl StorageError {
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
