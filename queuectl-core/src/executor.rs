//! The `Executor` trait and the in-process closure executor.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use parking_lot::Mutex;

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

/// How much output a [`LiveOutput`] holds for the pool by default: the shell executor's
/// default output limit.
pub const DEFAULT_LIVE_LIMIT: usize = crate::shell::DEFAULT_OUTPUT_LIMIT;

/// The output of a running attempt as it is produced: the executor writes it, and the worker
/// pool records what is new in the store every so often while the attempt runs
/// ([`Storage::record_output`](crate::Storage::record_output)), so that `queuectl logs
/// --follow` shows it. Cheap to clone; clones share the output.
///
/// Bytes are taken as text whole characters at a time (a character split between two writes
/// waits for its end; invalid bytes become U+FFFD). It holds at most its
/// [`limit`](Self::set_limit) of output not yet recorded; older output is dropped, and the
/// store learns that some is missing.
#[derive(Debug, Clone)]
pub struct LiveOutput(Arc<Mutex<Unrecorded>>);

#[derive(Debug)]
struct Unrecorded {
    /// Output not yet recorded, whole characters only.
    text: String,
    /// Where `text` starts in the attempt's output (in bytes of text).
    offset: u64,
    decoder: Utf8Stream,
    limit: usize,
    /// When the first output was written.
    first_write: Option<Instant>,
}

impl Default for LiveOutput {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveOutput {
    /// No output yet, holding at most [`DEFAULT_LIVE_LIMIT`] bytes.
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(Unrecorded {
            text: String::new(),
            offset: 0,
            decoder: Utf8Stream::default(),
            limit: DEFAULT_LIVE_LIMIT,
            first_write: None,
        })))
    }

    /// Holds at most `bytes` of output that is not recorded yet (an executor with an output
    /// limit of its own passes it, so a job printing fast costs the store no more than that per
    /// flush).
    pub fn set_limit(&self, bytes: usize) {
        let mut inner = self.0.lock();
        inner.limit = bytes;
        inner.trim();
    }

    /// Adds output, as the job produced it.
    pub fn write(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut inner = self.0.lock();
        inner.first_write.get_or_insert_with(Instant::now);
        let Unrecorded { decoder, text, .. } = &mut *inner;
        decoder.decode(bytes, text);
        inner.trim();
    }

    /// The output written and not recorded yet: where it starts in the attempt's output (in
    /// bytes of text; later than where the last recorded output ended when some was dropped),
    /// and the text. `None` when there is none.
    pub fn unrecorded(&self) -> Option<(u64, String)> {
        let inner = self.0.lock();
        (!inner.text.is_empty()).then(|| (inner.offset, inner.text.clone()))
    }

    /// The output up to offset `upto` is recorded: it is no longer held.
    pub fn recorded(&self, upto: u64) {
        let mut inner = self.0.lock();
        let kept = crate::rules::keep_from(&inner.text, inner.offset, upto).len();
        let cut = inner.text.len() - kept;
        inner.text.drain(..cut);
        inner.offset += cut as u64;
    }

    /// When output was first written, if it was.
    pub(crate) fn first_write(&self) -> Option<Instant> {
        self.0.lock().first_write
    }
}

/// Output bytes as text, decoded as they come: what is not UTF-8 becomes U+FFFD, and a
/// character split between two writes is decoded whole. Both what a follower sees while a job
/// runs ([`LiveOutput`]) and the output kept when it ends go through it, so that offsets in
/// the one are offsets in the other.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    /// The start of a character whose end has not been written yet.
    partial: Vec<u8>,
}

impl Utf8Stream {
    /// Appends `bytes`, decoded, to `text` (holding back the start of a character they cut).
    pub(crate) fn decode(&mut self, bytes: &[u8], text: &mut String) {
        let mut pending = std::mem::take(&mut self.partial);
        pending.extend_from_slice(bytes);
        let mut rest = &pending[..];
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    // Valid up to there by the error's own account.
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match error.error_len() {
                        Some(len) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[len..];
                        }
                        None => {
                            // A character cut short by the end of this write.
                            self.partial = after.to_vec();
                            rest = &[];
                        }
                    }
                }
            }
        }
    }

    /// Whether the stream ends inside a character (which then counts as one U+FFFD).
    pub(crate) fn cut_short(&self) -> bool {
        !self.partial.is_empty()
    }
}

impl Unrecorded {
    /// Drops the oldest output beyond the limit.
    fn trim(&mut self) {
        let before = self.text.len();
        if before > self.limit {
            self.text = crate::job::tail(std::mem::take(&mut self.text), self.limit);
            self.offset += (before - self.text.len()) as u64;
        }
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

    /// Runs `job` once as [`execute`](Self::execute) does, writing its output to `live` as it
    /// is produced; the worker pool calls this one. The outcome's output must then be the
    /// tail of what was written, as [`ShellExecutor`](crate::ShellExecutor)'s is (after a
    /// `[... N bytes truncated]` line when it dropped some), so that a follower can tell what
    /// it has not seen yet.
    ///
    /// The default writes nothing and calls `execute`: an executor that cannot report its
    /// output as it goes shows it once the attempt has ended.
    fn execute_live(
        &self,
        job: &Job,
        cancel: &CancelSignal,
        live: &LiveOutput,
    ) -> Result<Outcome, ExecutorError> {
        let _ = live;
        self.execute(job, cancel)
    }
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
    fn live_output_holds_whole_characters_and_counts_what_it_drops() {
        let live = LiveOutput::new();
        assert_eq!(live.unrecorded(), None);
        assert_eq!(live.first_write(), None);
        // "é" split between two writes, then a byte that is no UTF-8 at all.
        live.write(b"caf\xc3");
        assert_eq!(live.unrecorded(), Some((0, "caf".to_owned())));
        live.write(b"\xa9 \xff!");
        assert_eq!(live.unrecorded(), Some((0, "café \u{fffd}!".to_owned())));
        assert!(live.first_write().is_some());
        live.recorded(3);
        assert_eq!(live.unrecorded(), Some((3, "é \u{fffd}!".to_owned())));
        // Recorded up to the middle of "é": the whole character counts as recorded.
        live.recorded(4);
        assert_eq!(live.unrecorded(), Some((5, " \u{fffd}!".to_owned())));
        live.recorded(100);
        assert_eq!(live.unrecorded(), None);
        // Over its limit it keeps the newest output, and says where it starts.
        live.set_limit(4);
        live.write(b"0123456789");
        assert_eq!(live.unrecorded(), Some((16, "6789".to_owned())));
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
