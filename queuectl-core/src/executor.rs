//! The `Executor` trait and the in-process closure executor.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::job::{Job, JobId};

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The job succeeded (exit code 0).
    Succeeded,
    /// The job failed; the message says how (exit code, signal, panic, …).
    Failed(String),
    /// The job ran past its time limit and was killed.
    TimedOut(Duration),
    /// The job was stopped by a forced shutdown before it finished; it did not fail.
    Cancelled,
}

/// The result of running one attempt. A job's failure is an `Outcome`, never an `Err`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How it ended.
    pub status: Status,
    /// The exit code, when the job was a process that exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when the job was a process that a signal killed.
    pub signal: Option<i32>,
    /// How long it ran.
    pub duration: Duration,
    /// Captured output (capped; empty when the executor captures none).
    pub output: String,
}

impl Outcome {
    /// A success.
    pub fn succeeded(duration: Duration) -> Self {
        Self {
            status: Status::Succeeded,
            exit_code: None,
            signal: None,
            duration,
            output: String::new(),
        }
    }

    /// A failure with `message`.
    pub fn failed(message: impl Into<String>, duration: Duration) -> Self {
        Self {
            status: Status::Failed(message.into()),
            exit_code: None,
            signal: None,
            duration,
            output: String::new(),
        }
    }

    /// An attempt stopped (or never started) because it was cancelled.
    pub fn cancelled() -> Self {
        Self {
            status: Status::Cancelled,
            exit_code: None,
            signal: None,
            duration: Duration::ZERO,
            output: String::new(),
        }
    }

    /// Whether the attempt succeeded.
    pub fn is_success(&self) -> bool {
        self.status == Status::Succeeded
    }

    /// Why the attempt did not succeed, for the job's `last_error`.
    pub fn error_message(&self) -> Option<String> {
        match &self.status {
            Status::Succeeded => None,
            Status::Failed(message) => Some(message.clone()),
            Status::TimedOut(limit) => Some(format!("timed out after {:.3?}", limit)),
            Status::Cancelled => Some("cancelled by a forced shutdown".to_owned()),
        }
    }
}

/// An error of the executor itself (not of the job): the attempt could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The job's process could not be started.
    #[error("could not start the command of job {id}")]
    Spawn {
        /// The job.
        id: JobId,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for or signalling the job's process failed.
    #[error("could not {op} the process of job {id}")]
    Process {
        /// What was being done.
        op: &'static str,
        /// The job.
        id: JobId,
        /// Why.
        source: std::io::Error,
    },
}

/// Fires when a forced shutdown wants running jobs to stop. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CancelSignal(Receiver<()>);

/// The sending side of a [`CancelSignal`]: cancelling (or dropping) it fires every clone.
#[derive(Debug)]
pub struct Canceller(Option<Sender<()>>);

/// A connected canceller and signal.
pub fn cancel_pair() -> (Canceller, CancelSignal) {
    let (tx, rx) = crossbeam_channel::bounded(0);
    (Canceller(Some(tx)), CancelSignal(rx))
}

impl Canceller {
    /// Fires the signal.
    pub fn cancel(&mut self) {
        self.0.take();
    }
}

impl CancelSignal {
    /// A signal that never fires.
    pub fn never() -> Self {
        Self(crossbeam_channel::never())
    }

    /// Whether the signal has fired.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.0.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// The channel that disconnects when the signal fires, for `select!`.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.0
    }
}

/// Runs one attempt of a job.
///
/// # Contract
/// - `execute` blocks until the attempt ends and returns its [`Outcome`]. A job that fails,
///   times out (using the job's `timeout`) or panics is an `Ok(Outcome)`; `Err` means the
///   executor could not make the attempt at all (the worker then fails the attempt with that
///   error).
/// - When `cancel` fires, the executor stops the job promptly and returns
///   [`Status::Cancelled`]; the job is handed back to the queue without charging the attempt.
/// - It is called from several worker threads at once.
pub trait Executor: Send + Sync + fmt::Debug {
    /// Runs `job` once.
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError>;
}

/// The message of a panic payload (`&str` or `String`, as `panic!` makes them).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

type JobFn = dyn Fn(&Job) -> Result<(), String> + Send + Sync;

/// Runs jobs as Rust closures in the worker's own thread: `Ok(())` is success, `Err(message)`
/// a failure, and a panic a failure whose message is the panic's.
///
/// Closures cannot be interrupted: a forced shutdown waits for the running closure, and a
/// `timeout` is not enforced.
pub struct FnExecutor {
    run: Box<JobFn>,
}

impl FnExecutor {
    /// An executor calling `run` for each job.
    pub fn new(run: impl Fn(&Job) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self { run: Box::new(run) }
    }
}

impl fmt::Debug for FnExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnExecutor").finish_non_exhaustive()
    }
}

impl Executor for FnExecutor {
    fn execute(&self, job: &Job, cancel: &CancelSignal) -> Result<Outcome, ExecutorError> {
        // A closure cannot be interrupted, but one cancelled before it starts is not started.
        if cancel.is_cancelled() {
            return Ok(Outcome::cancelled());
        }
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| (self.run)(job)));
        let duration = started.elapsed();
        Ok(match result {
            Ok(Ok(())) => Outcome::succeeded(duration),
            Ok(Err(message)) => Outcome::failed(message, duration),
            Err(panic) => {
                Outcome::failed(format!("panicked: {}", panic_message(&*panic)), duration)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;
    use crate::job::{NewJob, now};
    use crate::storage::StorageExt;

    fn job(command: &str) -> Job {
        MemoryStorage::new()
            .enqueue(NewJob::new(command), now())
            .unwrap()
    }

    #[test]
    fn closure_results_become_outcomes() {
        let exec = FnExecutor::new(|job| match job.command.as_str() {
            "ok" => Ok(()),
            "panic" => panic!("boom {}", 42),
            other => Err(format!("bad {other}")),
        });
        let never = CancelSignal::never();
        assert!(exec.execute(&job("ok"), &never).unwrap().is_success());
        let failed = exec.execute(&job("nope"), &never).unwrap();
        assert_eq!(failed.status, Status::Failed("bad nope".into()));
        let panicked = exec.execute(&job("panic"), &never).unwrap();
        assert_eq!(panicked.error_message().unwrap(), "panicked: boom 42");
    }

    #[test]
    fn cancel_signal_fires_for_every_clone() {
        let (mut canceller, signal) = cancel_pair();
        let clone = signal.clone();
        assert!(!signal.is_cancelled());
        canceller.cancel();
        assert!(signal.is_cancelled() && clone.is_cancelled());
        assert!(!CancelSignal::never().is_cancelled());
    }
}
