//! Why a command failed, and how that maps to what the user sees.

use std::io;

use queuectl_core::pool::PoolError;
use queuectl_core::{ConfigError, SpecError, StorageError};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The store refused or failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A job description was refused.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A job description on standard input was refused.
    #[error("job on line {line} of standard input refused; nothing was enqueued")]
    Line {
        /// 1-based line number.
        line: usize,
        /// Why.
        source: SpecError,
    },
    /// The store refused a job given on standard input (its id is taken).
    #[error("job on line {line} of standard input refused; nothing was enqueued")]
    StoredLine {
        /// 1-based line number.
        line: usize,
        /// Why.
        source: StorageError,
    },
    /// A setting was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The worker pool failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Writing to stdout failed.
    #[error("could not write to standard output")]
    Output(#[source] io::Error),
    /// Reading stdin failed.
    #[error("could not read standard input")]
    Input(#[source] io::Error),
    /// Installing signal handlers failed.
    #[error("could not install the signal handlers")]
    Signals(#[source] io::Error),
    /// There is no home directory to put the store in.
    #[error("no data directory for this user: pass --home DIR or set QUEUECTL_HOME")]
    NoHome,
    /// `wait` gave up before every job finished.
    #[error("timed out waiting for: {0}")]
    WaitTimedOut(String),
    /// Another refusal, with its reason.
    #[error("{0}")]
    Refused(String),
}

impl CliError {
    /// The exit status for this error: 124 when `wait` timed out (as `timeout(1)` does), 1
    /// for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::WaitTimedOut(_) => 124,
            _ => 1,
        }
    }

    /// Whether this is a write to a closed pipe (a reader like `head` went away): not an error.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

impl From<io::Error> for CliError {
    fn from(error: io::Error) -> Self {
        CliError::Output(error)
    }
}

/// The outcome of every command.
pub type Result<T = (), E = CliError> = std::result::Result<T, E>;
