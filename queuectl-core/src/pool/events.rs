//! What a pool tells its embedder: events while it runs, the error it ends with, and a
//! summary of what it did.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::error::StorageError;
use crate::job::{JobId, JobState};

/// Something the pool did, for live output and for tests to wait on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The pool registered and is running.
    Started {
        /// Its worker id.
        worker: String,
        /// Executor threads.
        threads: usize,
    },
    /// A job was claimed for this pool (with prefetch, it may wait for a free thread;
    /// [`Event::Running`] says when it starts).
    Claimed {
        /// The job.
        job: JobId,
        /// The attempt number (1 for the first).
        attempt: u32,
        /// Its command.
        command: String,
    },
    /// An executor thread started a claimed job's attempt.
    Running {
        /// The job.
        job: JobId,
        /// The attempt number (1 for the first).
        attempt: u32,
        /// Its command.
        command: String,
    },
    /// An attempt succeeded.
    Completed {
        /// The job.
        job: JobId,
        /// The attempt number.
        attempt: u32,
        /// How long it ran.
        duration: Duration,
    },
    /// An attempt failed; the job will run again after `retry_in`.
    Failed {
        /// The job.
        job: JobId,
        /// The attempt number.
        attempt: u32,
        /// Why.
        error: String,
        /// The backoff before the next attempt.
        retry_in: Duration,
    },
    /// An attempt failed and it was the job's last: the job is in the dead letter queue.
    Dead {
        /// The job.
        job: JobId,
        /// The attempt number.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// A running job was handed back unfinished (forced shutdown); its attempt is not charged.
    Released {
        /// The job.
        job: JobId,
    },
    /// The pool lost a job's lease (it was presumed dead); its result was discarded.
    LeaseLost {
        /// The job.
        job: JobId,
    },
    /// The recovery tick returned a job abandoned by a dead worker to the queue.
    Recovered {
        /// The job.
        job: JobId,
        /// Its state now (`pending`, or `dead` if that was its last attempt).
        state: JobState,
    },
    /// Completed jobs past their retention were deleted.
    Purged {
        /// How many.
        count: usize,
    },
    /// The pool began to stop.
    Stopping {
        /// Whether running jobs are being killed (`true`) or allowed to finish.
        forced: bool,
        /// Why.
        reason: StopReason,
    },
    /// A storage operation failed; the pool retries it.
    StorageError {
        /// What the pool was doing.
        op: &'static str,
        /// The error and its causes.
        error: String,
    },
    /// The pool has stopped; no more events follow.
    Stopped,
}

/// Why a pool began to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// [`Stopper::graceful`](super::Stopper::graceful) or
    /// [`Stopper::forced`](super::Stopper::forced) (or `shutdown`) was called.
    Requested,
    /// A stop request recorded in storage (`queuectl worker stop`) reached this pool.
    StopRequest,
    /// `exit_when_idle` and nothing is left to run.
    Idle,
    /// A graceful stop ran out of its shutdown timeout: running jobs are being killed.
    ShutdownTimeout,
    /// Every handle that could stop the pool was dropped.
    HandleDropped,
    /// Storage failed in a way the pool cannot work around.
    StorageFailure,
    /// Every executor thread ended while attempts were out: their results cannot come.
    ExecutorsGone,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::Requested => "requested",
            StopReason::StopRequest => "stop request in storage",
            StopReason::Idle => "idle",
            StopReason::ShutdownTimeout => "shutdown timeout",
            StopReason::HandleDropped => "pool handle dropped",
            StopReason::StorageFailure => "storage failure",
            StopReason::ExecutorsGone => "executor threads gone",
        })
    }
}

/// Why the pool could not start or ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A thread could not be spawned.
    #[error("could not spawn the {what} thread")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The store failed in a way the pool cannot work around.
    #[error("storage failed while the pool was {op}")]
    Storage {
        /// What the pool was doing.
        op: &'static str,
        /// The error.
        source: StorageError,
    },
    /// A pool thread panicked.
    #[error("the {what} thread panicked")]
    Panicked {
        /// Which thread.
        what: &'static str,
    },
    /// Every executor thread ended while attempts were still out: their results are lost.
    #[error("every executor thread ended while {running} attempt(s) were still running")]
    ExecutorsGone {
        /// Attempts whose results will never come.
        running: usize,
    },
    /// Invalid builder settings.
    #[error("invalid worker pool setting: {0}")]
    Invalid(String),
}

/// What a pool did over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Attempts that succeeded.
    pub completed: usize,
    /// Attempts that failed and will be retried.
    pub failed: usize,
    /// Attempts that failed for the last time.
    pub dead: usize,
    /// Jobs handed back unfinished.
    pub released: usize,
    /// Results discarded because the lease was lost.
    pub lost: usize,
}

/// The pool's end of the events channel: a ring of bounded size. When the reader falls
/// `capacity` events behind (or never reads), the oldest are dropped and counted, so a pool
/// whose events nobody reads holds at most `capacity` of them.
#[derive(Debug, Clone)]
pub(crate) struct EventSink {
    tx: Option<Sender<Event>>,
    /// Our own clone of the receiving end, to drop the oldest event when full.
    oldest: Receiver<Event>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// A sink of `capacity` events (none when `capacity` is 0: events are off), the
    /// receiver for the embedder and the count of dropped events.
    pub(crate) fn new(capacity: usize) -> (Self, Receiver<Event>, Arc<AtomicU64>) {
        let dropped = Arc::new(AtomicU64::new(0));
        if capacity == 0 {
            let (_, rx) = crossbeam_channel::bounded(0);
            let sink = EventSink {
                tx: None,
                oldest: rx.clone(),
                dropped: dropped.clone(),
            };
            return (sink, rx, dropped);
        }
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let sink = EventSink {
            tx: Some(tx),
            oldest: rx.clone(),
            dropped: dropped.clone(),
        };
        (sink, rx, dropped)
    }

    /// Sends the event `make` builds (only built when events are on), dropping the oldest
    /// queued event if the ring is full.
    pub(crate) fn emit(&self, make: impl FnOnce() -> Event) {
        let Some(tx) = &self.tx else { return };
        let mut event = make();
        loop {
            match tx.try_send(event) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) => {
                    event = back;
                    if self.oldest.try_recv().is_ok() {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Cannot happen while we hold `oldest`; nobody to tell either way.
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// An error and its causes on one line: `a: b: c`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_ring_drops_the_oldest_and_counts_them() {
        let (sink, rx, dropped) = EventSink::new(3);
        for count in 0..10 {
            sink.emit(|| Event::Purged { count });
        }
        sink.emit(|| Event::Stopped);
        let kept: Vec<Event> = rx.try_iter().collect();
        assert_eq!(
            kept,
            [
                Event::Purged { count: 8 },
                Event::Purged { count: 9 },
                Event::Stopped
            ]
        );
        assert_eq!(dropped.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn events_off_builds_nothing() {
        let (sink, rx, _) = EventSink::new(0);
        sink.emit(|| panic!("not built when events are off"));
        assert!(rx.try_recv().is_err());
    }
}
